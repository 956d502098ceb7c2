"""Dense vs coarse-to-fine mesh extraction: total time, field evaluations and how far the surfaces are apart.

Two fields: the tri-plane of an object the shipped model (or --ckpt) generates for a fixed prompt and
seed, queried as the request path queries it (threshold, chunk), and a random tri-plane
[1, 3, 32, 64, 64] with a 32 -> 64 -> 4 MLP plus a sphere of radius 0.5 (a bumpy sphere). Dense and
coarse-to-fine runs alternate in one process (`--repeats` each; the median is reported) so both see
the same load. Times are `extract_mesh` totals with vertex colours and no face budget (decimation
costs both the same), and the part of them spent inside the field's density and colour queries.
Coarse-to-fine also runs at `--resolutions` beyond the dense ones, and the last column gives each
resolution's time over the first's.

    OMP_NUM_THREADS=1 python benchmarks/bench_meshing.py [--ckpt PATH] [--dense 256] [--resolutions 256 384]
        [--repeats 3] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from kernels.dispatch import triplane_sample  # noqa: E402
from ln3diff_rt.conventions import FIELD_CHUNK  # noqa: E402
from ln3diff_rt.meshing import extract_mesh  # noqa: E402
from ln3diff_rt.options import GenerationOptions  # noqa: E402
from ln3diff_rt.pipeline import Generator  # noqa: E402
from ln3diff_rt.runner import Request, run  # noqa: E402

PROMPT, SEED = "a large red cube", 0


def random_triplane_field(seed: int = 0) -> dict:
    """A tri-plane MLP field plus a sphere of radius 0.5, at threshold 10."""
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

    return {"case": "random tri-plane + sphere", "density_fn": density_fn,
            "color_fn": lambda p: torch.sigmoid(query(p)[:, 1:]), "threshold": 10.0, "chunk": 2 ** 18}


def model_field(ckpt: str | None) -> dict:
    """The field of the object the model generates for PROMPT / SEED, queried as the request path does."""
    gen = Generator.from_checkpoint(ckpt)
    planes = next(run(gen, [Request(PROMPT, SEED, GenerationOptions(preview_views=0), mesh=False)])).triplane
    surface, level = gen.surface_fn(planes)
    name = Path(ckpt).name if ckpt else "shipped model"
    return {"case": f"{name}: '{PROMPT}'", "density_fn": surface, "color_fn": gen.colour_fn(planes),
            "threshold": level, "chunk": FIELD_CHUNK}


def timed(field: dict, resolution: int, coarse_resolution: int | None):
    """The mesh, its total seconds and the seconds spent inside the field (density and colour queries)."""
    inside = [0.0]

    def clocked(fn):
        def query(points):
            start = time.perf_counter()
            out = fn(points)
            inside[0] += time.perf_counter() - start
            return out
        return query

    start = time.perf_counter()
    mesh = extract_mesh(clocked(field["density_fn"]), resolution, field["threshold"],
                        color_fn=clocked(field["color_fn"]), coarse_resolution=coarse_resolution, chunk=field["chunk"])
    return mesh, time.perf_counter() - start, inside[0]


def hausdorff_cells(a: np.ndarray, b: np.ndarray, resolution: int) -> float:
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else float("inf")
    far = max(cKDTree(a).query(b)[0].max(), cKDTree(b).query(a)[0].max())
    return float(far) * (resolution - 1) / 2.0


def measure(field: dict, dense_resolutions: list[int], resolutions: list[int], repeats: int) -> list[dict]:
    extract_mesh(field["density_fn"], 32, field["threshold"], chunk=field["chunk"])  # warm-up
    rows = []
    for res in sorted(set(dense_resolutions) | set(resolutions)):
        dense_s, c2f_s, dense_field, c2f_field, dense, c2f = [], [], [], [], None, None
        for _ in range(repeats):  # alternated, so both see the same load
            if res in dense_resolutions:
                dense, seconds, in_field = timed(field, res, res)
                dense_s.append(seconds)
                dense_field.append(in_field)
            c2f, seconds, in_field = timed(field, res, None)
            c2f_s.append(seconds)
            c2f_field.append(in_field)
        row = {"case": field["case"], "resolution": res, "c2f_s": statistics.median(c2f_s),
               "c2f_field_s": statistics.median(c2f_field), "c2f_evaluations": c2f.stats["evaluations"],
               "c2f_faces": len(c2f.faces), "c2f_seconds": c2f.stats["seconds"]}
        if dense is not None:
            row.update(dense_s=statistics.median(dense_s), dense_field_s=statistics.median(dense_field),
                       speedup=statistics.median(dense_s) / row["c2f_s"],
                       dense_evaluations=dense.stats["evaluations"], dense_faces=len(dense.faces),
                       hausdorff_cells=hausdorff_cells(dense.vertices, c2f.vertices, res))
        rows.append(row)
    for row in rows:
        row["c2f_over_first"] = row["c2f_s"] / rows[0]["c2f_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<36} {'grid':>6} {'dense s':>8} {'c2f s':>7} {'ratio':>7} {'in field dense / c2f':>21}"
          f" {'evaluations dense / c2f':>25} {'faces dense / c2f':>19} {'Hausdorff':>13} {'c2f vs first':>12}")
    for r in rows:
        dense = "dense_s" in r
        evals = f"{r['dense_evaluations'] if dense else '-'} / {r['c2f_evaluations']}"
        faces = f"{r['dense_faces'] if dense else '-'} / {r['c2f_faces']}"
        dense_field = f"{r['dense_field_s']:.2f}" if dense else "-"
        in_field = f"{dense_field} / {r['c2f_field_s']:.2f} s"
        print(f"{r['case']:<36} {r['resolution']:>5}^3 {r['dense_s'] if dense else float('nan'):>8.2f}"
              f" {r['c2f_s']:>7.2f} {r['speedup'] if dense else float('nan'):>6.1f}x {in_field:>21} {evals:>25}"
              f" {faces:>19}"
              f" {r['hausdorff_cells'] if dense else float('nan'):>7.4f} cells {r['c2f_over_first']:>11.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint for the model field (default: the shipped model)")
    parser.add_argument("--dense", type=int, nargs="*", default=[256], help="resolutions also sampled densely")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", nargs="?", const=str(Path(__file__).with_suffix(".json")), default=None,
                        help="write the rows as JSON (default path: next to this script)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}; expected at least 1")
    torch.set_grad_enabled(False)
    rows = []
    for field in (model_field(args.ckpt), random_triplane_field()):
        rows += measure(field, args.dense, args.resolutions, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
          f"median of {args.repeats} alternated runs")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
