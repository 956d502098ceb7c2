"""Where every millisecond of a request goes.

    python -m ln3diff_rt.profile                          # the shipped model, eager, CPU
    python -m ln3diff_rt.profile --preset paper --device cuda --batch-sizes 1
    python -m ln3diff_rt.profile --compare eager,compile --json profile.json
    python -m ln3diff_rt.profile --trace trace.json       # torch.profiler trace (Perfetto / chrome://tracing)
    python -m ln3diff_rt.profile --cold --views 0         # a fresh `ln3diff generate` process, and its breakdown

Runs warm-up requests, then repeated timed requests, and reports the median and p90 of each
stage: text encoding, every denoiser step, VAE decode, the field queries of mesh extraction,
the rest of mesh extraction (marching cubes, decimation, colours), the UV unwrap and texture bake
(`--texture`, its field queries included), preview rendering and the GLB export; plus the
end-to-end time, the sum of the stages, and peak memory. On a GPU the stages are timed with CUDA
events. A preset without a checkpoint gets random weights, so the `paper` scale can be timed
without trained weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.backends import BACKENDS
from ln3diff_rt.config import PRESETS
from ln3diff_rt.images import read_image
from ln3diff_rt.options import (
    GenerationOptions,
    InvalidOption,
    add_option_flags,
    flag_name,
    option_specs,
    options_from_args,
)
from ln3diff_rt.pipeline import Components, Generator
from ln3diff_rt.runner import BATCH_STAGES, Request, run
from ln3diff_rt.sampling import Condition
from ln3diff_rt.timing import StageClock

# The README's profile: 2 turntable frames of 96 px (8 of 128 px would dominate a CPU request).
PROFILE_OVERRIDES = {"preview_views": 2, "preview_size": 96}


def random_weight_generator(preset: str, device: str, seed: int = 0) -> Generator:
    """A Generator for a preset with random weights (`random_weights.random_models`: every layer does real work),
    the MiniLM text tokens projected to the preset's context width."""
    from ln3diff_rt.random_weights import random_models
    from ln3diff_rt.text import TextEncoder

    models = random_models(preset, seed, device)
    cfg = models.config
    text = TextEncoder(max_length=cfg.dit.context_len).to(device)
    projection = torch.randn(text.width, cfg.dit.context_dim, device=device,
                             generator=torch.Generator(device).manual_seed(seed)) / text.width ** 0.5

    def encode(prompts: list[str]) -> Condition:
        cond = text(prompts)
        if cond.context.shape[-1] == cfg.dit.context_dim:
            return cond
        return Condition(cond.context @ projection, cond.pooled @ projection)

    return Generator(models, device, Components(encode, models.dit, models.vae.decode, models.vae.field),
                     backend="eager")


@dataclass
class Workload:
    batch_size: int
    options: GenerationOptions
    mesh: bool = True
    image: np.ndarray | None = None  # RGBA condition image for every object (image-conditioned models)
    prompt: bool = True  # False: image only (the published image model takes no prompt)


def profile_request(gen: Generator, work: Workload, clock: StageClock, seed: int) -> float:
    """One request through `runner.run`, every stage timed into `clock`; returns the end-to-end seconds.

    Sampling is split into its denoiser steps (from the runner's per-step progress events; step 1
    is the sampling total minus the later steps), meshing into its field queries and the rest
    (marching cubes, decimation, colours). Per-object stages add up over the batch.
    """
    requests = [Request(f"a red cube {i}" if work.prompt else "", seed + i, work.options,
                        ("glb",) if work.mesh else (), work.mesh, work.image) for i in range(work.batch_size)]
    step_ends = []

    def on_progress(stage: str, done: int, total: int, index: int | None) -> None:
        if stage == "sample":
            step_ends.append(clock.now())

    start = clock.now()
    results = list(run(gen, requests, progress=on_progress))
    total = clock.elapsed(start, clock.now())
    later = [clock.elapsed(a, b) for a, b in zip(step_ends, step_ends[1:], strict=False)]
    for i, seconds in enumerate([results[0].timings["sample"] - sum(later), *later], start=1):
        clock.add(f"denoise_step_{i:02d}", seconds)
    for result in results:
        for stage, seconds in result.timings.items():
            if stage not in BATCH_STAGES:
                clock.add(stage, seconds)
            elif stage != "sample" and result is results[0]:
                clock.add(stage, seconds)
    if "mesh" in clock.times:
        clock.times["mesh_extract"] = clock.times.pop("mesh") - clock.times.get("field_queries", 0.0)
    return total


def profile_generator(gen: Generator) -> Generator:
    """The same model and compute without the prompt cache: the profile times the text encoder every time."""
    return Generator(gen.models, gen.device, gen.components, gen.backend, text_cache_size=0)


def peak_memory_mb(device: str) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def profile(gen: Generator, work: Workload, repeats: int, warmup: int) -> dict:
    """Warm up, then time `repeats` requests; median and p90 per stage."""
    gen = profile_generator(gen)
    for i in range(warmup):
        profile_request(gen, work, StageClock(gen.device), seed=10_000 + i)
    if str(gen.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs, totals = [], []
    for i in range(repeats):
        clock = StageClock(gen.device)
        totals.append(profile_request(gen, work, clock, seed=i))
        runs.append(clock.times)
    stages = sorted({s for r in runs for s in r}, key=_stage_order)
    table = {s: _summary([r.get(s, 0.0) for r in runs]) for s in stages}
    return {"backend": gen.backend, "device": str(gen.device), "batch_size": work.batch_size,
            "steps": work.options.steps, "repeats": repeats, "stages": table, "end_to_end": _summary(totals),
            "stage_sum_median": sum(v["median"] for v in table.values()), "peak_memory_mb": peak_memory_mb(gen.device)}


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median": statistics.median(values), "p90": p90}


_ORDER = ["encode_text", "denoise_step", "decode", "field_queries", "mesh_extract", "uv_unwrap", "bake_texture", "lods",
          "export", "preview"]


def _stage_order(stage: str):
    prefix = next((i for i, p in enumerate(_ORDER) if stage.startswith(p)), len(_ORDER))
    return prefix, stage


def format_table(result: dict) -> str:
    lines = [f"backend {result['backend']}, device {result['device']}, batch {result['batch_size']}, "
             f"{result['steps']} steps, {result['repeats']} timed runs",
             f"{'stage':<22} {'median ms':>10} {'p90 ms':>10} {'share':>7}"]
    total = result["end_to_end"]["median"]
    for stage, s in result["stages"].items():
        lines.append(f"{stage:<22} {s['median'] * 1e3:>10.1f} {s['p90'] * 1e3:>10.1f} {s['median'] / total:>7.1%}")
    lines.append(f"{'sum of stages':<22} {result['stage_sum_median'] * 1e3:>10.1f}")
    lines.append(f"{'end to end':<22} {total * 1e3:>10.1f} {result['end_to_end']['p90'] * 1e3:>10.1f}")
    lines.append(f"peak memory {result['peak_memory_mb']:.0f} MiB")
    return "\n".join(lines)


def build_generator(args, backend: str) -> Generator:
    if args.preset:
        if backend != "eager":
            raise ValueError("--preset profiles random weights with the eager backend; export a checkpoint "
                             "to profile compiled backends")
        return random_weight_generator(args.preset, args.device)
    return Generator.from_checkpoint(args.ckpt, device=args.device, backend=backend, engine_dir=args.engine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ln3diff_rt.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default=None, help="checkpoint to profile (default: the shipped model)")
    source.add_argument("--preset", choices=list(PRESETS), help="random weights at this preset's size")
    p.add_argument("--backend", default="eager", choices=list(BACKENDS), help="backend to profile (default: eager)")
    p.add_argument("--engine", default=None, help="engine directory for aoti/onnx/tensorrt")
    p.add_argument("--compare", default=None, help="comma-separated backends run on the same workload, with ratios")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: 1)")
    add_option_flags(p, GenerationOptions().replace(**PROFILE_OVERRIDES))
    p.add_argument("--no-mesh", action="store_true", help="skip mesh extraction and export")
    p.add_argument("--image", default=None, help="condition image for every object (image-conditioned models)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default: 1)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--trace", default=None, help="write a torch.profiler trace of one request here")
    p.add_argument("--cold", action="store_true",
                   help="time fresh `ln3diff generate` processes on the shipped model (--repeats of them, with the "
                        "generation flags given here; the rest keep the command's defaults) and break one down: "
                        "imports by package, checkpoint, text encoder, each stage of the first request")
    args = p.parse_args(argv)
    if args.cold:
        from ln3diff_rt.cold_start import format_cold, profile_cold

        changes = {name: getattr(args, name) for name in option_specs() if getattr(args, name) is not None}
        result = profile_cold(args.repeats, changes)
        print(format_cold(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
        backends = args.compare.split(",") if args.compare else [args.backend]
        for b in backends:
            if b not in BACKENDS:
                raise ValueError(f"--compare: unknown backend {b!r}; expected some of {', '.join(BACKENDS)}")
        options_from_args(args)  # bad flags fail before any model is loaded
        image = read_image(args.image) if args.image else None
        results = []
        for backend in backends:
            gen = build_generator(args, backend)
            options = options_from_args(args, gen.default_options().replace(**PROFILE_OVERRIDES))
            for batch in batches:
                work = Workload(batch, options, not args.no_mesh, image, not gen.config.image_only)
                result = profile(gen, work, args.repeats, args.warmup)
                results.append(result)
                print(format_table(result), end="\n\n")
            if args.trace and backend == backends[0]:
                write_trace(gen, Workload(batches[0], options, not args.no_mesh, image, not gen.config.image_only),
                            args.trace)
                print(f"wrote trace {args.trace}")
    except InvalidOption as e:
        print(f"ln3diff_rt.profile: error: {flag_name(e.field)}={e.value!r}: expected {e.expected}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"ln3diff_rt.profile: error: {e}", file=sys.stderr)
        return 2
    if len(backends) > 1:
        print(compare_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def compare_table(results: list[dict]) -> str:
    """End-to-end medians per backend and batch, as ratios to the first backend (eager when listed first)."""
    base = {r["batch_size"]: r["end_to_end"]["median"] for r in results if r["backend"] == results[0]["backend"]}
    lines = [f"{'backend':<10} {'batch':>5} {'e2e ms':>10} {'sample ms':>10} {'speed-up':>9}"]
    for r in results:
        sample = sum(v["median"] for k, v in r["stages"].items() if k.startswith("denoise_step"))
        e2e = r["end_to_end"]["median"]
        lines.append(f"{r['backend']:<10} {r['batch_size']:>5} {e2e * 1e3:>10.1f} {sample * 1e3:>10.1f} "
                     f"{base[r['batch_size']] / e2e:>8.2f}x")
    return "\n".join(lines)


def write_trace(gen: Generator, work: Workload, path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if str(gen.device).startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        profile_request(gen, work, StageClock(gen.device), seed=0)
    prof.export_chrome_trace(path)


if __name__ == "__main__":
    sys.exit(main())
