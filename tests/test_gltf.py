"""The GLB writer (`ln3diff_rt.gltf`) against trimesh's exporter, which wrote every GLB before it: the same mesh,
normals, colours, UVs, texture and extras read back, for a vertex-coloured and a textured asset."""

import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from test_assets import VALIDATE_JS, check_gltf, gltf_json, validator_modules

from ln3diff_rt.gltf import glb_bytes
from ln3diff_rt.mesh_export import Material, Placement, mesh_bytes, to_trimesh
from ln3diff_rt.meshing import extract_mesh
from ln3diff_rt.texturing import bake_texture, unwrap

NAME = "a small r\u00f6d \"blob\""  # non-ASCII and quotes survive the JSON chunk


def blob(p: torch.Tensor) -> torch.Tensor:
    return 150 * (1.0 - (p / torch.tensor([0.45, 0.3, 0.55])).norm(dim=-1)) + 10.0 + 8 * torch.sin(9 * p[:, 0])


def paint(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([0.5 + 0.4 * torch.sin(11 * p[:, 2]), 0.5 + 0.4 * torch.cos(7 * p[:, 1]),
                        0.2 + 0.6 * (p[:, 0] > 0).float()], dim=-1)


@pytest.fixture(scope="module")
def coloured():
    return extract_mesh(blob, 37, color_fn=paint, faces=1500)


@pytest.fixture(scope="module")
def textured(coloured):
    mesh = unwrap(coloured, 64)
    return mesh, Material(bake_texture(mesh, paint, 64, chunk=4096), roughness=0.35)


def trimesh_glb(mesh, placement, extras, material=None) -> bytes:
    """What `mesh_bytes` wrote before the writer: trimesh's own GLB export."""
    tm = to_trimesh(mesh, placement)
    if material is not None:
        tm.visual = trimesh.visual.TextureVisuals(uv=mesh.uvs, material=trimesh.visual.material.PBRMaterial(
            name=NAME, baseColorTexture=Image.fromarray(material.texture), metallicFactor=0.0,
            roughnessFactor=material.roughness))
    scene = trimesh.Scene()
    scene.add_geometry(tm, geom_name=NAME, node_name=NAME)
    scene.metadata["ln3diff"] = extras
    return trimesh.exchange.gltf.export_glb(scene, include_normals=True)


def load(glb: bytes) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh", process=False)


def test_vertex_coloured_glb_reads_back_as_trimesh_wrote_it(coloured):
    placement = Placement(height=0.7, pivot="center")
    ours = mesh_bytes(coloured, "glb", placement, NAME, {"seed": 3})
    theirs = trimesh_glb(coloured, placement, json.loads(json.dumps(gltf_json(ours)[0]["scenes"][0]["extras"]))
                         ["ln3diff"])
    a, b = load(ours), load(theirs)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.vertex_normals, b.vertex_normals)
    np.testing.assert_array_equal(a.visual.vertex_colors, b.visual.vertex_colors)
    doc, _ = gltf_json(ours)
    assert doc["nodes"][0]["name"] == NAME and doc["meshes"][0]["name"] == NAME
    extras = doc["scenes"][0]["extras"]["ln3diff"]
    assert extras["seed"] == 3 and extras["pivot"] == "center" and extras["height_m"] == pytest.approx(0.7)
    assert "materials" not in doc and a.extents[1] == pytest.approx(0.7, abs=1e-6)


def test_textured_glb_reads_back_as_trimesh_wrote_it(textured):
    mesh, material = textured
    ours = mesh_bytes(mesh, "glb", Placement(), NAME, {"seed": 4}, material)
    theirs = trimesh_glb(mesh, Placement(), {}, material)
    a, b = load(ours), load(theirs)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_allclose(a.visual.uv, b.visual.uv, atol=1e-7)
    np.testing.assert_allclose(a.visual.uv, mesh.uvs, atol=1e-7)  # V flipped on writing, back on reading
    texture = np.asarray(a.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(texture, material.texture)
    assert a.visual.material.roughnessFactor == pytest.approx(0.35) and a.visual.material.metallicFactor == 0.0
    check_gltf(ours, 64)


def test_writer_refuses_half_a_texture(coloured):
    with pytest.raises(ValueError, match="both uvs and texture_png"):
        glb_bytes(coloured.vertices, coloured.faces, coloured.normals, "x", uvs=np.zeros((len(coloured.vertices), 2)))


@pytest.mark.skipif(shutil.which("node") is None or validator_modules() is None,
                    reason="needs node and the npm package gltf-validator (.ci/run installs it into .ci/node)")
def test_khronos_validator_passes_both_kinds(coloured, textured, tmp_path):
    for key, data in (("coloured", mesh_bytes(coloured, "glb", Placement(), NAME)),
                      ("textured", mesh_bytes(textured[0], "glb", Placement(), NAME, None, textured[1]))):
        path = tmp_path / f"{key}.glb"
        path.write_bytes(data)
        proc = subprocess.run(["node", "-e", VALIDATE_JS, str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NODE_PATH": str(validator_modules())})
        assert proc.returncode == 0, proc.stderr
        issues = json.loads(proc.stdout)
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, (key, issues["messages"][:5])
