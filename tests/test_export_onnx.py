"""ONNX Runtime (CPU provider) engines of the tiny model against eager: each component at batch 1 and 4,
full requests (latents, mesh vertex counts), the graphs themselves (opset, dynamic axes, checker), and the
TorchScript exporter that stands in when the dynamo exporter fails. One export of all four components
per test session (~30 s on two loaded cores)."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import TOLERANCES, check_components_match_eager, check_generate_matches_eager, max_error

from export.build_engine import build_engine
from export.components import component_specs, run_module
from export.manifest import COMPONENTS, read_manifest
from export.onnx_engine import OPSET, OrtRunner, export_onnx
from ln3diff_rt.checkpoint import file_sha256, load_models
from ln3diff_rt.pipeline import Generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, random_tiny_checkpoint):
    ckpt = random_tiny_checkpoint
    engine_dir = tmp_path_factory.mktemp("onnx")
    build_engine(ckpt, engine_dir, "onnx", batch_sizes=[1, 4], progress=False)
    eager = Generator.from_checkpoint(ckpt)
    engine = Generator.from_checkpoint(ckpt, backend="onnx", engine_dir=engine_dir)
    return ckpt, engine_dir, eager, engine


def test_manifest_describes_the_engine(built):
    ckpt, engine_dir, _, _ = built
    manifest = read_manifest(engine_dir)
    assert manifest.backend == "onnx" and manifest.precision == "fp32" and manifest.batch_sizes == [1, 4]
    assert manifest.checkpoint == {"file": ckpt.name, "sha256": file_sha256(ckpt)}
    assert manifest.versions["onnxruntime"] and manifest.versions["torch"] == torch.__version__
    assert [e.component for e in manifest.components] == list(COMPONENTS)
    assert manifest.entry("image_encoder").backend == "eager"  # a text-only model has none to export
    for entry in (e for e in manifest.components if e.component != "image_encoder"):
        assert entry.backend == "onnx" and entry.exporter == "onnx-dynamo"
        assert entry.sha256 == file_sha256(engine_dir / entry.file) and entry.bytes > 0
        assert max(entry.max_abs_error.values()) < TOLERANCES[entry.component]
    denoiser = manifest.entry("denoiser")
    assert [i.name for i in denoiser.inputs] == ["x", "t", "context", "pooled"]
    assert denoiser.inputs[0].shape == ["batch", 3, 4, 8, 8]
    assert set(denoiser.max_abs_error) == {"batch=1", "batch=2", "batch=4", "batch=8"}
    field = manifest.entry("field")
    assert field.inputs[1].shape == [1, "points", 3] and field.dynamic_axes["density"] == {"1": "points"}
    assert manifest.entry("text_encoder").extra["max_length"] == 32
    assert manifest.entry("field").extra["form"] == "reference"  # GridSample


def test_graphs_are_valid_opset_18_with_dynamic_axes(built):
    _, engine_dir, _, _ = built
    for name, dim in (("denoiser", "batch"), ("decoder", "batch"), ("field", "points"), ("text_encoder", "batch")):
        model = onnx.load(engine_dir / f"{name}.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
        dynamic = [d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param]
        assert dynamic and set(dynamic) == {dim}


def test_runs_on_the_cpu_provider(built):
    _, engine_dir, _, _ = built
    assert OrtRunner(engine_dir / "field.onnx", "cpu").providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch", [1, 4])
def test_components_match_eager(built, batch):
    _, _, eager, engine = built
    check_components_match_eager(eager.components, engine.components, eager.config, batch)


@pytest.mark.parametrize("batch", [1, 4])
def test_generate_matches_eager(built, batch):
    _, _, eager, engine = built
    check_generate_matches_eager(eager, engine, batch)


def test_torchscript_exporter_fallback(built, tmp_path, monkeypatch):
    ckpt = built[0]
    (spec,) = component_specs(load_models(ckpt), None, ("field",), torch.float32, "cpu")
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo exporter failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    assert export_onnx(spec, tmp_path / "field.onnx") == "onnx-torchscript"
    runner = OrtRunner(tmp_path / "field.onnx", "cpu")
    for n in (1, 777):  # the point count stays dynamic
        inputs = spec.inputs(points=n)
        for got, ref in zip(runner(*inputs), run_module(spec, inputs), strict=True):
            assert got.shape == ref.shape and max_error(got, ref) < TOLERANCES["field"]


def test_image_conditioned_model_exports_its_image_encoder_and_denoiser(tmp_path):
    """An image-conditioned checkpoint: the image encoder and the five-input denoiser export, load as the onnx
    backend and give eager's latents for a request with a real photo."""
    import dataclasses

    from conftest import shared_path

    from ln3diff_rt.checkpoint import save_checkpoint
    from ln3diff_rt.config import ImageEncoderConfig, get_preset
    from ln3diff_rt.images import read_image
    from ln3diff_rt.models.build import build_dit, build_image_encoder, build_vae
    from ln3diff_rt.options import GenerationOptions
    from ln3diff_rt.runner import Request, run

    base = get_preset("tiny")
    cfg = base.replace(image_encoder=ImageEncoderConfig(), dit=dataclasses.replace(base.dit, image_dim=128))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        modules = {"vae": build_vae(cfg), "dit": build_dit(cfg), "image_encoder": build_image_encoder(cfg)}
        with torch.no_grad():
            for p in modules["dit"].parameters():  # off AdaLN-Zero, so the image tokens change the output
                p.add_(0.02 * torch.randn_like(p))
    ckpt = tmp_path / "image-tiny.safetensors"
    save_checkpoint(ckpt, cfg, modules)
    manifest = build_engine(ckpt, tmp_path / "engine", "onnx", components=("image_encoder", "denoiser"),
                            progress=False)
    entries = {e.component: e for e in manifest.components}
    assert [i.name for i in entries["denoiser"].inputs] == ["x", "t", "context", "pooled", "image"]
    assert max(entries["image_encoder"].max_abs_error.values()) < TOLERANCES["latents"]
    photo = read_image(shared_path("samples", "images", "fox-input.png"))
    options = GenerationOptions(steps=2, mesh_resolution=16, preview_views=0, texture=0)
    latents = [next(run(Generator.from_checkpoint(ckpt, backend=b, engine_dir=tmp_path / "engine"),
                        [Request("a fox", 1, options, mesh=False, image=photo)])).latent for b in ("eager", "onnx")]
    assert max_error(*latents) < TOLERANCES["latents"]
    without = next(run(Generator.from_checkpoint(ckpt), [Request("a fox", 1, options, mesh=False)])).latent
    assert max_error(latents[0], without) > 100 * TOLERANCES["latents"]  # the image did condition the sample
