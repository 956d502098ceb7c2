"""Engine export without compiling anything: manifest checks on load, TensorRT profiles, cache keys and
refusal, request validation, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_error

from export.build_engine import check_request, main
from export.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ComponentEntry,
    Manifest,
    TensorSpec,
    read_manifest,
    versions,
    write_manifest,
)
from export.runtime import load_engine_components
from export.tensorrt_engine import (
    BackendUnavailable,
    dim_range,
    engine_cache_key,
    optimisation_profile,
    run_within,
)
from ln3diff_rt.checkpoint import file_sha256
from ln3diff_rt.config import PRESETS
from ln3diff_rt.conventions import FIELD_CHUNK, MAX_FIELD_POINTS, RAY_CHUNK
from ln3diff_rt.pipeline import Components
from ln3diff_rt.random_weights import random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_projected_field_is_the_same_maths():
    """The gather form AOTInductor compiles on CPUs against the reference field: odd sizes, points outside."""
    from ln3diff_rt.config import RendererConfig
    from ln3diff_rt.models.field import TriplaneField
    from ln3diff_rt.models.projected_field import ProjectedTriplaneField

    torch.manual_seed(0)
    field = TriplaneField(7, RendererConfig(hidden=13)).eval()
    planes, points = torch.randn(1, 3, 7, 5, 5), torch.rand(1, 999, 3) * 2.6 - 1.3
    points[0, :8] = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 3)  # the box corners
    with torch.no_grad():
        for ref, got in zip(field(planes, points), ProjectedTriplaneField(field)(planes, points), strict=True):
            assert ref.shape == got.shape and max_error(ref, got) < 1e-5


# -- manifest checks on load --------------------------------------------------------------------------


@pytest.fixture
def checkpoint(random_tiny_checkpoint) -> Path:
    return random_tiny_checkpoint


def _manifest(ckpt: Path, backend: str = "onnx", **changes) -> Manifest:
    entries = [ComponentEntry(name, "eager", "fp32", None) for name in COMPONENTS]
    fields = dict(backend=backend, precision="fp32", device="cpu",
                  checkpoint={"file": ckpt.name, "sha256": file_sha256(ckpt)}, versions=versions(),
                  batch_sizes=[1, 4], components=entries)
    return Manifest(**{**fields, **changes})


def test_manifest_roundtrip(tmp_path, checkpoint):
    manifest = _manifest(checkpoint)
    manifest.components[1] = ComponentEntry("denoiser", "onnx", "fp32", "denoiser.onnx",
                                            inputs=[TensorSpec("x", ["batch", 3, 4, 8, 8], "float32")],
                                            dynamic_axes={"x": {"0": "batch"}}, max_abs_error={"batch=1": 1e-7})
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["manifest_version"] == MANIFEST_VERSION and raw["checkpoint"]["sha256"] == file_sha256(checkpoint)


def test_eager_entries_keep_the_eager_components(tmp_path, checkpoint):
    write_manifest(_manifest(checkpoint), tmp_path)  # every component listed as "eager", no files

    def text(prompts):
        return prompts

    def denoiser(x, t, context, pooled):
        return x

    def decoder(z):
        return z

    def field(planes, points):
        return points, points

    eager = Components(text, denoiser, decoder, field)
    loaded = load_engine_components(tmp_path, "onnx", checkpoint, eager, "cpu")
    assert (loaded.text_encoder, loaded.denoiser, loaded.decoder, loaded.field) == (text, denoiser, decoder, field)


def test_engine_from_another_checkpoint_is_refused(tmp_path, checkpoint):
    other = random_checkpoint(tmp_path / "other.safetensors", seed=1)
    write_manifest(_manifest(other), tmp_path)
    with pytest.raises(ValueError) as err:
        load_engine_components(tmp_path, "onnx", checkpoint, None, "cpu")
    message = str(err.value)
    assert str(tmp_path / MANIFEST_NAME) in message and str(checkpoint) in message
    assert file_sha256(other) in message and file_sha256(checkpoint) in message


def test_other_manifest_version_is_refused(tmp_path, checkpoint):
    write_manifest(_manifest(checkpoint, manifest_version=MANIFEST_VERSION + 1), tmp_path)
    with pytest.raises(ValueError, match=rf"manifest.json: manifest format version {MANIFEST_VERSION + 1}, "
                                         rf"this ln3diff_rt reads {MANIFEST_VERSION}"):
        load_engine_components(tmp_path, "onnx", checkpoint, None, "cpu")


THIS_TORCH = f"torch {torch.__version__}"


@pytest.mark.parametrize("backend, change, pattern", [
    ("aoti", {"torch": "2.0.0"}, rf"built with torch 2\.0\.0, this environment has {re.escape(THIS_TORCH)}"),
    ("onnx", {"ln3diff_rt": "0.0.1"}, r"built with ln3diff_rt 0\.0\.1"),
])
def test_other_runtime_version_is_refused(tmp_path, checkpoint, backend, change, pattern):
    write_manifest(_manifest(checkpoint, backend=backend, versions={**versions(), **change}), tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_engine_components(tmp_path, backend, checkpoint, None, "cpu")


def test_wrong_backend_device_and_missing_manifest_are_refused(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="no engine manifest here"):
        load_engine_components(tmp_path, "onnx", checkpoint, None, "cpu")
    write_manifest(_manifest(checkpoint, backend="aoti"), tmp_path)
    with pytest.raises(ValueError, match="built for backend 'aoti', asked to load it as 'onnx'"):
        load_engine_components(tmp_path, "onnx", checkpoint, None, "cpu")
    write_manifest(_manifest(checkpoint, backend="aoti", device="cuda"), tmp_path)
    with pytest.raises(ValueError, match="compiled for device 'cuda', asked to run on 'cpu'"):
        load_engine_components(tmp_path, "aoti", checkpoint, None, "cpu")


def test_generator_refuses_engine_of_another_checkpoint(tmp_path, checkpoint):
    from ln3diff_rt.pipeline import Generator

    other = random_checkpoint(tmp_path / "other.safetensors", seed=1)
    write_manifest(_manifest(other), tmp_path)
    with pytest.raises(ValueError, match="rebuild the engine for this checkpoint"):
        Generator.from_checkpoint(checkpoint, backend="onnx", engine_dir=tmp_path)


# -- TensorRT: everything but the engine build, which is unverified here ------------------------------


def test_tensorrt_profiles_follow_batch_sizes():
    assert dim_range("denoiser", "batch", [1, 4]) == (1, 8, 8)  # CFG doubles the batch
    assert dim_range("decoder", "batch", [2, 4, 8]) == (2, 8, 8)
    assert dim_range("text_encoder", "batch", [2, 4]) == (1, 4, 4)  # "" alone for the uncond branch
    assert dim_range("field", "points", [1, 4]) == (1, FIELD_CHUNK, MAX_FIELD_POINTS)  # tuned for mesh chunks
    for cfg in PRESETS.values():  # the largest call, a chunk of preview rays, fits every preset
        assert RAY_CHUNK * (cfg.renderer.num_samples + cfg.renderer.num_importance) <= MAX_FIELD_POINTS, cfg.preset
    inputs = [TensorSpec("x", ["batch", 3, 4, 8, 8], "float32"), TensorSpec("t", ["batch"], "float32")]
    assert optimisation_profile("denoiser", inputs, [1, 4]) == {
        "x": {"min": [1, 3, 4, 8, 8], "opt": [8, 3, 4, 8, 8], "max": [8, 3, 4, 8, 8]},
        "t": {"min": [1], "opt": [8], "max": [8]}}
    field = optimisation_profile("field", [TensorSpec("planes", [1, 3, 32, 32, 32], "float32"),
                                           TensorSpec("points", [1, "points", 3], "float32")], [1])
    assert field["planes"]["min"] == field["planes"]["max"] == [1, 3, 32, 32, 32]
    assert field["points"] == {"min": [1, 1, 3], "opt": [1, FIELD_CHUNK, 3], "max": [1, MAX_FIELD_POINTS, 3]}


def test_tensorrt_cache_key_changes_with_every_field():
    base = dict(component="denoiser", ckpt_sha256="a" * 64, onnx_sha256="b" * 64, gpu_name="NVIDIA H100",
                trt_version="10.3.0", precision="fp16", profile={"x": {"min": [1], "opt": [8], "max": [8]}})
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**dict(reversed(list(base.items()))))  # stable, order-free
    changes = {"component": "decoder", "ckpt_sha256": "c" * 64, "onnx_sha256": "d" * 64, "gpu_name": "NVIDIA H200",
               "trt_version": "10.4.0", "precision": "bf16", "profile": {"x": {"min": [1], "opt": [4], "max": [8]}}}
    keys = {engine_cache_key(**{**base, name: value}) for name, value in changes.items()}
    assert len(keys) == len(changes) and key not in keys


def test_run_within_splits_and_pads_to_the_profile():
    calls = []

    def engine(x, planes):  # a profile of batch 2 .. 3 along axis 0 of x; `planes` is static
        calls.append(x.shape[0])
        assert 2 <= x.shape[0] <= 3
        return x * 2 + planes.sum(), x[:, :1]

    x, planes = torch.arange(14.0).reshape(7, 2), torch.ones(2)
    doubled, first = run_within(engine, (x, planes), [0, None], [0, 0], lo=2, hi=3)
    assert calls == [3, 3, 2]  # the last chunk of 1 was padded to 2
    assert torch.equal(doubled, x * 2 + 2) and torch.equal(first, x[:, :1])
    calls.clear()
    (single, _) = run_within(engine, (x[:1], planes), [0, None], [0, 0], lo=2, hi=3)
    assert calls == [2] and torch.equal(single, x[:1] * 2 + 2)


def test_tensorrt_refused_before_any_work(tmp_path, checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    out = tmp_path / "engine"
    assert main(["--ckpt", str(checkpoint), "--out", str(out), "--backend", "tensorrt", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensorrt" in err and "CUDA GPU" in err
    assert not out.exists()  # nothing written
    # even a checkpoint that does not exist is not looked at first
    assert main(["--ckpt", str(tmp_path / "missing"), "--out", str(out), "--backend", "tensorrt"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("args, pattern", [
    (("onnx", "bf16", "cpu", [1], COMPONENTS), "no general bf16 kernels"),
    (("onnx", "fp16", "cpu", [1], COMPONENTS), "needs --device cuda"),
    (("aoti", "fp64", "cpu", [1], COMPONENTS), "--precision 'fp64'"),
    (("aoti", "fp32", "cpu", [0, 4], COMPONENTS), "--batch-sizes"),
    (("aoti", "fp32", "cpu", [1], ("denoiser", "mesher")), "--components"),
    (("aoti", "fp32", "tpu", [1], COMPONENTS), "--device 'tpu'"),
])
def test_bad_requests_are_refused(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_request(*args)


def test_cuda_device_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        check_request("aoti", "fp32", "cuda", [1], COMPONENTS)


def test_cli_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "e"), "--backend", "onnx",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.safetensors" in err and "not found" in err


@pytest.mark.parametrize("command", [["export/build_engine.py"], ["-m", "export.build_engine"]])
def test_cli_help_as_script_and_module(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}  # as a user runs it: only the script's own location helps
    done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--ckpt", "--out", "--backend", "--precision", "--batch-sizes", "--device", "aoti,onnx,tensorrt"):
        assert flag in done.stdout


def test_compile_backend_compiles_the_gather_form_of_the_field_on_the_cpu():
    """`compile` compiles the denoiser, decoder and field; on the CPU a TriplaneField in its gather form (what
    Inductor compiles well), on a GPU as it is (its sampler is the Triton op). torch.compile compiles on the first
    call, so building the components for "cuda" needs no GPU; set_stance("force_eager") runs the wrapped module
    without compiling, so the CPU field's maths is checked against eager cheaply here (Inductor's own output is
    compared with eager in bench_backends and the AOTInductor tests, which compile this form)."""
    from ln3diff_rt.config import RendererConfig
    from ln3diff_rt.models.field import TriplaneField
    from ln3diff_rt.models.projected_field import ProjectedTriplaneField
    from ln3diff_rt.pipeline import compiled_components

    torch.manual_seed(0)
    field = TriplaneField(5, RendererConfig()).eval()
    denoiser = torch.nn.Identity()
    eager = Components(lambda prompts: None, denoiser, denoiser, field)
    on_cpu = compiled_components(eager, device="cpu")
    assert isinstance(on_cpu.field._orig_mod, ProjectedTriplaneField)
    assert on_cpu.denoiser._orig_mod is denoiser and on_cpu.decoder._orig_mod is denoiser
    assert compiled_components(eager, device="cuda:0").field._orig_mod is field
    planes, points = torch.randn(1, 3, 5, 7, 7), torch.rand(1, 301, 3) * 2.2 - 1.1  # some points outside the box
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for ref, got in zip(field(planes, points), on_cpu.field(planes, points), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    other = Components(lambda prompts: None, denoiser, denoiser, lambda planes, points: (planes, points))
    assert compiled_components(other, device="cpu").field is not other.field  # compiled as it is


def test_compile_backend_samples_with_the_condition_bound_as_eager_does():
    """The compiled DiT keeps `bind_condition`: the cross-attention's keys and values once per sampling run (eager),
    each step the compiled `denoise`; called with a whole condition it is the compiled forward. Checked under
    set_stance("force_eager") (bench_backends times Inductor's own)."""
    from ln3diff_rt.config import get_preset
    from ln3diff_rt.models.dit import DiT
    from ln3diff_rt.pipeline import CompiledDiT, compiled_components
    from ln3diff_rt.sampling import Condition, sample

    torch.manual_seed(5)
    cfg = get_preset("tiny")
    dit = DiT(cfg).eval()
    for p in dit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    compiled = compiled_components(Components(lambda prompts: None, dit, torch.nn.Identity(), lambda *a: a),
                                   device="cpu").denoiser
    assert isinstance(compiled, CompiledDiT) and compiled.forward._orig_mod is dit
    calls = []
    dit.blocks[-1].cross.to_kv.register_forward_hook(lambda *_: calls.append(1))
    cond, uncond = (Condition(torch.randn(2, 5, cfg.dit.context_dim), torch.randn(2, cfg.dit.context_dim))
                    for _ in range(2))
    noise = torch.randn(2, *cfg.latent_shape)
    steps, compiled_step = [], compiled.denoise
    compiled.denoise = lambda *args: steps.append(1) or compiled_step(*args)
    with torch.compiler.set_stance("force_eager"):
        got = sample(compiled, noise, cond, uncond, steps=4, guidance=2.5)
        assert len(calls) == 1 and len(steps) == 4  # each step through the compiled denoise
        x, t = torch.randn(3, *cfg.latent_shape), torch.rand(3)
        ctx, pooled = torch.randn(3, 5, cfg.dit.context_dim), torch.randn(3, cfg.dit.context_dim)
        with torch.no_grad():
            assert torch.equal(compiled(x, t, ctx, pooled), dit(x, t, ctx, pooled))
    torch.testing.assert_close(got, sample(dit, noise, cond, uncond, steps=4, guidance=2.5), rtol=0, atol=0)
