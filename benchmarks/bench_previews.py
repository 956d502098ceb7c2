"""Turntable previews of the default request: the preview path against a baseline renderer, and a request's share.

    OMP_NUM_THREADS=1 python benchmarks/bench_previews.py [--repeats 5] [--png previews.png] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_previews.py --baseline-rev 0ff5585   # against that commit's previews

For each prompt the shipped model makes one tri-plane and its default mesh; its default previews (8 frames of
128 px) are rendered by `Generator.render_previews` as a request calls it, with that mesh (candidate: the mesh
rasterised, coloured by the field's lit colour at its vertices), and by a baseline, alternated in one process:
by default the field ray-marched at the model's own sample counts, every sample (`render_chunked` without an
occupancy grid, the image training and evaluation see); with `--baseline-rev REV`, the preview path of that
commit's `ln3diff_rt/rendering.py` (its occupancy grid, the model's counts). The error is then the asset's
frames against the field's (its silhouette is a pixel narrower: the field's density is soft across the surface).
Image error is the mean absolute difference of the uint8 frames (0-255, RGB), over all pixels and
over the baseline's object pixels (not background), and the largest. Then whole warm requests
(mesh, GLB, previews) with the default previews and with none, alternated: per-object time and the
previews' share, with the default texture bake and with vertex colours (texture 0). `--png` writes
baseline frames above candidate frames, one pair of rows per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ln3diff_rt import rendering  # noqa: E402
from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera  # noqa: E402
from ln3diff_rt.conventions import PREVIEW_ELEVATION, PREVIEW_FOV, PREVIEW_RADIUS  # noqa: E402
from ln3diff_rt.options import GenerationOptions  # noqa: E402
from ln3diff_rt.pipeline import Generator  # noqa: E402
from ln3diff_rt.runner import Request, run  # noqa: E402

PROMPTS = ("a red cube", "a blue torus", "a green sphere", "a small yellow cone")


def rendering_at(rev: str) -> types.ModuleType:
    """`ln3diff_rt/rendering.py` as it was at git revision `rev`, loaded beside today's."""
    source = subprocess.run(["git", "show", f"{rev}:ln3diff_rt/rendering.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"rendering_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:ln3diff_rt/rendering.py", "exec"), module.__dict__)
    return module


def baseline_previews(gen: Generator, planes: torch.Tensor, options: GenerationOptions,
                      module: types.ModuleType | None) -> list[np.ndarray]:
    """The pipeline's turntable frames rendered at the model's sample counts: every sample (`module` None),
    or through `module`'s occupancy grid."""
    size, field = options.preview_size, gen.components.field
    planes = planes[None].to(gen.device)
    occupancy = None if module is None else module.occupancy_grid(field, planes)
    render = rendering.render_chunked if module is None else module.render_chunked
    frames = []
    for i in range(options.preview_views):
        c2w = orbit_camera(360.0 * i / options.preview_views - 90.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
        origins, dirs = camera_rays(c2w, intrinsics_from_fov(PREVIEW_FOV, size, size), size, size)
        out = render(field, planes, origins.reshape(1, -1, 3).to(gen.device), dirs.reshape(1, -1, 3).to(gen.device),
                     gen.config.renderer, occupancy=occupancy)
        rgb = out.rgb[0].reshape(size, size, 3).clamp(0, 1)
        frames.append((rgb * 255.0 + 0.5).to(torch.uint8).cpu().numpy())
    return frames


def image_error(baseline: list[np.ndarray], candidate: list[np.ndarray], background: tuple[float, ...]) -> dict:
    a, b = np.stack(baseline).astype(np.float64), np.stack(candidate).astype(np.float64)
    diff = np.abs(a - b)
    bg = np.round(np.asarray(background) * 255.0)
    object_pixels = (a != bg).any(axis=-1)
    return {"mean": float(diff.mean()), "mean_object": float(diff[object_pixels].mean()), "max": float(diff.max())}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def compare_previews(gen: Generator, prompt: str, seed: int, repeats: int, module) -> tuple[dict, list, list]:
    planes = next(run(gen, [Request(prompt, seed, GenerationOptions(preview_views=0), mesh=False)])).triplane
    options = GenerationOptions()
    mesh = gen.extract_mesh(planes, options)  # the request's mesh, which its previews show
    base_s, cand_s = [], []
    for _ in range(repeats + 1):  # the first pair warms up
        t, base = timed(baseline_previews, gen, planes, options, module)
        base_s.append(t)
        t, cand = timed(gen.render_previews, planes, options, None, mesh)
        cand_s.append(t)
    base_ms, cand_ms = statistics.median(base_s[1:]) * 1e3, statistics.median(cand_s[1:]) * 1e3
    row = {"case": prompt, "baseline_ms": base_ms, "candidate_ms": cand_ms, "ratio": base_ms / cand_ms,
           "error": image_error(base, cand, gen.config.renderer.background)}
    return row, base, cand


def compare_requests(gen: Generator, prompt: str, seed: int, repeats: int, texture: int) -> dict:
    """Warm whole requests (mesh, GLB, previews) with the default previews and with none, alternated."""
    def request(options):
        result = next(run(gen, [Request(prompt, seed, options, formats=("glb",))]))
        return result.timings.get("preview", 0.0)

    with_s, without_s, preview_s = [], [], []
    for _ in range(repeats + 1):
        t, preview = timed(request, GenerationOptions(texture=texture))
        with_s.append(t)
        preview_s.append(preview)
        without_s.append(timed(request, GenerationOptions(texture=texture, preview_views=0))[0])
    total, without, preview = (statistics.median(v[1:]) for v in (with_s, without_s, preview_s))
    return {"case": prompt, "texture": texture, "request_ms": total * 1e3, "no_previews_ms": without * 1e3,
            "previews_ms": preview * 1e3, "previews_share": preview / total}


def write_png(path: str, pairs: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> None:
    from PIL import Image

    rows = [np.concatenate(frames, axis=1) for pair in pairs for frames in pair]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline-rev", default=None, help="git revision whose preview renderer is the baseline")
    p.add_argument("--png", default=None, help="baseline frames above candidate frames, per prompt")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "bench_previews.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    gen = Generator.from_checkpoint(args.ckpt)
    module = None if args.baseline_rev is None else rendering_at(args.baseline_rev)
    baseline = f"previews at {args.baseline_rev}" if module else "every sample, model counts"
    print(f"baseline: {baseline}; candidate: Generator.render_previews of the request's mesh; "
          f"threads {torch.get_num_threads()}")
    print(f"{'case':<22} {'baseline ms':>11} {'candidate ms':>12} {'ratio':>6} {'err mean':>8} "
          f"{'err object':>10} {'err max':>7}")
    rows, pairs = [], []
    for prompt in args.prompts:
        row, base, cand = compare_previews(gen, prompt, args.seed, args.repeats, module)
        rows.append(row)
        pairs.append((base, cand))
        e = row["error"]
        print(f"{prompt:<22} {row['baseline_ms']:>11.0f} {row['candidate_ms']:>12.0f} {row['ratio']:>5.2f}x "
              f"{e['mean']:>8.3f} {e['mean_object']:>10.3f} {e['max']:>7.0f}")
    print(f"\n{'case':<22} {'texture':>7} {'request ms':>10} {'no previews ms':>14} {'previews ms':>11} {'share':>6}")
    requests = []
    for texture in (GenerationOptions().texture, 0):
        for prompt in args.prompts:
            r = compare_requests(gen, prompt, args.seed, args.repeats, texture)
            requests.append(r)
            print(f"{r['case']:<22} {texture:>7} {r['request_ms']:>10.0f} {r['no_previews_ms']:>14.0f} "
                  f"{r['previews_ms']:>11.0f} {r['previews_share']:>6.2f}")
    if args.png:
        write_png(args.png, pairs)
    Path(args.json).write_text(json.dumps({"baseline": baseline, "threads": torch.get_num_threads(),
                                           "previews": rows, "requests": requests}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
