"""Per-stage timings of a request on the shipped model, and coarse-to-fine vs dense mesh extraction on its field.

    python benchmarks/bench_generate.py [--ckpt CKPT] [--prompt "a red cube"] [--repeats 3] [--json out.json]

Stage timings come from the profiler (`python -m ln3diff_rt.profile`), so both print the same
figures. The extraction comparison runs the same field (the tri-plane of one generated object)
through `extract_mesh` coarse to fine and densely (stride 1) at 128^3 and 256^3, and reports
time, density evaluations and how far the two surfaces are apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.spatial import cKDTree  # noqa: E402

from ln3diff_rt.conventions import FIELD_CHUNK  # noqa: E402
from ln3diff_rt.meshing import extract_mesh  # noqa: E402
from ln3diff_rt.options import GenerationOptions  # noqa: E402
from ln3diff_rt.pipeline import Generator  # noqa: E402
from ln3diff_rt.profile import Workload, format_table, profile  # noqa: E402
from ln3diff_rt.runner import Request, run  # noqa: E402


def compare_extraction(gen: Generator, planes, resolution: int) -> dict:
    density, threshold = gen.surface_fn(planes)
    runs = {}
    for name, coarse in (("coarse_to_fine", None), ("dense", resolution)):
        start = time.perf_counter()
        mesh = extract_mesh(density, resolution=resolution, threshold=threshold, coarse_resolution=coarse,
                            chunk=FIELD_CHUNK)
        runs[name] = (time.perf_counter() - start, mesh)
    (t_c2f, c2f), (t_dense, dense) = runs["coarse_to_fine"], runs["dense"]
    cell = 2.0 / (resolution - 1)
    hausdorff = 0.0
    if not c2f.empty and not dense.empty:
        hausdorff = max(cKDTree(dense.vertices).query(c2f.vertices)[0].max(),
                        cKDTree(c2f.vertices).query(dense.vertices)[0].max()) / cell
    return {"resolution": resolution, "dense_s": t_dense, "c2f_s": t_c2f, "speedup": t_dense / t_c2f,
            "dense_evaluations": dense.stats["evaluations"], "c2f_evaluations": c2f.stats["evaluations"],
            "dense_vertices": len(dense.vertices), "c2f_vertices": len(c2f.vertices), "hausdorff_cells": hausdorff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--prompt", default="a large red cube")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gen = Generator.from_checkpoint(args.ckpt)
    stages = profile(gen, Workload(1, GenerationOptions()), repeats=args.repeats, warmup=1)
    print(format_table(stages), end="\n\n")
    only_planes = GenerationOptions(preview_views=0)
    planes = next(run(gen, [Request(args.prompt, args.seed, only_planes, mesh=False)])).triplane
    rows = [compare_extraction(gen, planes, r) for r in (128, 256)]
    print(f"{'grid':>6} {'dense s':>9} {'c2f s':>8} {'speed-up':>9} {'evals dense':>12} {'evals c2f':>10} "
          f"{'verts dense':>11} {'verts c2f':>10} {'Hausdorff':>10}")
    for r in rows:
        print(f"{r['resolution']:>5}^3 {r['dense_s']:>9.2f} {r['c2f_s']:>8.2f} {r['speedup']:>8.1f}x "
              f"{r['dense_evaluations']:>12} {r['c2f_evaluations']:>10} {r['dense_vertices']:>11} "
              f"{r['c2f_vertices']:>10} {r['hausdorff_cells']:>8.2f} cells")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": stages, "extraction": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
