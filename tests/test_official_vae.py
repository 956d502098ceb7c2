"""Parity of the official VAE decoder, field and renderer conventions with `vae-small.safetensors`.

The fixture holds random weights under the official `rec_model.decoder.*` keys and the outputs the
official code computed from them (see ../shared/official-ln3diff/README.md); tolerances are its
suggested ones. The manifest test builds the full-size decoder on the meta device.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from safetensors import safe_open
from safetensors.torch import load_file
from skimage.measure import marching_cubes

from ln3diff_rt.meshing import extract_mesh, sample_density_grid
from ln3diff_rt.official.field import (
    MESH_DENSITY_LEVEL,
    MESH_SIGMA_LEVEL,
    points_from_official,
    triplane_from_official,
    triplane_to_official,
)
from ln3diff_rt.official.layout import official_to_project_latent
from ln3diff_rt.official.render import official_rays, render_official
from ln3diff_rt.official.vae import (
    DECODER_PREFIX,
    UNUSED_DECODER_KEYS,
    OfficialVAEConfig,
    OfficialVAEDecoder,
    decoder_state_from_official,
    infer_vae_config,
    token_images,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(shared_path("official-ln3diff", "vae-small.safetensors"))


@pytest.fixture(scope="module")
def decoder(fixture) -> OfficialVAEDecoder:
    path = shared_path("official-ln3diff", "vae-small.safetensors")
    with safe_open(path, "pt") as f:
        heads = json.loads(f.metadata()["config"])["small_vit_decoder_overrides"]["num_heads"]
    state = decoder_state_from_official(fixture)
    model = OfficialVAEDecoder(infer_vae_config({k: v.shape for k, v in state.items()}, heads=heads))
    model.load_state_dict(state, strict=True)
    return model.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_config_inferred_from_the_small_fixture(decoder):
    cfg = decoder.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden) == (64, 4, 2, 256)
    assert (cfg.sr_channels, cfg.sr_ch_mult, cfg.sr_res_blocks, cfg.triplane_channels) == (32, (1, 2), 1, 32)
    assert (cfg.latent_channels, cfg.latent_size, cfg.patch_size, cfg.triplane_resolution) == (4, 32, 2, 32)


def test_heads_must_be_given_off_the_published_width(fixture):
    shapes = {k: v.shape for k, v in decoder_state_from_official(fixture).items()}
    with pytest.raises(ValueError, match="head count"):
        infer_vae_config(shapes)
    with pytest.raises(KeyError, match="vit_decoder.pos_embed"):
        infer_vae_config({}, heads=2)


@torch.no_grad()
def test_decoder_intermediates_and_triplane(decoder, fixture):
    latent = fixture["fixture.latent"]  # [2, 12, 32, 32], official channel order
    c = decoder.superresolution.ldm_upsample(latent)
    assert max_err(c[:1], fixture["fixture.debug.b0.tokens_after_ldm_upsample"]) < ATOL
    tokens = decoder.vit_decoder(c)
    assert max_err(tokens[:1], fixture["fixture.debug.b0.tokens_after_vit_decoder"]) < ATOL
    assert max_err(token_images(tokens)[:3], fixture["fixture.debug.b0.conv_sr_input"]) < ATOL
    planes = decoder(official_to_project_latent(latent))  # the project's layout in and out
    assert planes.shape == (2, 3, 32, 32, 32)
    assert max_err(triplane_to_official(planes), fixture["fixture.triplane"]) < ATOL


@torch.no_grad()
def test_field_points_and_grid(decoder, fixture):
    planes = triplane_from_official(fixture["fixture.triplane"])
    sigma, rgb = decoder.field.raw(planes, points_from_official(fixture["fixture.points.xyz"]))
    assert max_err(sigma, fixture["fixture.points.sigma"][..., 0]) < ATOL
    assert max_err(rgb, fixture["fixture.points.rgb"]) < ATOL
    # The official grid linspace(-0.45, 0.45, 9)^3 is the mesher's 9^3 grid over the project box [-1, 1]^3.
    for b in range(2):
        def raw_sigma(points, b=b):
            return decoder.field.raw(planes[b:b + 1], points[None])[0][0]

        grid, _ = sample_density_grid(raw_sigma, 9, MESH_SIGMA_LEVEL, bound=1.0, stride=1, chunk=4096)
        assert max_err(torch.from_numpy(grid), fixture["fixture.grid.sigma"][b, ..., 0]) < ATOL
    xyz = fixture["fixture.grid.xyz"].reshape(1, -1, 3).expand(2, -1, -1)
    density, rgb = decoder.field(planes, points_from_official(xyz))
    assert max_err(rgb, fixture["fixture.grid.rgb"].reshape(2, -1, 3)) < ATOL
    # Density per project unit: softplus(sigma - 1) per official unit, and a project unit is 0.45 of those.
    expected = F.softplus(fixture["fixture.grid.sigma"].reshape(2, -1) - 1.0) * 0.45
    assert max_err(density, expected) < ATOL


@torch.no_grad()
def test_rays_and_render_with_injected_uniforms(decoder, fixture):
    def f(name: str) -> torch.Tensor:
        return fixture["fixture.render." + name]

    origins, dirs = official_rays(f("c"), 8)
    assert max_err(origins, f("ray_origins")) < 1e-6
    assert max_err(dirs, f("ray_directions")) < 1e-6
    planes = triplane_from_official(fixture["fixture.triplane"])
    out = render_official(decoder.field, planes, f("c"), 8, f("u_stratified")[..., 0], f("u_importance"))
    assert max_err(out.depths_coarse, f("depths_coarse")[..., 0]) < ATOL
    assert max_err(out.weights_coarse, f("weights_coarse")[..., 0]) < ATOL
    assert max_err(out.depths_fine, f("depths_fine")[..., 0]) < ATOL
    assert max_err(out.weights_final, f("weights_final")[..., 0]) < ATOL
    assert max_err(out.rgb, f("image_raw")) < ATOL
    assert max_err(out.depth, f("image_depth")) < ATOL
    assert max_err(out.alpha, f("weights_samples")) < ATOL
    assert max_err(out.alpha * 1.002 - 0.001, f("image_mask")) < ATOL


def test_full_size_manifest_maps_one_to_one():
    manifest = json.loads(shared_path("official-ln3diff", "keys-t23d.json").read_text())["keys"]
    official = {k[len(DECODER_PREFIX):]: v for k, v in manifest.items() if k.startswith(DECODER_PREFIX)}
    shapes = {k: tuple(v["shape"]) for k, v in official.items()}
    cfg = infer_vae_config(shapes)
    assert cfg == OfficialVAEConfig()  # the published preset, heads by default
    assert cfg.triplane_resolution == 128
    with torch.device("meta"):
        model = OfficialVAEDecoder(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = {k for k in shapes if k not in ours}
    assert dropped == set(UNUSED_DECODER_KEYS)
    assert dropped == {k for k, v in official.items() if not v["used_in_generation"]}
    assert ours == {k: s for k, s in shapes.items() if k not in dropped}


@torch.no_grad()
def test_project_mesher_gives_the_official_dense_surface(decoder, fixture):
    """extract_mesh on the project box at raw sigma 10 = skimage marching cubes on the official grid."""
    field = copy.deepcopy(decoder.field)
    field.net[2].bias[0] += 7.0  # the fixture's sigma spans about [-1.5, 5]: move it across the level 10
    planes = triplane_from_official(fixture["fixture.triplane"][:1])
    res = 33
    axis = torch.linspace(-0.45, 0.45, res)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # [res]^3 x (x, y, z)
    sigma = field.raw(planes, points_from_official(xyz.reshape(1, -1, 3)))[0][0].reshape(res, res, res).numpy()
    assert sigma.min() < MESH_SIGMA_LEVEL < sigma.max()
    verts, faces, _, _ = marching_cubes(sigma, level=MESH_SIGMA_LEVEL, allow_degenerate=False)
    official = (verts / (res - 1) * 2 - 1) * 0.45  # the official vertex mapping, world units

    def raw_sigma(points):
        return field.raw(planes, points[None])[0][0]

    mesh = extract_mesh(raw_sigma, resolution=res, threshold=MESH_SIGMA_LEVEL, bound=1.0, coarse_resolution=res)
    assert len(mesh.faces) == len(faces) > 100
    np.testing.assert_allclose(mesh.vertices * 0.45, official, atol=1e-5)
    np.testing.assert_array_equal(mesh.faces, faces[:, ::-1])
    # The density `forward` returns, at MESH_DENSITY_LEVEL, puts exactly the same grid nodes inside.
    density, _ = sample_density_grid(lambda p: field(planes, p[None])[0][0], res, MESH_DENSITY_LEVEL, bound=1.0,
                                     stride=1, chunk=2 ** 16)
    np.testing.assert_array_equal(density > MESH_DENSITY_LEVEL, sigma > MESH_SIGMA_LEVEL)

