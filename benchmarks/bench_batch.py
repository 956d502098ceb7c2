"""Per-object time of a request by batch size and by objects finished at once (`runner.run`'s object_threads).

The batch stages (text, sampling, decode) run once per batch; the per-object stages (mesh, export,
previews, texture) run object by object, or `--object-threads` at a time on threads. Every
(batch size, threads) setting runs in turn in one process, `--repeats` rounds, and the table gives the
median per-object time and its speed-up over batch 1 with one thread. The prompts cycle through the
shipped model's shapes and colours; seeds differ per object so no two are alike.

    python benchmarks/bench_batch.py [--ckpt PATH] [--batch-sizes 1 8] [--object-threads 1 2] [--repeats 3]
        [--views 0] [--texture 0] [--resolution 128]
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
    parser.add_argument("--resolution", type=int, default=128, help="marching-cubes grid (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.batch_sizes) < 1 or min(args.object_threads) < 1:
        parser.error("--repeats, --batch-sizes and --object-threads must be at least 1")
    torch.set_grad_enabled(False)
    gen = Generator.from_checkpoint(args.ckpt)
    options = gen.default_options().replace(preview_views=args.views, texture=args.texture,
                                            mesh_resolution=args.resolution).validate()
    settings = [(b, t) for b in args.batch_sizes for t in args.object_threads if t == 1 or b > 1]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    seed = 0

    def requests(batch: int) -> list[Request]:
        nonlocal seed
        seed += batch
        return [Request(PROMPTS[i % len(PROMPTS)], seed + i, options, ("glb",)) for i in range(batch)]

    per_object_seconds(gen, requests(max(args.batch_sizes)), max(args.object_threads))  # warm-up
    for _ in range(args.repeats):  # settings in turn, so each sees the same load
        for batch, threads in settings:
            times[(batch, threads)].append(per_object_seconds(gen, requests(batch), threads))
    base = statistics.median(times[settings[0]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {args.views} previews, texture "
          f"{args.texture}, {args.resolution}^3; median of {args.repeats} rounds")
    print(f"{'batch':>5} {'object threads':>14} {'ms / object':>12} {'runs':>24} {'vs first':>9}")
    for (batch, threads), seconds in times.items():
        median = statistics.median(seconds)
        runs = " ".join(f"{1e3 * s:.0f}" for s in seconds)
        print(f"{batch:>5} {threads:>14} {1e3 * median:>12.1f} {runs:>24} {base / median:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
