"""Textured asset files: GLB (glTF 2.0 PBR), OBJ + MTL + PNG, USDZ / USDA, and levels of detail, checked by the
Khronos glTF validator (when node and the npm package are there), by a Python check of the glTF rules that
matter, by trimesh and by usd-core reading them back."""

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from ln3diff_rt.mesh_export import Material, Placement, asset_files, export_file_name, to_trimesh
from ln3diff_rt.meshing import extract_mesh
from ln3diff_rt.texturing import bake_texture, levels_of_detail, unwrap

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
NAME, STEM = "a tall striped egg", "a-tall-striped-egg_s1"


def egg(p: torch.Tensor) -> torch.Tensor:
    return 200 * (1.0 - (p / torch.tensor([0.3, 0.4, 0.8])).norm(dim=-1)) + 10.0


def stripes(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([0.5 + 0.5 * torch.sin(30 * p[:, 2]), 0.5 + 0.5 * torch.cos(20 * p[:, 0]),
                        torch.full_like(p[:, 0], 0.3)], dim=-1)


@pytest.fixture(scope="module")
def textured():
    mesh = unwrap(extract_mesh(egg, 48, color_fn=stripes, faces=3000), SIZE)
    return mesh, Material(bake_texture(mesh, stripes, SIZE, chunk=8192), roughness=0.7)


@pytest.fixture(scope="module")
def files(textured):
    mesh, material = textured
    levels = levels_of_detail(mesh, (3000, 800))
    return asset_files(levels, ("glb", "obj", "usdz", "usda"), Placement(), NAME, {"seed": 1}, material, STEM)


def gltf_json(glb: bytes) -> tuple[dict, bytes]:
    """The JSON and BIN chunks of a GLB, checking its header."""
    magic, version, length = struct.unpack("<4sII", glb[:12])
    assert magic == b"glTF" and version == 2 and length == len(glb)
    json_length, json_type = struct.unpack("<II", glb[12:20])
    assert json_type == 0x4E4F534A  # "JSON"
    doc = json.loads(glb[20:20 + json_length])
    rest = glb[20 + json_length:]
    bin_length, bin_type = struct.unpack("<II", rest[:8])
    assert bin_type == 0x004E4942  # "BIN\0"
    return doc, rest[8:8 + bin_length]


COMPONENTS = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def check_gltf(glb: bytes, texture_size: int) -> dict:
    """The glTF 2.0 rules that matter for a textured asset, as the Khronos validator checks them: accessors inside
    their buffer views, POSITION min/max equal to the data, indices inside the vertex range, texture -> image ->
    PNG references that resolve, a metallic-roughness material with a base-colour texture, no COLOR_0 beside it."""
    doc, binary = gltf_json(glb)
    assert doc["asset"]["version"] == "2.0" and doc["buffers"][0]["byteLength"] <= len(binary)

    def data(index: int) -> np.ndarray:
        accessor = doc["accessors"][index]
        view = doc["bufferViews"][accessor["bufferView"]]
        dtype, width = COMPONENTS[accessor["componentType"]], WIDTH[accessor["type"]]
        start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        size = accessor["count"] * width * np.dtype(dtype).itemsize
        assert start + size <= view.get("byteOffset", 0) + view["byteLength"] <= len(binary)
        return np.frombuffer(binary, dtype, accessor["count"] * width, start).reshape(accessor["count"], width)

    [primitive] = doc["meshes"][0]["primitives"]
    attributes = primitive["attributes"]
    positions = data(attributes["POSITION"])
    accessor = doc["accessors"][attributes["POSITION"]]
    assert np.allclose(accessor["min"], positions.min(axis=0)) and np.allclose(accessor["max"], positions.max(axis=0))
    indices = data(primitive["indices"])
    assert indices.max() < len(positions) and len(indices) % 3 == 0
    uvs = data(attributes["TEXCOORD_0"])
    assert len(uvs) == len(positions) and uvs.min() >= 0.0 and uvs.max() <= 1.0
    assert "COLOR_0" not in attributes  # glTF multiplies vertex colours into the base colour
    material = doc["materials"][primitive["material"]]
    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and 0.0 <= pbr["roughnessFactor"] <= 1.0
    texture = doc["textures"][pbr["baseColorTexture"]["index"]]
    image = doc["images"][texture["source"]]
    assert image["mimeType"] == "image/png"
    view = doc["bufferViews"][image["bufferView"]]
    png = binary[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]
    assert Image.open(io.BytesIO(png)).size == (texture_size, texture_size)
    return doc


def test_textured_glb_follows_the_gltf_rules(files, textured):
    doc = check_gltf(files["LOD0.glb"], SIZE)
    assert doc["materials"][0]["pbrMetallicRoughness"]["roughnessFactor"] == pytest.approx(0.7)
    assert doc["nodes"][0]["name"] == f"{NAME}_LOD0" and doc["scenes"][0]["extras"]["ln3diff"]["lod"] == 0
    check_gltf(files["LOD1.glb"], SIZE)
    loaded = trimesh.load(io.BytesIO(files["LOD0.glb"]), file_type="glb", force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and loaded.visual.material.baseColorTexture
    assert len(loaded.faces) == len(textured[0].faces)


def validator_modules() -> Path | None:
    """node_modules holding the Khronos glTF validator: $GLTF_VALIDATOR_MODULES, else the one .ci/run installs."""
    for folder in (os.environ.get("GLTF_VALIDATOR_MODULES"), REPO / ".ci" / "node" / "node_modules"):
        if folder and (Path(folder) / "gltf-validator" / "package.json").is_file():
            return Path(folder)
    return None


VALIDATE_JS = """
const validator = require('gltf-validator');
const data = new Uint8Array(require('fs').readFileSync(process.argv[1]));
validator.validateBytes(data).then((r) => console.log(JSON.stringify(r.issues)))
  .catch((e) => { console.error(e); process.exit(2); });
"""


@pytest.mark.skipif(shutil.which("node") is None or validator_modules() is None,
                    reason="needs node and the npm package gltf-validator (.ci/run installs it into .ci/node)")
def test_khronos_validator_finds_no_errors_or_warnings(files, tmp_path):
    for key in ("LOD0.glb", "LOD1.glb"):
        path = tmp_path / key
        path.write_bytes(files[key])
        proc = subprocess.run(["node", "-e", VALIDATE_JS, str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NODE_PATH": str(validator_modules())})
        assert proc.returncode == 0, proc.stderr
        issues = json.loads(proc.stdout)
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"][:5]


def test_levels_share_one_texture_and_are_named_for_engines(files):
    assert sorted(files) == ["LOD0.glb", "LOD0.obj", "LOD0.usda", "LOD0.usdz", "LOD1.glb", "LOD1.obj", "LOD1.usda",
                             "LOD1.usdz", "mtl", "png"]
    assert export_file_name(STEM, "LOD1.glb") == f"{STEM}_LOD1.glb" and export_file_name(STEM, "png") == f"{STEM}.png"
    shared = np.asarray(Image.open(io.BytesIO(files["png"])))
    for key in ("LOD0.glb", "LOD1.glb"):
        doc, binary = gltf_json(files[key])
        view = doc["bufferViews"][doc["images"][0]["bufferView"]]
        start = view.get("byteOffset", 0)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(binary[start:start + view["byteLength"]]))), shared)
    lod0 = trimesh.load(io.BytesIO(files["LOD0.glb"]), file_type="glb", force="mesh")
    lod1 = trimesh.load(io.BytesIO(files["LOD1.glb"]), file_type="glb", force="mesh")
    assert len(lod1.faces) == 800 < len(lod0.faces)
    assert np.allclose(lod0.bounds, lod1.bounds, atol=0.02)  # placed alike: no jump when the engine switches level


def test_obj_mtl_and_png_load_together(files, tmp_path):
    for key in ("LOD0.obj", "LOD1.obj", "mtl", "png"):
        (tmp_path / export_file_name(STEM, key)).write_bytes(files[key])
    text = files["LOD1.obj"].decode()
    assert f"mtllib {STEM}.mtl" in text and f"usemtl {STEM}" in text and "\nvt " in text
    mtl = files["mtl"].decode()
    assert f"map_Kd {STEM}.png" in mtl and "Kd 1 1 1" in mtl and "Pr 0.7" in mtl and "Pm 0" in mtl
    loaded = trimesh.load(tmp_path / f"{STEM}_LOD1.obj", force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    assert loaded.visual.material.image.size == (SIZE, SIZE)


def usd_stage(data: bytes, suffix: str, tmp_path: Path, extra: dict | None = None):
    from pxr import Usd

    path = tmp_path / f"asset{suffix}"
    path.write_bytes(data)
    for name, content in (extra or {}).items():
        (tmp_path / name).write_bytes(content)
    return Usd.Stage.Open(str(path))


@pytest.mark.parametrize("key", ["LOD0.usdz", "LOD1.usda"])
def test_usd_loads_back_with_material_bound_metres_y_up_and_extent(files, textured, key, tmp_path):
    pxr = pytest.importorskip("pxr", reason="USD export needs usd-core")
    from pxr import Usd, UsdGeom, UsdShade, UsdValidation

    stage = usd_stage(files[key], "." + key.split(".")[1], tmp_path, {f"{STEM}.png": files["png"]})
    assert pxr is not None and UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    root = stage.GetDefaultPrim()
    assert root.GetDisplayName() == f"{NAME}_{key.split('.')[0]}" and Usd.ModelAPI(root).GetKind() == "component"
    [mesh] = [UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    points = np.asarray(mesh.GetPointsAttr().Get())
    extent = np.asarray(mesh.GetExtentAttr().Get())
    assert np.allclose(extent, [points.min(axis=0), points.max(axis=0)])
    egg_extent = to_trimesh(textured[0], Placement()).extents  # LOD0 sets the frame: longest side 1 m, along Y
    assert np.allclose(extent[1] - extent[0], egg_extent, atol=0.02) and abs(extent[0][1]) < 0.02
    material, _ = UsdShade.MaterialBindingAPI(mesh.GetPrim()).ComputeBoundMaterial()
    surface = material.ComputeSurfaceSource()[0]
    assert surface.GetIdAttr().Get() == "UsdPreviewSurface"
    assert surface.GetInput("metallic").Get() == 0.0 and surface.GetInput("roughness").Get() == pytest.approx(0.7)
    texture = surface.GetInput("diffuseColor").GetConnectedSources()[0][0].source
    assert UsdShade.Shader(texture).GetIdAttr().Get() == "UsdUVTexture"
    assert Path(UsdShade.Shader(texture).GetInput("file").Get().resolvedPath.split("[")[-1].rstrip("]")).name \
        == f"{STEM}.png"
    st = UsdGeom.PrimvarsAPI(mesh).GetPrimvar("st").Get()
    assert len(st) == len(points)
    registry = UsdValidation.ValidationRegistry()
    errors = UsdValidation.ValidationContext(registry.GetOrLoadAllValidators()).Validate(stage)
    assert [e.GetMessage() for e in errors] == []


def test_vertex_coloured_usd_reads_display_color(textured, tmp_path):
    pytest.importorskip("pxr", reason="USD export needs usd-core")
    from pxr import UsdGeom, UsdShade

    mesh = extract_mesh(egg, 32, color_fn=stripes)
    files = asset_files([mesh], ("usdz", "glb"), name=NAME, stem=STEM)
    assert sorted(files) == ["glb", "usdz"]  # nothing refers to a texture: no png
    stage = usd_stage(files["usdz"], ".usdz", tmp_path)
    [prim] = [p for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    colours = np.asarray(UsdGeom.PrimvarsAPI(prim).GetPrimvar("displayColor").Get())
    assert colours.shape == (len(mesh.vertices), 3) and 0.0 <= colours.min() and colours.max() <= 1.0
    surface = UsdShade.MaterialBindingAPI(prim).ComputeBoundMaterial()[0].ComputeSurfaceSource()[0]
    reader = surface.GetInput("diffuseColor").GetConnectedSources()[0][0].source
    assert UsdShade.Shader(reader).GetInput("varname").Get() == "displayColor"
    doc, _ = gltf_json(files["glb"])
    assert "COLOR_0" in doc["meshes"][0]["primitives"][0]["attributes"] and "textures" not in doc
