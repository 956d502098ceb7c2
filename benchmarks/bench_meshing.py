"""Dense vs coarse-to-fine mesh extraction on a field that costs what a tri-plane query costs.

The field samples random tri-planes [1, 3, 32, 64, 64] through `kernels.dispatch.triplane_sample`
and a 32 -> 64 -> 4 MLP (density `softplus(sigma - 1)`, sigmoid RGB), plus an analytic sphere of
radius 0.5 so that the threshold-10 surface exists (a bumpy sphere).

    python benchmarks/bench_meshing.py [--resolutions 128 256] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from kernels.dispatch import triplane_sample
from ln3diff_rt.meshing import extract_mesh


def triplane_field(seed: int = 0):
    """density_fn, color_fn over points [N, 3]: a tri-plane MLP field plus a sphere of radius 0.5."""
    gen = torch.Generator().manual_seed(seed)
    planes = 0.5 * torch.randn(1, 3, 32, 64, 64, generator=gen)  # [B, 3, C, R, R]
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def query(points: torch.Tensor) -> torch.Tensor:
        return mlp(triplane_sample(planes, points[None])[0])  # [N, 4]

    def density_fn(points: torch.Tensor) -> torch.Tensor:
        sigma = F.softplus(query(points)[:, 0] - 1.0)
        return sigma + 200.0 * (0.5 - points.norm(dim=-1)) + 10.0

    def color_fn(points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(query(points)[:, 1:])

    return density_fn, color_fn


def timed_extract(density_fn, color_fn, resolution: int, coarse_resolution: int | None):
    start = time.perf_counter()
    mesh = extract_mesh(density_fn, resolution, color_fn=color_fn, coarse_resolution=coarse_resolution)
    return mesh, 1e3 * (time.perf_counter() - start)


def run(resolutions: list[int]) -> list[dict]:
    density_fn, color_fn = triplane_field()
    extract_mesh(density_fn, 32, color_fn=color_fn)  # warm-up
    rows = []
    for res in resolutions:
        dense, dense_ms = timed_extract(density_fn, color_fn, res, coarse_resolution=res)
        fast, fast_ms = timed_extract(density_fn, color_fn, res, coarse_resolution=None)
        hausdorff = max(cKDTree(dense.vertices).query(fast.vertices)[0].max(),
                        cKDTree(fast.vertices).query(dense.vertices)[0].max())
        rows.append({
            "case": f"tri-plane 32x64^2 + MLP, {res}^3",
            "resolution": res,
            "coarse_stride": fast.stats["coarse_stride"],
            "dense_ms": dense_ms,
            "c2f_ms": fast_ms,
            "speedup": dense_ms / fast_ms,
            "dense_evaluations": dense.stats["evaluations"],
            "c2f_evaluations": fast.stats["evaluations"],
            "dense_vertices": len(dense.vertices),
            "c2f_vertices": len(fast.vertices),
            "hausdorff_cells": float(hausdorff) * (res - 1) / 2.0,
            "dense_seconds": dense.stats["seconds"],
            "c2f_seconds": fast.stats["seconds"],
        })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<32} {'dense ms':>10} {'c2f ms':>10} {'ratio':>7} {'evaluations dense / c2f':>26}"
          f" {'vertices dense / c2f':>22} {'Hausdorff':>10}")
    for r in rows:
        evals = f"{r['dense_evaluations']} / {r['c2f_evaluations']}"
        verts = f"{r['dense_vertices']} / {r['c2f_vertices']}"
        print(f"{r['case']:<32} {r['dense_ms']:>10.0f} {r['c2f_ms']:>10.0f} {r['speedup']:>6.1f}x {evals:>26}"
              f" {verts:>22} {r['hausdorff_cells']:>6.3f} cell")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--json", nargs="?", const=str(Path(__file__).with_suffix(".json")), default=None,
                        help="write the rows as JSON (default path: next to this script)")
    args = parser.parse_args()
    rows = run(args.resolutions)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
