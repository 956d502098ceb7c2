"""Latency of one Generator request and of each component on eager, torch.compile, AOTInductor and ONNX Runtime.

Engines are built with export/build_engine.py into --engine-root (kept there and reused while their
manifest still matches the checkpoint). Without --ckpt a tiny model with random weights is used
(random DiT weights on top of AdaLN-Zero, the mesh threshold at the field's median, so every stage
does real work). Backends are timed round-robin, so a background load slows them all alike;
each figure is the median over --repeats after one warm-up. On a machine busy with other work,
use --threads 1: OpenMP barriers with more threads than free cores stall every op (eager and
AOTInductor alike, ~100x on a loaded 2-core machine), which measures the scheduler, not the backends.

    python benchmarks/bench_backends.py [--ckpt CKPT] [--batch 1] [--repeats 3] [--threads N] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from export.build_engine import build_engine
from export.runtime import load_engine_components
from ln3diff_rt.backends import BACKENDS as REGISTRY
from ln3diff_rt.conventions import FIELD_CHUNK
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.random_weights import random_checkpoint
from ln3diff_rt.runner import generate
from ln3diff_rt.sampling import Condition

BACKENDS = tuple(name for name, b in REGISTRY.items() if "cpu" in b.devices)  # what runs here
FIELD_POINTS = 2 ** 18  # one meshing chunk
PROMPTS = ["a red cube", "a wooden chair", "a blue teapot", "a tall lamp", "a green car", "a stone tower",
           "a small boat", "a white mug"]


def engine_generator(eager: Generator, ckpt: Path, backend: str, root: Path) -> tuple[Generator, float]:
    """A Generator on the engine in root/backend, built first unless one for this checkpoint is there."""
    engine_dir = root / backend
    start = time.perf_counter()
    try:
        components = load_engine_components(engine_dir, backend, ckpt, eager.components, "cpu")
    except ValueError:
        build_engine(ckpt, engine_dir, backend, batch_sizes=[1, 4], progress=False)
        components = load_engine_components(engine_dir, backend, ckpt, eager.components, "cpu")
    return Generator(eager.models, "cpu", components, backend, text_cache_size=0), time.perf_counter() - start


def component_cases(gen: Generator, batch: int) -> dict:
    """Callables timing one call of each component at the shapes a request of `batch` uses."""
    cfg, c = gen.config, gen.components
    g = torch.Generator().manual_seed(0)
    prompts = PROMPTS[:batch]
    cond = gen.encode_conditions(prompts, [None] * batch)  # with zero image tokens on an image-capable model
    b2 = 2 * batch  # cond + uncond
    x, t = torch.randn(b2, *cfg.latent_shape, generator=g), torch.rand(b2, generator=g)
    condition = Condition.cat([cond, gen.unconditional(cond)]).args()
    latent = torch.randn(batch, *cfg.latent_shape, generator=g)
    planes = c.decoder(latent)[:1]
    points = torch.rand(1, FIELD_POINTS, 3, generator=g) * 2 - 1
    return {
        f"text_encoder B={batch}": lambda: c.text_encoder(prompts),
        f"denoiser B={b2}": lambda: c.denoiser(x, t, *condition),
        f"decoder B={batch}": lambda: c.decoder(latent),
        f"field N={FIELD_POINTS}": lambda: c.field(planes, points),
        # the same points in the calls the engine runtime makes on a CPU: what eager would gain from them too
        f"field N={FIELD_POINTS} /{FIELD_CHUNK}": lambda: [c.field(planes, points[:, i:i + FIELD_CHUNK])
                                                              for i in range(0, FIELD_POINTS, FIELD_CHUNK)],
    }


STAGES = ("encode_text", "sample", "decode", "mesh", "preview")


def end_to_end(gen: Generator, batch: int, options: GenerationOptions, stages: dict[str, list[float]]):
    """A request of `batch` prompts; appends the first result's per-stage milliseconds to `stages`."""
    def run():
        result = generate(gen, PROMPTS[:batch], list(range(batch)), options)[0]
        for stage in STAGES:
            stages[stage].append(1e3 * result.timings.get(stage, 0.0))

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return 1e3 * (time.perf_counter() - start)


def run(args) -> dict:
    root = Path(args.engine_root)
    ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(root / "random-tiny.safetensors")
    options = GenerationOptions(steps=args.steps, mesh_resolution=args.mesh_resolution,
                                preview_views=args.preview_views, preview_size=args.preview_size)
    eager = Generator.from_checkpoint(ckpt, text_cache_size=0)  # text encoding is part of every request
    gens, setup = {"eager": eager}, {"eager": 0.0}
    start = time.perf_counter()
    gens["compile"] = Generator.from_checkpoint(ckpt, backend="compile", text_cache_size=0)
    setup["compile"] = time.perf_counter() - start  # compiling itself happens at the warm-up below
    for backend in ("aoti", "onnx"):
        gens[backend], setup[backend] = engine_generator(eager, ckpt, backend, root)
    stages = {b: {stage: [] for stage in STAGES} for b in BACKENDS}
    cases = {b: {**component_cases(g, args.batch),
                 f"end_to_end B={args.batch}": end_to_end(g, args.batch, options, stages[b])} for b, g in gens.items()}
    for backend in BACKENDS:  # warm-up: torch.compile compiles here
        start = time.perf_counter()
        for fn in cases[backend].values():
            timed(fn)
        setup[backend] += time.perf_counter() - start
    samples = {b: {case: [] for case in cases[b]} for b in BACKENDS}
    for _ in range(args.repeats):
        for backend in BACKENDS:
            for case, fn in cases[backend].items():
                samples[backend][case].append(timed(fn))
    ms = {b: {case: statistics.median(v) for case, v in s.items()} for b, s in samples.items()}
    rows = [{"case": case, **{f"{b}_ms": ms[b][case] for b in BACKENDS},
             **{f"{b}_speedup": ms["eager"][case] / ms[b][case] for b in BACKENDS[1:]}} for case in cases["eager"]]
    stage_ms = {b: {stage: statistics.median(v[1:]) for stage, v in stages[b].items()} for b in BACKENDS}
    return {"checkpoint": str(ckpt), "stage_ms": stage_ms, "batch": args.batch, "options": dataclasses.asdict(options),
            "repeats": args.repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "setup_seconds": setup, "rows": rows, "torch": torch.__version__}


def table(result: dict) -> str:
    head = f"{'case':28s} {'eager ms':>9s}" + "".join(f" {b + ' ms':>11s} {'ratio':>6s}" for b in BACKENDS[1:])
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['case']:28s} {r['eager_ms']:9.1f}" + "".join(
            f" {r[b + '_ms']:11.1f} {r[b + '_speedup']:5.2f}x" for b in BACKENDS[1:]))
    lines += ["", f"{'end_to_end stage':28s} {'eager ms':>9s}" + "".join(f" {b + ' ms':>11s}" for b in BACKENDS[1:])]
    for stage in STAGES:
        lines.append(f"{stage:28s} {result['stage_ms']['eager'][stage]:9.1f}" + "".join(
            f" {result['stage_ms'][b][stage]:11.1f}" for b in BACKENDS[1:]))
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    lines.append(f"ratio = eager / backend (higher is faster); median of {result['repeats']}; "
                 f"{result['threads']} torch threads, {result['cpus']} CPUs, load average {load}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: a tiny model with random weights)")
    parser.add_argument("--engine-root", default=None, help="where engines are built and reused (default: temp)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per request (default 1)")
    defaults = GenerationOptions()  # end to end means a default request
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--mesh-resolution", type=int, default=defaults.mesh_resolution)
    parser.add_argument("--preview-views", type=int, default=defaults.preview_views)
    parser.add_argument("--preview-size", type=int, default=defaults.preview_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch / OpenMP / ONNX Runtime threads, the same for every backend "
                             f"(default {torch.get_num_threads()}); 1 on a machine busy with other work")
    parser.add_argument("--json", nargs="?", const="benchmarks/bench_backends.json", default=None,
                        help="also write the results as JSON (default path benchmarks/bench_backends.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before any engine loads: ONNX Runtime sessions follow it
    with tempfile.TemporaryDirectory() as tmp:
        args.engine_root = args.engine_root or tmp
        result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
