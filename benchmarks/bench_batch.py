"""Per-object time of a request by batch size, objects finished at once (`run`'s object_threads) and mesh grid.

The batch stages (text, sampling, decode) run once per batch; the per-object stages (mesh, export,
previews, texture) run object by object, or `--object-threads` at a time on threads. Every (grid, batch
size, threads) setting runs in turn in one process, `--repeats` rounds, and the table gives the median
per-object time over the first setting's (below 1: faster per object); the grids of one round mesh the
same objects, so with `--batch-sizes 1 --object-threads 1 --resolutions 256 384` the last column of 384^3
is its per-object cost over 256^3's. The prompts cycle through the shipped model's shapes and colours.

    python benchmarks/bench_batch.py [--ckpt PATH] [--batch-sizes 1 8] [--object-threads 1 2] [--repeats 3]
        [--views 0] [--texture 0] [--resolutions 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ln3diff_rt.pipeline import Generator  # noqa: E402
from ln3diff_rt.runner import Request, run  # noqa: E402

PROMPTS = ("a red cube", "a blue sphere", "a green torus", "a yellow cone", "a white mushroom", "a purple dumbbell",
           "a small orange cylinder", "a large pink torus")


def per_object_seconds(gen: Generator, requests: list[Request], threads: int) -> float:
    start = time.perf_counter()
    made = list(run(gen, requests, object_threads=threads))
    assert len(made) == len(requests)
    return (time.perf_counter() - start) / len(requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--object-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--views", type=int, default=0, help="preview frames per object (default: %(default)s)")
    parser.add_argument("--texture", type=int, default=0, help="texture size, 0 for vertex colours (default: 0)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128], help="marching-cubes grids (default: 128)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.batch_sizes) < 1 or min(args.object_threads) < 1 or min(args.resolutions) < 16:
        parser.error("--repeats, --batch-sizes and --object-threads must be at least 1, --resolutions at least 16")
    torch.set_grad_enabled(False)
    gen = Generator.from_checkpoint(args.ckpt)
    options = gen.default_options().replace(preview_views=args.views, texture=args.texture).validate()
    settings = [(r, b, t) for r in args.resolutions for b in args.batch_sizes for t in args.object_threads
                if t == 1 or b > 1]
    times: dict[tuple[int, int, int], list[float]] = {s: [] for s in settings}
    seed = 0

    def requests(resolution: int, batch: int, same_seeds: bool) -> list[Request]:
        nonlocal seed
        seed += 0 if same_seeds else batch  # the grids of one round mesh the same objects
        grid = options.replace(mesh_resolution=resolution)
        return [Request(PROMPTS[i % len(PROMPTS)], seed + i, grid, ("glb",)) for i in range(batch)]

    per_object_seconds(gen, requests(args.resolutions[0], max(args.batch_sizes), False), max(args.object_threads))
    for _ in range(args.repeats):  # settings in turn, so each sees the same load
        for k, (resolution, batch, threads) in enumerate(settings):
            times[(resolution, batch, threads)].append(
                per_object_seconds(gen, requests(resolution, batch, same_seeds=k % len(settings) != 0), threads))
    base = statistics.median(times[settings[0]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {args.views} previews, texture "
          f"{args.texture}; median of {args.repeats} rounds")
    print(f"{'grid':>6} {'batch':>5} {'object threads':>14} {'ms / object':>12} {'runs':>30} {'vs first':>9}")
    for (resolution, batch, threads), seconds in times.items():
        median = statistics.median(seconds)
        runs = " ".join(f"{1e3 * s:.0f}" for s in seconds)
        print(f"{resolution:>5}^3 {batch:>5} {threads:>14} {1e3 * median:>12.1f} {runs:>30} {median / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
