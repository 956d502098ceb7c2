"""`ln3diff` command line: thin parsing over functions that tests call too.

User mistakes (empty prompt, bad numbers, unreadable checkpoint) end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from ln3diff_rt.mesh_export import FORMATS
from ln3diff_rt.pipeline import BACKENDS, DEFAULT_CHECKPOINT, GenerationOptions

USAGE_ERROR = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ln3diff", description="LN3Diff runtime: text -> 3D assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="print parameter counts and latent / tri-plane shapes of each preset")
    d = GenerationOptions()
    g = sub.add_parser("generate", help="text -> mesh (GLB/OBJ/PLY) and turntable previews",
                       description="Generate 3D objects from prompts with the shipped model or --ckpt. "
                                   "Example: ln3diff generate \"a red cube\" --out out/")
    g.add_argument("prompts", nargs="+", help="one or more prompts; each becomes one object")
    g.add_argument("--out", default="out", help="output directory (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the first object; object i uses seed + i (default: %(default)s)")
    g.add_argument("--steps", type=int, default=d.steps, help="flow-matching ODE steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=d.guidance,
                   help="classifier-free guidance scale; 1 disables it (default: %(default)s)")
    g.add_argument("--shift", type=float, default=d.shift,
                   help="time-grid shift, >1 favours the noise end (default: %(default)s)")
    g.add_argument("--sampler", default=d.sampler, help="euler or heun (default: %(default)s)")
    g.add_argument("--format", default="glb", help=f"mesh format, one of {', '.join(FORMATS)} (default: glb)")
    g.add_argument("--resolution", type=int, default=d.mesh_resolution,
                   help="marching-cubes grid per axis, refined coarse to fine (default: %(default)s)")
    g.add_argument("--faces", type=int, default=d.faces, help="face budget; 0 keeps every face (default: %(default)s)")
    g.add_argument("--views", type=int, default=d.preview_views,
                   help="turntable preview frames, 0 for none; on a CPU most of a request (default: %(default)s)")
    g.add_argument("--preview-size", type=int, default=d.preview_size,
                   help="preview frame size in pixels (default: %(default)s)")
    g.add_argument("--ckpt", default=None, help=f"model checkpoint (default: the shipped {DEFAULT_CHECKPOINT.name})")
    g.add_argument("--backend", default="eager", help=f"one of {', '.join(BACKENDS)} (default: eager)")
    g.add_argument("--engine", default=None, help="engine directory from export/build_engine.py (aoti/onnx/tensorrt)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    return parser


def generate(args: argparse.Namespace) -> int:
    import torch

    from ln3diff_rt.outputs import write_result
    from ln3diff_rt.pipeline import Generator

    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}")
    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty: describe the object, e.g. \"a red cube\"")
    options = GenerationOptions(steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler,
                                mesh_resolution=args.resolution, faces=args.faces or None,
                                preview_views=args.views, preview_size=args.preview_size)
    try:
        options.validate()
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('mesh_resolution', 'resolution').replace('preview_views', 'views')}") \
            from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")

    from tqdm import tqdm

    start = time.perf_counter()
    generator = Generator.from_checkpoint(args.ckpt, device=args.device, backend=args.backend,
                                          engine_dir=args.engine)
    load_s = time.perf_counter() - start
    seeds = [args.seed + i for i in range(len(args.prompts))]
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, leave=False))
        bar.n = done
        bar.refresh()

    results = generator.generate(args.prompts, seeds, options, progress=progress)
    for bar in bars.values():
        bar.close()
    for result in results:
        paths = write_result(result, args.out, args.format)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(f"{result.prompt!r} (seed {result.seed}): {stages}")
        if result.mesh is None or result.mesh.empty:
            print("  no surface found at the density threshold: no mesh written (try another seed)")
        else:
            print(f"  mesh: {len(result.mesh.vertices)} vertices, {len(result.mesh.faces)} faces")
        for p in paths:
            print(f"  wrote {p}")
    print(f"model load {load_s:.2f}s, total {time.perf_counter() - start:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from ln3diff_rt.presets import presets_table

        print(presets_table())
        return 0
    from ln3diff_rt.checkpoint import CheckpointError

    try:
        return generate(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"ln3diff generate: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
