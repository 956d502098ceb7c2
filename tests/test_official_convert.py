"""`ln3diff convert`: released joint checkpoints -> project checkpoints, strictly; the result generates like any other.

The joint files are assembled in a temp dir from the parity fixtures (the DiT's `ddpm_model.*` and the VAE
decoder's `rec_model.decoder.*`, random weights computed by the official code), as a release holds them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SIGMA_BIAS, converted_official, official_joint_state, shared_path
from safetensors.torch import load_file, save_file

from ln3diff_rt.checkpoint import CheckpointError, load_models
from ln3diff_rt.cli import main
from ln3diff_rt.official.convert import convert
from ln3diff_rt.official.field import triplane_to_official
from ln3diff_rt.official.layout import official_to_project_latent
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import generate


def fixture_tensors(name: str) -> tuple[dict, dict]:
    """(weights, fixture.* tensors) of one parity file."""
    everything = load_file(shared_path("official-ln3diff", f"{name}.safetensors"))
    weights = {k: v for k, v in everything.items() if not k.startswith("fixture.")}
    return weights, {k.removeprefix("fixture."): v for k, v in everything.items() if k.startswith("fixture.")}


@pytest.fixture(scope="module")
def converted_t23d(tmp_path_factory):
    return converted_official("t23d", tmp_path_factory.mktemp("t23d"))


def test_converted_model_reproduces_the_official_outputs(converted_t23d):
    models = load_models(converted_t23d)
    _, dit_fx = fixture_tensors("dit-t23d-small")
    x = official_to_project_latent(dit_fx["x_t"])
    with torch.no_grad():
        eps = models.dit(x, dit_fx["timesteps"], dit_fx["cond.crossattn"], dit_fx["cond.vector"])
    torch.testing.assert_close(eps, official_to_project_latent(dit_fx["out.cond"]), rtol=0, atol=1e-5)
    _, vae_fx = fixture_tensors("vae-small")
    with torch.no_grad():
        planes = models.vae.decode(official_to_project_latent(vae_fx["latent"]))
    torch.testing.assert_close(triplane_to_official(planes), vae_fx["triplane"], rtol=0, atol=1e-5)
    cfg = models.config
    assert cfg.preset == "official-t23d" and cfg.objective == "eps" and cfg.latent_scale == 0.96806
    assert (cfg.official_dit.depth, cfg.official_dit.width, cfg.official_dit.heads) == (2, 64, 2)
    assert (cfg.official_vae.depth, cfg.official_vae.heads, cfg.triplane_resolution) == (4, 2, 32)


def test_i23d_converts_and_a_wrong_kind_is_named(tmp_path):
    save_file(official_joint_state("i23d"), tmp_path / "joint.safetensors")
    cfg = convert("i23d", tmp_path / "joint.safetensors", tmp_path / "i23d.safetensors", vae_heads=2)
    assert cfg.objective == "flow-data" and cfg.official_dit.dino_dim == 1024
    with pytest.raises(CheckpointError, match="official-i23d DiT, not official-t23d"):
        convert("t23d", tmp_path / "joint.safetensors", tmp_path / "x.safetensors", vae_heads=2)


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.pop("ddpm_model.blocks.1.attn.qkv.weight"), r"missing \['blocks.1.attn.qkv.weight'\]"),
    (lambda s: s.update({"ddpm_model.blocks.0.extra.weight": torch.zeros(3)}), "unexpected.*blocks.0.extra.weight"),
    (lambda s: s.update({"optimizer.step": torch.zeros(1)}), r"unexpected keys \['optimizer.step'\]"),
    (lambda s: s.update({"ddpm_model.final_layer.linear.bias": torch.zeros(15)}),
     r"final_layer.linear.bias: file \(15,\) vs model \(16,\)"),
    (lambda s: s.update({"ddpm_model.blocks.0.mlp.mlp.1.bias": torch.ones(256)}), "mlp.mlp.1.bias is not zero"),
    (lambda s: s[SIGMA_BIAS].__setitem__(0, float("nan")), "NaN or infinite"),
    (lambda s: s["ddpm_model.pos_embed"].mul_(1.01), "pos_embed is not the frozen sin-cos table"),
])
def test_converter_names_what_is_wrong(tmp_path, damage, message):
    state = official_joint_state("t23d")
    damage(state)
    save_file(state, tmp_path / "joint.safetensors")
    with pytest.raises(CheckpointError, match=message):
        convert("t23d", tmp_path / "joint.safetensors", tmp_path / "out.safetensors", vae_heads=2)
    assert not (tmp_path / "out.safetensors").exists()


def test_zero_mlp_bias_and_pt_files_are_accepted(tmp_path):
    state = official_joint_state("t23d")
    state["ddpm_model.blocks.0.mlp.mlp.1.bias"] = torch.zeros(256)  # xformers' untrained bias, if a release has it
    torch.save(state, tmp_path / "joint.pt")
    cfg = convert("t23d", tmp_path / "joint.pt", tmp_path / "model.safetensors", vae_heads=2)
    assert cfg.official_dit.depth == 2
    torch.save({"state": state, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="flat state dict"):
        convert("t23d", tmp_path / "nested.pt", tmp_path / "x.safetensors", vae_heads=2)


def test_vae_heads_are_asked_for_off_the_published_width(tmp_path):
    save_file(official_joint_state("t23d"), tmp_path / "joint.safetensors")
    assert main(["convert", "official-t23d", "--ckpt", str(tmp_path / "joint.safetensors"),
                 "--out", str(tmp_path / "m.safetensors")]) == 2


@pytest.fixture(scope="module")
def surfaced_t23d(tmp_path_factory):
    return converted_official("t23d", tmp_path_factory.mktemp("surfaced"), surfaced=True)


def test_generate_cli_writes_a_glb_from_the_converted_model(surfaced_t23d, tiny_clip_dir, tmp_path, capsys):
    code = main(["generate", "a red car", "--ckpt", str(surfaced_t23d), "--text-encoder", str(tiny_clip_dir),
                 "--out", str(tmp_path), "--seed", "2", "--steps", "4", "--resolution", "48", "--views", "1",
                 "--preview-size", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "a-red-car_s2.glb").stat().st_size > 1000 and "faces" in out


def test_samplers_of_the_eps_model(surfaced_t23d, tiny_clip_dir, capsys):
    gen = Generator.from_checkpoint(surfaced_t23d, text_encoder=str(tiny_clip_dir))
    assert gen.samplers == ("euler", "dpmpp_2m")
    defaults = gen.default_options()
    assert (defaults.sampler, defaults.steps, defaults.guidance, defaults.mesh_resolution) == ("dpmpp_2m", 25, 6.5, 192)
    fast = GenerationOptions(steps=3, mesh_resolution=32, preview_views=0, sampler="euler")
    a, b = (generate(gen, ["a chair"], [5], fast.replace(sampler=s))[0].latent for s in ("euler", "dpmpp_2m"))
    assert a.shape == (3, 4, 32, 32) and not torch.allclose(a, b)
    assert main(["generate", "a chair", "--ckpt", str(surfaced_t23d), "--text-encoder", str(tiny_clip_dir),
                 "--sampler", "heun"]) == 2
    assert "--sampler='heun': expected one of euler, dpmpp_2m" in capsys.readouterr().err


@pytest.mark.slow
def test_build_engine_takes_the_converted_model(converted_t23d, tiny_clip_dir, tmp_path):
    """ONNX engines of the official denoiser and decoder, loaded back as a backend, match eager."""
    from export.build_engine import build_engine

    manifest = build_engine(converted_t23d, tmp_path / "engine", "onnx", components=("denoiser", "decoder"),
                            progress=False)
    assert max(max(e.max_abs_error.values()) for e in manifest.components if e.file) < 1e-4
    options = GenerationOptions(steps=2, sampler="euler", mesh_resolution=16, preview_views=0, texture=0)
    eager, onnx = (Generator.from_checkpoint(converted_t23d, backend=b, engine_dir=tmp_path / "engine",
                                             text_encoder=str(tiny_clip_dir)) for b in ("eager", "onnx"))
    a, b = (generate(g, ["a chair"], [4], options)[0] for g in (eager, onnx))
    torch.testing.assert_close(b.latent, a.latent, rtol=0, atol=1e-3)  # two guided steps of a random DiT
    # The decoders agree on unit-scale latents (the build's check above, < 1e-4). On this sampled latent, ten
    # times that scale, the random-weight decoder's attention turns near one-hot and magnifies float rounding
    # (measured: 4e-3 at scale 10 against 6e-6 at scale 1), so only the end-to-end run is asserted there.
    assert b.triplane.shape == a.triplane.shape and torch.isfinite(b.triplane).all()
