"""Build an engine directory from a checkpoint: one artefact per component and a manifest.json.

    python export/build_engine.py --ckpt CKPT --out DIR --backend aoti|onnx|tensorrt \\
        [--precision fp32|fp16|bf16] [--batch-sizes 1,4] [--device cpu|cuda] [--components ...]

Each artefact is checked against the eager module right after it is built (max |error| per batch
size, or per point count for the field, goes into the manifest and the summary table).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, not from export/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from export.components import CHECK_SIZES, ComponentSpec, component_specs, run_module  # noqa: E402
from export.manifest import (  # noqa: E402
    COMPONENTS,
    PRECISIONS,
    BuildContext,
    ComponentEntry,
    Manifest,
    versions,
    write_manifest,
)
from export.runtime import load_engine  # noqa: E402
from export.tensorrt_engine import BackendUnavailable, default_cache_dir, require_tensorrt  # noqa: E402
from ln3diff_rt.backends import ENGINE_BACKENDS, get_backend  # noqa: E402
from ln3diff_rt.checkpoint import file_sha256, load_models  # noqa: E402
from ln3diff_rt.text import TextEncoder  # noqa: E402


def check_request(backend: str, precision: str, device: str, batch_sizes: list[int],
                  components: tuple[str, ...]) -> None:
    """Every refusal that needs no work: BackendUnavailable where the machine cannot, ValueError for bad input."""
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {', '.join(ENGINE_BACKENDS)}")
    if backend == "tensorrt":
        require_tensorrt(device)
    get_backend(backend).check_installed()
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: expected cpu or cuda[:index]") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda[:index]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device}: this machine has no CUDA device")
    if backend == "onnx" and precision == "bf16":
        raise ValueError("--precision bf16: ONNX Runtime has no general bf16 kernels; use fp32 or fp16, "
                         "or --backend tensorrt --precision bf16")
    if backend == "onnx" and precision == "fp16" and dev.type == "cpu":
        raise ValueError("--precision fp16 with --backend onnx needs --device cuda: ONNX Runtime's CPU "
                         "provider lacks fp16 kernels for these graphs")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes {batch_sizes}: expected positive integers, e.g. 1,4")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ValueError(f"--components {','.join(components)}: expected a subset of {','.join(COMPONENTS)}")


def build_engine(ckpt: str | Path, out: str | Path, backend: str, precision: str = "fp32",
                 batch_sizes: list[int] | None = None, device: str = "cpu",
                 components: tuple[str, ...] = COMPONENTS, cache_dir: str | Path | None = None,
                 progress: bool = True) -> Manifest:
    """Export `components` of `ckpt` into `out` for `backend`, check each against eager, write the manifest."""
    batch_sizes = sorted(set(batch_sizes or [1, 4]))
    check_request(backend, precision, device, batch_sizes, components)
    ckpt, out = Path(ckpt), Path(out)
    models = load_models(ckpt, device, require=("vae", "dit"))
    ckpt_sha = file_sha256(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    text = (TextEncoder(models.config.text_encoder, models.config.dit.context_len).to(device)
            if "text_encoder" in components else None)
    # TensorRT takes fp32 ONNX and lowers precision itself (builder flags).
    dtype = torch.float32 if backend == "tensorrt" else PRECISIONS[precision]
    # AOTInductor on a CPU compiles the gather form of the field (models/projected_field.py) far better.
    projected = backend == "aoti" and torch.device(device).type == "cpu"
    specs = component_specs(models, text, tuple(c for c in COMPONENTS if c in components), dtype, device, projected)
    ctx = BuildContext(precision, batch_sizes, ckpt_sha, Path(cache_dir) if cache_dir else default_cache_dir())
    built = {}
    with tqdm(specs, desc=f"build {backend}", unit="component", disable=not progress, file=sys.stderr) as bar:
        for spec in bar:
            bar.set_postfix_str(spec.name)
            built[spec.name] = _build_component(spec, out, backend, device, ctx)
    entries = [built.get(name) or ComponentEntry(name, "eager", "fp32", None) for name in COMPONENTS]
    manifest = Manifest(backend=backend, precision=precision, device=device,
                        checkpoint={"file": ckpt.name, "sha256": ckpt_sha}, versions=versions(),
                        batch_sizes=batch_sizes, components=entries,
                        created=datetime.now(UTC).isoformat(timespec="seconds"))
    write_manifest(manifest, out)
    return manifest


def _build_component(spec: ComponentSpec, out: Path, backend: str, device: str, ctx: BuildContext) -> ComponentEntry:
    trace_inputs = spec.inputs()
    entry = ComponentEntry(
        spec.name, backend, ctx.precision, f"{spec.name}{get_backend(backend).engine_suffix}",
        inputs=spec.tensor_specs(spec.input_names, trace_inputs),
        outputs=spec.tensor_specs(spec.output_names, run_module(spec, trace_inputs)),
        dynamic_axes={k: {str(a): d for a, d in v.items()} for k, v in spec.dynamic_axes.items()},
        extra=spec.extra)
    start = time.perf_counter()
    get_backend(backend).resolve("build")(spec, out, entry, ctx)
    entry.seconds = time.perf_counter() - start
    entry.bytes = (out / entry.file).stat().st_size
    entry.sha256 = file_sha256(out / entry.file)
    entry.max_abs_error = check_against_eager(spec, load_engine(out, entry, device), ctx.batch_sizes)
    return entry


def check_against_eager(spec: ComponentSpec, engine, batch_sizes: list[int]) -> dict[str, float]:
    """Max |engine - eager| over all outputs, per checked size of the dynamic dim."""
    (dim,) = spec.dims()
    if dim == "points":
        sizes = list(CHECK_SIZES["points"])
    elif spec.name == "denoiser":  # the sampler calls it at B and, with guidance, 2B
        sizes = sorted(set(batch_sizes) | {2 * b for b in batch_sizes})
    else:
        sizes = batch_sizes
    errors = {}
    for size in sizes:
        inputs = spec.inputs(**{dim: size})
        got = engine(*inputs)
        ref = run_module(spec, inputs)
        errors[f"{dim}={size}"] = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref, strict=True))
    return errors


def summary_table(manifest: Manifest) -> str:
    """One row per component: what was built, where, how big, how long, and how far from eager."""
    rows = [("component", "backend", "file", "size", "seconds", "max |err| vs eager")]
    for e in manifest.components:
        err = max(e.max_abs_error.values()) if e.max_abs_error else None
        rows.append((e.component, e.backend, e.file or "- (stays eager)", _size(e.bytes) if e.file else "-",
                     f"{e.seconds:.1f}" if e.file else "-", f"{err:.2e}" if err is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,4") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python export/build_engine.py", description=__doc__.splitlines()[0],
        epilog="Examples:\n  python export/build_engine.py --ckpt model.safetensors --out engines/aoti --backend aoti\n"
               "  python -m export.build_engine --ckpt model.safetensors --out engines/trt --backend tensorrt "
               "--device cuda --precision fp16 --batch-sizes 1,4,8\n"
               "Load the result with: ln3diff generate --backend BACKEND --engine DIR ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint (.safetensors) holding both 'vae' and 'dit'")
    parser.add_argument("--out", required=True, help="engine directory to write (created if missing)")
    parser.add_argument("--backend", required=True, choices=ENGINE_BACKENDS,
                        help="; ".join(f"{b}: {get_backend(b).help}" for b in ENGINE_BACKENDS))
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="weights and activations (default fp32; onnx: fp32, or fp16 on cuda)")
    parser.add_argument("--batch-sizes", default=[1, 4], type=_batch_sizes, metavar="B1,B2",
                        help="request batch sizes served; checked after export and, for tensorrt, the "
                             "optimisation profile (the denoiser sees 2B with guidance) (default 1,4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    parser.add_argument("--components", default=",".join(COMPONENTS),
                        help=f"comma-separated subset of {','.join(COMPONENTS)}; the rest stay eager "
                             "(default: all)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"tensorrt engine cache (default {default_cache_dir()})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    try:
        manifest = build_engine(args.ckpt, args.out, args.backend, args.precision, args.batch_sizes, args.device,
                                components, args.cache_dir, progress=not args.no_progress)
    except (BackendUnavailable, ValueError) as e:  # CheckpointError is a ValueError
        print(f"build_engine: {e}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
