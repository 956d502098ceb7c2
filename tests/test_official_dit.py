"""Parity of the official denoisers with `dit-{t23d,i23d}-small.safetensors`, and the full-size key manifests.

The fixtures hold random weights under the official `ddpm_model.*` keys and the outputs the official
code computed from them (see ../shared/official-ln3diff/README.md); tolerances are its suggested ones.
The manifest tests build the full-size models on the meta device.
"""

import json

import pytest
import torch
from conftest import shared_path
from safetensors import safe_open
from safetensors.torch import load_file

from ln3diff_rt.official.dit import (
    DIT_PREFIX,
    OfficialDiTConfig,
    build_official_dit,
    dit_state_from_official,
    infer_dit_config,
    is_unused_dit_key,
)
from ln3diff_rt.official.layers import triplane_pos_embed
from ln3diff_rt.official.layout import official_to_project_latent, project_to_official_latent

ATOL = 1e-5
KINDS = ("t23d", "i23d")


def fixture_path(kind: str):
    return shared_path("official-ln3diff", f"dit-{kind}-small.safetensors")


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def fixture(kind) -> dict[str, torch.Tensor]:
    return load_file(fixture_path(kind))


@pytest.fixture(scope="module")
def model(fixture):
    state = dit_state_from_official(fixture)
    dit = build_official_dit(infer_dit_config({k: v.shape for k, v in state.items()}))
    dit.load_state_dict(state, strict=True)
    return dit.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_config_inferred_from_the_small_fixture(kind, model):
    with safe_open(fixture_path(kind), "pt") as f:
        small = json.loads(f.metadata()["config"])["small_overrides"]
    cfg = model.config
    assert cfg.kind == kind
    assert (cfg.depth, cfg.width, cfg.heads, cfg.patch_size) == (
        small["depth"], small["hidden_size"], small["num_heads"], small["patch_size"])
    assert (cfg.latent_channels, cfg.latent_size, cfg.mlp_ratio) == (4, 32, 4)
    expected = {"t23d": (768, 0, 0), "i23d": (1024, 1024, 768)}[kind]
    assert (cfg.context_dim, cfg.dino_dim, cfg.pooled_dim) == expected


def test_heads_given_must_agree_and_missing_keys_are_named(fixture):
    shapes = {k: v.shape for k, v in dit_state_from_official(fixture).items()}
    assert infer_dit_config(shapes, heads=2).heads == 2
    with pytest.raises(ValueError, match="means 2 heads of 64"):
        infer_dit_config(shapes, heads=16)
    with pytest.raises(KeyError, match="x_embedder.proj.weight"):
        infer_dit_config({})


def test_positional_table_is_the_official_formula(fixture):
    assert torch.equal(triplane_pos_embed(64, 16)[None], fixture[DIT_PREFIX + "pos_embed"])


@torch.no_grad()
def test_outputs_match_official_cond_and_uncond(model, fixture):
    x = official_to_project_latent(fixture["fixture.x_t"])
    ctx, vec = fixture["fixture.cond.crossattn"], fixture["fixture.cond.vector"]
    out = model(x, fixture["fixture.timesteps"], ctx, vec)
    assert max_err(project_to_official_latent(out), fixture["fixture.out.cond"]) < ATOL
    out = model(x, fixture["fixture.timesteps"], torch.zeros_like(ctx), torch.zeros_like(vec))
    assert max_err(project_to_official_latent(out), fixture["fixture.out.uncond"]) < ATOL
    assert max_err(fixture["fixture.out.cond"], fixture["fixture.out.uncond"]) > 0.1  # the condition matters


@torch.no_grad()
def test_intermediates_match_official_debug_values(kind, model, fixture):
    """Module outputs caught by forward hooks against `fixture.debug.*` (batch element 0 where named b0)."""
    caught = {}
    names = {"t_embedder": "t_embedder_out", "x_embedder": "b0.x_embedder_out", "blocks.0": "b0.block0_out",
             "final_layer": "b0.final_layer_out"}
    names |= {"clip_text_proj": "b0.context_proj_out"} if kind == "t23d" else {
        "cap_embedder": "cap_embedder_out", "dino_proj": "b0.dino_proj_out", "adaLN_modulation": "adaLN_modulation_out"}
    hooks = [model.get_submodule(m).register_forward_hook(lambda _, __, out, m=m: caught.__setitem__(m, out))
             for m in names]
    try:
        model(official_to_project_latent(fixture["fixture.x_t"]), fixture["fixture.timesteps"],
              fixture["fixture.cond.crossattn"], fixture["fixture.cond.vector"])
    finally:
        for h in hooks:
            h.remove()
    for module, name in names.items():
        expected = fixture[f"fixture.debug.cond.{name}"]
        got = caught[module]
        if name.startswith("b0."):
            got = got[0].reshape(expected.shape)  # x_embedder: [768, D] -> [3 planes, 256, D]
        assert max_err(got, expected) < ATOL, name
    if kind == "i23d":  # zero inputs still give a non-zero caption embedding (LayerNorm and Linear biases)
        uncond = model.cap_embedder(torch.zeros_like(fixture["fixture.cond.vector"]))
        assert max_err(uncond, fixture["fixture.debug.uncond.cap_embedder_out"]) < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_manifest_maps_one_to_one(kind):
    """Every official `ddpm_model.*` key is built with its shape, or is dropped by name as unused."""
    manifest = json.loads(shared_path("official-ln3diff", f"keys-{kind}.json").read_text())["keys"]
    official = {k[len(DIT_PREFIX):]: v for k, v in manifest.items() if k.startswith(DIT_PREFIX)}
    shapes = {k: tuple(v["shape"]) for k, v in official.items()}
    cfg = infer_dit_config(shapes)
    assert cfg == getattr(OfficialDiTConfig, kind)()  # the published preset: 24 blocks, width 1024, 16 heads
    with torch.device("meta"):
        model = build_official_dit(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = {k for k in shapes if k not in ours}
    assert all(is_unused_dit_key(k) for k in dropped)
    assert dropped == {k for k, v in official.items() if not v["used_in_generation"]}
    assert ours == {k: s for k, s in shapes.items() if k not in dropped}
    assert set(dit_state_from_official({DIT_PREFIX + k: None for k in shapes})) == set(ours)


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_forward_shapes_on_meta(kind):
    cfg = getattr(OfficialDiTConfig, kind)()
    with torch.device("meta"):
        model = build_official_dit(cfg)
        x = torch.empty(2, 3, 4, 32, 32)
        ctx = torch.empty(2, 77 if kind == "t23d" else 256, cfg.context_dim + cfg.dino_dim)
        out = model(x, torch.zeros(2), ctx, torch.empty(2, 768))
    assert out.shape == x.shape
