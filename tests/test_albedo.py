"""The field's albedo head (issue 18, item 5): assets carry the unlit base colour, previews the lit colour."""

import io
import json

import numpy as np
import pytest
import torch
import trimesh
from conftest import save_cube_checkpoint, vae_resumes_exactly

import training.vae as vae_training
from ln3diff_rt.checkpoint import load_models
from ln3diff_rt.config import ModelConfig, RendererConfig, get_preset
from ln3diff_rt.models.field import TriplaneField
from ln3diff_rt.models.projected_field import ProjectedTriplaneField
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT, Generator
from ln3diff_rt.random_weights import random_models
from ln3diff_rt.runner import Request, run
from training.data.synth import generate

RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def test_configs_without_the_field_load_as_before(pre_v2_checkpoint):
    raw = json.loads(get_preset("tiny").to_json())
    del raw["renderer"]["albedo"]  # what checkpoints written before the head store
    assert ModelConfig.from_json(json.dumps(raw)) == get_preset("tiny")
    field = load_models(pre_v2_checkpoint).vae.field
    assert load_models(DEFAULT_CHECKPOINT).vae.field.has_albedo  # the shipped model since v2 (issue 18)
    assert not field.has_albedo and field.mlp[2].out_features == 4
    with pytest.raises(ValueError, match="no albedo head"):
        field.albedo(torch.zeros(1, 3, 32, 8, 8), torch.zeros(1, 5, 3))


def test_albedo_head_is_three_more_outputs_and_the_projected_form_matches():
    torch.manual_seed(0)
    field = TriplaneField(32, RendererConfig(albedo=True))
    assert field.mlp[2].out_features == 7
    planes, points = torch.randn(1, 3, 32, 16, 16), torch.rand(1, 1000, 3) * 2.2 - 1.1  # some outside the box
    density, rgb = field(planes, points)
    albedo = field.albedo(planes, points)
    assert density.shape == (1, 1000) and rgb.shape == albedo.shape == (1, 1000, 3)
    assert (rgb - albedo).abs().max() > 0.1  # separate outputs, not a copy
    projected = ProjectedTriplaneField(field)
    d2, rgb2 = projected(planes, points)
    torch.testing.assert_close(d2, density, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rgb2, rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projected.albedo(planes, points), albedo, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no albedo head"):
        ProjectedTriplaneField(TriplaneField(32, RendererConfig())).albedo(planes, points)


@pytest.fixture(scope="module")
def red_lit_green_albedo(tmp_path_factory):
    """The tests' cube with an albedo head: lit colour red, albedo green."""
    colours = [*(20.0 * torch.tensor(RED) - 10.0), *(20.0 * torch.tensor(GREEN) - 10.0)]
    return save_cube_checkpoint(tmp_path_factory.mktemp("albedo") / "albedo-cube.safetensors", 10.0, -15.0,
                                {"albedo": True}, colours)


def test_meshes_and_textures_carry_the_albedo_and_previews_the_lit_colour(red_lit_green_albedo):
    gen = Generator.from_checkpoint(red_lit_green_albedo)
    assert gen.models.vae.field.has_albedo
    options = GenerationOptions(steps=1, mesh_resolution=32, faces=0, preview_views=1, preview_size=32, texture=0)
    [plain] = run(gen, [Request("a cube", 1, options, ("glb",))])
    glb = trimesh.load(io.BytesIO(plain.exports["glb"]), file_type="glb", force="mesh")
    colours = np.asarray(glb.visual.vertex_colors)[:, :3] / 255.0
    assert len(colours) > 100
    np.testing.assert_allclose(colours, np.broadcast_to(GREEN, colours.shape), atol=0.01)
    centre = plain.previews[0][12:20, 12:20] / 255.0  # the cube fills the middle of the frame
    np.testing.assert_allclose(centre, np.broadcast_to(RED, centre.shape), atol=0.05)
    [textured] = run(gen, [Request("a cube", 1, options.replace(texture=64, preview_views=0), ("glb",))])
    glb = trimesh.load(io.BytesIO(textured.exports["glb"]), file_type="glb", force="mesh")
    texture = np.asarray(glb.visual.material.baseColorTexture.convert("RGB")) / 255.0
    np.testing.assert_allclose(texture, np.broadcast_to(GREEN, texture.shape), atol=0.01)
    with torch.no_grad():
        lit = gen.colour_fn(plain.triplane, lit=True)(torch.zeros(4, 3))
    np.testing.assert_allclose(lit.numpy(), np.broadcast_to(RED, (4, 3)), atol=0.01)


def test_asset_colour_queries_the_albedo_alone_and_a_cancelled_object_stops_in_its_bake(red_lit_green_albedo,
                                                                                       monkeypatch):
    """The albedo is one MLP pass (no density from the field alongside), still behind the runner's cancellation
    check: an object given up while its texture bakes stops before the next chunk of texels."""
    import ln3diff_rt.runner as runner

    gen = Generator.from_checkpoint(red_lit_green_albedo)
    with torch.no_grad():
        planes = gen.decode(torch.randn(1, *gen.config.latent_shape, generator=torch.Generator().manual_seed(0)))[0]
    fields, checks = [], []

    def field(planes, points):
        fields.append(points.shape[1])
        return gen.components.field(planes, points)

    points = torch.rand(37, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        albedo = gen.colour_fn(planes, field, check=lambda: checks.append(1))(points)
        assert fields == [] and checks == [1]
        torch.testing.assert_close(albedo, gen.models.vae.field.albedo(planes[None], points[None])[0])
        lit = gen.colour_fn(planes, field, lit=True, check=lambda: checks.append(1))(points)
        assert fields == [37] and checks == [1]  # the lit colour is the field's, which checks for itself
        torch.testing.assert_close(lit, gen.components.field(planes[None], points[None])[1][0])

    wanted, queried = [True], []
    bake = runner.bake_texture

    def give_up_while_baking(mesh, colour, size, chunk):
        wanted[0] = False  # the client leaves once the bake has begun

        def counted(p):
            out = colour(p)
            queried.append(len(p))
            return out

        return bake(mesh, counted, size, chunk)

    monkeypatch.setattr(runner, "bake_texture", give_up_while_baking)
    options = GenerationOptions(steps=1, mesh_resolution=32, faces=0, preview_views=0, texture=64)
    assert list(run(gen, [Request("a cube", 1, options, ("glb",))], alive=lambda i: wanted[0])) == []
    assert queried == []  # without the check every texel would have been queried first


def test_vae_trains_the_albedo_head_logs_its_loss_and_resumes_exactly(tmp_path, monkeypatch):
    data = tmp_path / "synth"
    generate(data, objects=4, views=6, size=32, seed=3, val_fraction=0.25)
    cfg = dict(data=str(data), steps=3, batch_size=2, rays_per_object=64, target_views=2, eval_every=1000,
               eval_objects=1, warmup=1, seed=5, albedo=True, depth_weight=0.0, normal_weight=0.0)
    straight, log = vae_resumes_exactly(monkeypatch, lambda name, resume: vae_training.VAETrainConfig(
        out=str(tmp_path / name), resume=resume, **cfg))
    assert len(log) == 3 and all(r["albedo"] > 0 for r in log)
    for r in log:  # the logged total is the weighted sum of the logged parts
        total = r["l1"] + 0.5 * r["mask"] + 1e-5 * r["kl"] + 1.0 * r["albedo"]
        assert r["loss"] == pytest.approx(total, abs=1e-4)
    model = load_models(straight)
    assert model.config.renderer.albedo and model.vae.field.mlp[2].out_features == 7
    with pytest.raises(ValueError, match="no albedo head"):
        vae_training.VAEObjective(random_models("tiny").vae, 1e-5, 0.5, albedo_weight=1.0)
