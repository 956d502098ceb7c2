"""Shared pytest setup.

TRITON_INTERPRET must be set before triton is first imported: it makes every Triton kernel run on
the CPU through the interpreter, which is how the kernel tests check kernels without a GPU. It is
a default only (setdefault), so a GPU run can export TRITON_INTERPRET=0; it changes nothing for
tests that do not launch Triton kernels.
"""

import contextlib
import dataclasses
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# One intra-op thread: the test tensors are small, and with two threads a second busy process on a
# 2-core machine makes OpenMP spin-waits cost 10-100x (measured: a 2-s fixture took 400 s).
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# `../shared` sits beside the project in the team's checkouts and in CI; a user's clone lacks it.
# LN3DIFF_SHARED points elsewhere (a clone made in /tmp, say).
SHARED_DIR = Path(os.environ.get("LN3DIFF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OFFICIAL_DIR = SHARED_DIR / "official-ln3diff"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a pytest skip naming what is missing and why."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures sit beside the project in CI and team checkouts only")
    return path


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) writes bytes as, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random-weight CLIP text model (`CLIPTextModel`, width 768 like CLIP ViT-L/14's so it feeds the official
    DiT's context, 1 layer, 77 positions, the published config's bos/pad/eos ids and quick_gelu) and a working
    `CLIPTokenizer` (a byte-level vocabulary without merges: one token per character) in a transformers
    directory, fixed seed. Builds in well under a second."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("tiny-clip")
    symbols = _bytes_to_unicode()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]  # specials last, as CLIP
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=0, pad_token_id=1, eos_token_id=2)  # eos 2: pooled at the highest id's token
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPTextModel(config).eval().save_pretrained(path)
    return path


# -- a usable random model, and the engine-vs-eager checks the backend test files share ------------------

# Max |engine - eager| allowed at fp32 on the CPU, with what was measured on the tiny model in brackets.
# The text transformer differs most (SDPA vs decomposed attention over 6 BERT layers, hidden states ~5).
TOLERANCES = {
    "text_encoder": 5e-4,  # context (7e-5); pooled is L2-normalised (2e-7)
    "denoiser": 1e-5,  # velocity (5e-7)
    "decoder": 5e-5,  # tri-planes (3e-6)
    "field": 1e-5,  # density, rgb (2e-7)
    "latents": 1e-4,  # after 2 CFG Euler steps (1e-6)
}
PROMPTS = ["a red cube", "a wooden chair", "a blue teapot", "a tall lamp"]


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset with random weights that do real work (`ln3diff_rt.random_weights`), saved once a session."""
    from ln3diff_rt.random_weights import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("random-tiny") / "tiny.safetensors")


@pytest.fixture(scope="session")
def pre_v2_checkpoint(random_tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny checkpoint as written before fields had an albedo head or an SDF (issue 18): its stored config has
    no renderer.albedo, geometry or sdf_beta. (The shipped model was one until it became v2.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ln3diff_rt.checkpoint import CONFIG_KEY

    with safe_open(random_tiny_checkpoint, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    config = json.loads(metadata[CONFIG_KEY])
    for key in ("albedo", "geometry", "sdf_beta"):
        del config["renderer"][key]
    metadata[CONFIG_KEY] = json.dumps(config)
    path = tmp_path_factory.mktemp("pre-v2") / "tiny.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def save_cube_checkpoint(path: Path, density_weight: float, density_bias: float, renderer: dict | None = None,
                         colour_bias: list[float] | None = None) -> Path:
    """The tiny preset with random weights, except that the decoder's last conv gives a near-constant tri-plane
    (channel 0 ~ 1, the rest small and latent-dependent) and the field's first output is density_weight x
    softplus(summed feature 0) + density_bias, so that the three planes overlapping inside the box make a
    rounded cube. `renderer` replaces RendererConfig fields (the field is rebuilt to match) and `colour_bias`
    sets the other outputs to constants (their weights zero); else they keep their random weights."""
    from ln3diff_rt.checkpoint import save_checkpoint
    from ln3diff_rt.config import get_preset
    from ln3diff_rt.models.field import TriplaneField
    from ln3diff_rt.random_weights import random_models

    cfg = get_preset("tiny")
    models = random_models("tiny", seed=0)
    vae = models.vae
    if renderer:
        cfg = cfg.replace(renderer=dataclasses.replace(cfg.renderer, **renderer))
        vae.field, vae.cfg = TriplaneField(cfg.decoder.triplane_channels, cfg.renderer), cfg
    with torch.no_grad():
        out = vae.decoder.upsampler.out
        out.weight.mul_(0.01)
        out.bias.zero_()
        out.bias[0] = 1.0
        first, last = vae.field.mlp[0], vae.field.mlp[2]
        first.weight.zero_()
        first.weight[:, 0] = 1.0
        first.bias.zero_()
        if colour_bias is None:
            last.weight[0].zero_()
        else:
            last.weight.zero_()
            last.bias[1:] = torch.tensor(colour_bias)
        last.weight[0, 0] = density_weight
        last.bias[0] = density_bias
    save_checkpoint(path, cfg, {"vae": vae, "dit": models.dit})
    return path


@pytest.fixture(scope="session")
def cube_checkpoint(tmp_path_factory) -> Path:
    """A rounded cube filling the box for every seed (`save_cube_checkpoint`): sigma = 10 softplus(feature 0) - 15,
    ~14.5 inside the box, below the preset's threshold of 10 within half a texel of its faces: a surface to mesh,
    export and render, which is all serving needs."""
    return save_cube_checkpoint(tmp_path_factory.mktemp("cube") / "tiny-cube.safetensors", 10.0, -15.0)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_components_match_eager(eager, engine, config, batch: int) -> None:
    """Denoiser velocity, decoder tri-planes, field density / rgb and text conditions of `engine` vs `eager`."""
    from ln3diff_rt.conventions import FIELD_CHUNK

    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *config.latent_shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    cond = eager.text_encoder(PROMPTS[:batch])
    got = engine.text_encoder(PROMPTS[:batch])
    assert got.context.shape == cond.context.shape and got.pooled.shape == cond.pooled.shape
    assert max_error(got.context, cond.context) < TOLERANCES["text_encoder"]
    assert max_error(got.pooled, cond.pooled) < TOLERANCES["text_encoder"]
    with torch.no_grad():
        v_ref = eager.denoiser(x, t, cond.context, cond.pooled)
        v = engine.denoiser(x, t, cond.context, cond.pooled)
        assert v.shape == v_ref.shape and v.dtype == torch.float32
        assert 0 < max_error(v_ref, torch.zeros_like(v_ref))  # a perturbed DiT: the check is not 0 == 0
        assert max_error(v, v_ref) < TOLERANCES["denoiser"]
        planes_ref = eager.decoder(x)
        planes = engine.decoder(x)
        assert planes.shape == planes_ref.shape == (batch, *config.triplane_shape)
        assert max_error(planes, planes_ref) < TOLERANCES["decoder"]
        points = torch.rand(batch, 1000 + batch, 3, generator=gen) * 2.2 - 1.1  # some outside the box
        for ref, out in zip(eager.field(planes_ref, points), engine.field(planes_ref, points), strict=True):
            assert ref.shape == out.shape
            assert max_error(out, ref) < TOLERANCES["field"]
        many = torch.rand(1, 2 * FIELD_CHUNK + 5, 3, generator=gen) * 2 - 1  # several engine calls
        for ref, out in zip(eager.field(planes_ref[:1], many), engine.field(planes_ref[:1], many), strict=True):
            assert ref.shape == out.shape and max_error(out, ref) < TOLERANCES["field"]
        density, rgb = engine.field(planes_ref[:1], points[:1, :0])  # meshing can ask for no points
        assert density.shape == (1, 0) and rgb.shape == (1, 0, 3)


def check_generate_matches_eager(eager_gen, engine_gen, batch: int) -> None:
    """Full requests: latents within tolerance, identical mesh vertex counts, previews of the same size."""
    from ln3diff_rt.options import GenerationOptions
    from ln3diff_rt.runner import generate

    # Small but complete: CFG (the denoiser runs at 2B), a mesh, one preview through the field.
    options = GenerationOptions(steps=2, guidance=3.0, mesh_resolution=32, faces=0, preview_views=1, preview_size=16)
    prompts, seeds = PROMPTS[:batch], list(range(batch))
    ref = generate(eager_gen, prompts, seeds, options)
    got = generate(engine_gen, prompts, seeds, options)
    for a, b in zip(ref, got, strict=True):
        assert max_error(a.latent, b.latent) < TOLERANCES["latents"]
        assert len(a.mesh.vertices) > 0  # the random checkpoint's threshold crosses the field
        assert len(a.mesh.vertices) == len(b.mesh.vertices) and len(a.mesh.faces) == len(b.mesh.faces)
        assert b.previews[0].shape == a.previews[0].shape == (16, 16, 3)


@pytest.fixture(scope="session")
def tiny_image_encoder_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(CLIP, DINOv2-with-registers) random-weight vision towers in transformers directories, shaped like the
    published image-to-3D model's conditioners where it matters: width 1024, patch 14 at 224^2 (256 tokens), CLIP
    projection 768 and quick_gelu, DINOv2 at 518^2 with 4 registers (its position table is resized as the real
    one's is); 1 layer, 4 heads, MLP 64 (CLIP) / 1024 (DINOv2) wide. A vision-only `CLIPVisionModelWithProjection`
    (a full CLIP checkpoint loads the same way). Fixed seed; about 60 MB, built in a few seconds."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    root = tmp_path_factory.mktemp("tiny-image-encoders")
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    dino = Dinov2WithRegistersConfig(hidden_size=1024, mlp_ratio=1, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=518, patch_size=14, num_register_tokens=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(clip).eval().save_pretrained(root / "clip")
        Dinov2WithRegistersModel(dino).eval().save_pretrained(root / "dinov2-reg")
    return root / "clip", root / "dinov2-reg"


# -- Hugging Face cache and the published models' joint files, shared by the text, image and converter tests --

HF_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"  # any 40-hex commit id
SIGMA_BIAS = "rec_model.decoder.triplane_decoder.decoder.net.2.bias"  # the official field's raw-sigma output bias


def fake_hf_cache(root: Path, repo: str, files_from: Path | None = None, revision: str = HF_REVISION) -> Path:
    """A Hugging Face hub cache holding `repo` as huggingface_hub lays it out: models--org--name/refs/main names
    the revision, snapshots/<revision>/ holds the files (links to `files_from`'s, as the cache links blobs)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in sorted(files_from.iterdir()) if files_from is not None else []:
        os.symlink(f, snapshot / f.name)
    return snapshot


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """No Hugging Face environment from the caller's shell leaks into a test; HF_HOME points at an empty tmp dir."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def official_joint_state(kind: str) -> dict[str, torch.Tensor]:
    """A released joint model's state dict, as the parity fixtures hold it: `ddpm_model.*` of dit-{kind}-small
    and `rec_model.decoder.*` of vae-small (random weights under the official key names)."""
    from safetensors.torch import load_file

    state = {}
    for name in (f"dit-{kind}-small", "vae-small"):
        tensors = load_file(shared_path("official-ln3diff", f"{name}.safetensors"))
        state.update({k: v for k, v in tensors.items() if not k.startswith("fixture.")})
    return state


def converted_official(kind: str, root: Path, surfaced: bool = False) -> Path:
    """The small joint fixture of `kind` converted into root/model.safetensors. `surfaced` raises the field's sigma
    bias by 7: its random field then crosses the official mesh level (raw sigma 10), which the fixture's own
    weights (sigma within about [-1.5, 5]) never reach, so meshes and GLBs appear."""
    from safetensors.torch import save_file

    from ln3diff_rt.official.convert import convert

    state = official_joint_state(kind)
    if surfaced:
        state[SIGMA_BIAS][0] += 7.0
    save_file(state, root / "joint.safetensors")
    convert(kind, root / "joint.safetensors", root / "model.safetensors", vae_heads=2)
    return root / "model.safetensors"


# -- gRPC tests: every module that defines a `server` fixture gets a client of it ------------------------------


@pytest.fixture
def client(server):
    from serve.client import Client

    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def code_of(fn):
    """(status code, details) of the grpc.RpcError that `fn()` raises."""
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


@contextlib.contextmanager
def vae_interrupted_at(monkeypatch, step: int):
    """VAE training whose batch for `step` raises KeyboardInterrupt (a crash mid-run) until the block ends: the
    resume tests' one way to stop a run part-way."""
    import training.vae as vae_training

    real = vae_training.collate

    def collate(ds, idx, epoch):
        if epoch == step:
            raise KeyboardInterrupt
        return real(ds, idx, epoch)

    monkeypatch.setattr(vae_training, "collate", collate)
    try:
        yield
    finally:
        monkeypatch.setattr(vae_training, "collate", real)


def vae_resumes_exactly(monkeypatch, config_for, interrupt_at: int = 2) -> tuple[Path, list[dict]]:
    """Train the VAE straight, and again interrupted at step `interrupt_at` then resumed (`config_for(name,
    resume)` gives each run's VAETrainConfig, `name` its own folder); checks that the resumed run logged the same
    steps, losses, gradients and learning rates and ended with the same weights. Returns the straight run's
    checkpoint and its train records."""
    import json

    import training.vae as vae_training
    from ln3diff_rt.checkpoint import load_models

    straight = vae_training.train(config_for("straight", False))
    with vae_interrupted_at(monkeypatch, interrupt_at), pytest.raises(KeyboardInterrupt):
        vae_training.train(config_for("resumed", False))
    resumed = vae_training.train(config_for("resumed", True))

    def train_records(checkpoint: Path) -> list[dict]:
        lines = map(json.loads, (checkpoint.parent / "log.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in lines
                if r["event"] == "train"]

    log = train_records(straight)
    assert log and train_records(resumed) == log
    a, b = load_models(straight).vae.state_dict(), load_models(resumed).vae.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    return straight, log
