"""The SDF field (issue 18, item 4): density follows a signed distance (VolSDF) and meshes are cut at its zero level."""

import io
import json

import numpy as np
import pytest
import torch
import trimesh
from conftest import save_cube_checkpoint, vae_resumes_exactly
from scipy.spatial import cKDTree

import training.vae as vae_training
from ln3diff_rt.checkpoint import load_models
from ln3diff_rt.config import ModelConfig, RendererConfig, get_preset
from ln3diff_rt.meshing import extract_mesh
from ln3diff_rt.models.field import TriplaneField, sdf_density, sdf_of_density
from ln3diff_rt.models.projected_field import ProjectedTriplaneField
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT, Generator
from ln3diff_rt.random_weights import random_models
from ln3diff_rt.runner import Request, run
from training.data.synth import generate
from training.geometry_losses import eikonal_loss, field_gradient


def test_configs_without_the_field_load_as_density_fields(pre_v2_checkpoint):
    raw = json.loads(get_preset("tiny").to_json())
    del raw["renderer"]["geometry"], raw["renderer"]["sdf_beta"]  # what checkpoints written before SDF fields store
    assert ModelConfig.from_json(json.dumps(raw)) == get_preset("tiny")
    field = load_models(pre_v2_checkpoint).vae.field
    assert load_models(DEFAULT_CHECKPOINT).vae.field.is_sdf  # the shipped model since v2 (issue 18)
    assert not field.is_sdf and not hasattr(field, "log_beta")
    assert field.surface_density(7.5) == 7.5
    with pytest.raises(ValueError, match="density field"):
        field.sdf(torch.zeros(1, 3, 32, 8, 8), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="geometry 'voxels'"):
        RendererConfig(geometry="voxels")


def test_density_of_a_signed_distance_and_back():
    beta = 0.013
    s = (torch.rand(4001, generator=torch.Generator().manual_seed(0)) * 28.0 - 10.0) * beta  # -10 .. 18 beta
    density = sdf_density(s, torch.tensor(beta))
    order = s.argsort()
    assert bool((density[order].diff() <= 1e-6).all())  # deeper inside, denser
    assert float(sdf_density(torch.zeros(1), torch.tensor(beta))) == pytest.approx(0.5 / beta)
    assert float(density.max()) < 1.0 / beta
    torch.testing.assert_close(sdf_of_density(density, beta), s, rtol=0, atol=0.01 * beta)


def test_sdf_field_projected_form_matches_and_the_surface_is_level_zero():
    torch.manual_seed(1)
    field = TriplaneField(32, RendererConfig(geometry="sdf", sdf_beta=0.02, albedo=True))
    assert field.beta == pytest.approx(0.02)
    planes, points = torch.randn(1, 3, 32, 13, 13), torch.rand(1, 777, 3) * 2.2 - 1.1
    density, rgb = field(planes, points)
    torch.testing.assert_close(density, sdf_density(field.sdf(planes, points), torch.tensor(0.02)))
    projected = ProjectedTriplaneField(field)
    d2, rgb2 = projected(planes, points)
    torch.testing.assert_close(d2, density, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rgb2, rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projected.albedo(planes, points), field.albedo(planes, points), rtol=1e-5, atol=1e-5)
    assert field.surface_density(10.0) == pytest.approx(25.0)  # 1 / (2 beta): the calibrated threshold is unused
    assert float(field.mesh_level(torch.tensor(field.surface_density(10.0)))) == pytest.approx(0.0, abs=1e-6)
    # A fresh SDF field is faint empty space, not a fog: its density starts far below the surface's.
    with torch.no_grad():
        fresh = TriplaneField(32, RendererConfig(geometry="sdf", sdf_beta=0.05))(planes * 0.01, points)[0]
    assert float(fresh.max()) < 0.1 * 0.5 / 0.05


def sphere_field(beta: float, radius: float, resolution: int = 64) -> tuple[TriplaneField, torch.Tensor]:
    """An SDF field whose zero level is the sphere |p| = radius: channel 0 of each plane holds u^2 + v^2, so the summed
    feature is 2 |p|^2, passed through the MLP's first unit and mapped by the last layer to s = softplus(2|p|^2) - c."""
    field = TriplaneField(8, RendererConfig(geometry="sdf", sdf_beta=beta, hidden=4))
    centres = (torch.arange(resolution) + 0.5) * 2.0 / resolution - 1.0
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    planes = torch.zeros(1, 3, 8, resolution, resolution)
    planes[0, :, 0] = u.square() + v.square()
    with torch.no_grad():
        for p in field.mlp.parameters():
            p.zero_()
        field.mlp[0].weight[0, 0] = 1.0
        field.mlp[2].weight[0, 0] = 1.0
        field.mlp[2].bias[0] = -float(torch.nn.functional.softplus(torch.tensor(2.0 * radius ** 2)))
    return field, planes


def test_meshes_are_cut_at_the_zero_level_more_exactly_than_at_a_density():
    """Marching cubes on the recovered -s lands on the true surface within a small part of a cell; on the density,
    which jumps from ~0 to ~1/beta within a cell, the same cut is off by a good part of one."""
    beta, radius, resolution = 0.008, 0.53, 47
    field, planes = sphere_field(beta, radius)
    density = lambda p: field(planes, p[None])[0][0].detach()  # noqa: E731
    cell = 2.0 / (resolution - 1)
    errors = {}
    for name, fn, level in (("sdf", lambda p: field.mesh_level(density(p)), 0.0),
                            ("density", density, field.surface_density(10.0))):
        mesh = extract_mesh(fn, resolution=resolution, threshold=level, coarse_resolution=resolution)
        assert len(mesh.faces) > 500
        errors[name] = np.abs(np.linalg.norm(mesh.vertices, axis=1) - radius).max() / cell
    assert errors["sdf"] < 0.08, errors
    assert errors["density"] > 2.0 * errors["sdf"], errors


def test_eikonal_loss_is_zero_for_a_distance():
    points = torch.rand(2, 301, 3) * 1.6 - 0.8
    distance = lambda planes, p: p.norm(dim=-1) - 0.3  # noqa: E731
    gradient = field_gradient(distance, None, points, 1e-3)
    assert float(eikonal_loss(gradient)) < 1e-4
    assert float(eikonal_loss(2.0 * gradient)) == pytest.approx(1.0, rel=1e-2)


@pytest.fixture(scope="module")
def sdf_cube(tmp_path_factory):
    """The tests' cube as an SDF field: s = 1.3 - 0.5 softplus(feature 0), negative where the three planes overlap,
    zero inside the box's faces."""
    return save_cube_checkpoint(tmp_path_factory.mktemp("sdf") / "sdf-cube.safetensors", -0.5, 1.3,
                                {"geometry": "sdf", "sdf_beta": 0.02}, [2.0, -3.0, -3.0])


def test_an_sdf_checkpoint_loads_and_generates_a_closed_mesh(sdf_cube):
    gen = Generator.from_checkpoint(sdf_cube)
    field = gen.models.vae.field
    assert field.is_sdf and field.beta == pytest.approx(0.02)
    options = GenerationOptions(steps=1, mesh_resolution=33, faces=0, preview_views=1, preview_size=24, texture=0)
    [result] = run(gen, [Request("a cube", 1, options, ("glb",))])
    glb = trimesh.load(io.BytesIO(result.exports["glb"]), file_type="glb", force="mesh")
    assert len(glb.faces) > 100 and glb.is_watertight
    # The pipeline cuts s = 0, recovered from density: the same surface as marching cubes on the field's own -s.
    planes = result.triplane[None]
    with torch.no_grad():
        direct = extract_mesh(lambda p: -field.sdf(planes, p[None])[0], resolution=33, threshold=0.0)
    assert len(direct.vertices) == len(result.mesh.vertices)
    gap, _ = cKDTree(direct.vertices).query(result.mesh.vertices)
    assert gap.max() < 1e-3 * 2.0 / 32


def test_vae_trains_an_sdf_field_logs_the_eikonal_loss_and_resumes_exactly(tmp_path, monkeypatch):
    data = tmp_path / "synth"
    generate(data, objects=4, views=6, size=32, seed=3, val_fraction=0.25)
    cfg = dict(data=str(data), steps=3, batch_size=2, rays_per_object=64, target_views=2, eval_every=1000,
               eval_objects=1, warmup=1, seed=5, geometry="sdf", sdf_beta=0.03, depth_weight=0.0)
    straight, log = vae_resumes_exactly(monkeypatch, lambda name, resume: vae_training.VAETrainConfig(
        out=str(tmp_path / name), resume=resume, **cfg))
    assert len(log) == 3 and all(r["eikonal"] > 0 and r["normal"] > 0 for r in log)
    for r in log:  # the logged total is the weighted sum of the logged parts
        total = r["l1"] + 0.5 * r["mask"] + 1e-5 * r["kl"] + 0.1 * r["normal"] + 0.1 * r["eikonal"]
        assert r["loss"] == pytest.approx(total, abs=1e-4)
    model = load_models(straight)
    assert model.config.renderer.geometry == "sdf" and model.vae.field.beta != pytest.approx(0.03)  # beta is learned
    with pytest.raises(ValueError, match="not an SDF"):
        vae_training.VAEObjective(random_models("tiny").vae, 1e-5, 0.5, eikonal_weight=0.1)


def test_an_onnx_field_engine_meshes_the_sdf_surface_as_eager(sdf_cube, tmp_path):
    """Engines return density only: the mesh cut at s = 0 recovered from the ONNX field's density is eager's."""
    from conftest import TOLERANCES

    from export.build_engine import build_engine

    manifest = build_engine(sdf_cube, tmp_path / "engine", "onnx", components=("field",), progress=False)
    [field] = [e for e in manifest.components if e.component == "field"]
    # Densities reach 1 / beta = 50, not ~1 as a density field's: the float32 tolerance scales with them.
    assert field.backend == "onnx" and max(field.max_abs_error.values()) < TOLERANCES["field"] / 0.02
    options = GenerationOptions(steps=1, mesh_resolution=29, faces=0, preview_views=0, texture=0)
    meshes = [next(run(Generator.from_checkpoint(sdf_cube, backend=b, engine_dir=tmp_path / "engine"),
                       [Request("a cube", 2, options)])).mesh for b in ("eager", "onnx")]
    assert len(meshes[0].faces) > 100 and len(meshes[1].faces) == len(meshes[0].faces)
    gap, _ = cKDTree(meshes[0].vertices).query(meshes[1].vertices)
    assert gap.max() < 1e-3 * 2.0 / 28
