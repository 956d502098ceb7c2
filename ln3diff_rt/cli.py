"""`ln3diff` command line: thin parsing over functions that tests call too.

User mistakes (empty prompt, bad numbers, unreadable checkpoint) end with one line on stderr and
exit code 2, never a traceback. The generation flags come from `ln3diff_rt.options`, so they have
the names, defaults and bounds the server and the client have.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ln3diff_rt.backends import BACKENDS, backends_help
from ln3diff_rt.options import (
    FORMATS,
    MAX_SEED,
    SEED,
    GenerationOptions,
    InvalidOption,
    add_option_flags,
    add_precision_flag,
    flag_name,
    options_from_args,
)

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
DEFAULT_CHECKPOINT_NAME = "ln3diff-tiny.safetensors"
OBJECT_THREADS_HELP = ("objects meshed, exported and previewed at once on threads (default: 2 with the eager "
                       "backend, 1.07-1.27x per object at batch 8 on 2 cores; always 1 with another backend)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ln3diff", description="LN3Diff runtime: text or image -> 3D assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="print parameter counts and latent / tri-plane shapes of each preset")
    g = sub.add_parser("generate", help="text or image -> 3D asset (GLB/OBJ/PLY/USDZ/USDA) and turntable previews",
                       description="Generate 3D objects from prompts and/or images with the shipped model or "
                                   "--ckpt. Examples: ln3diff generate \"a red cube\" --out out/; "
                                   "ln3diff generate --image photo.png --out out/")
    g.add_argument("prompts", nargs="*", help="prompts; each becomes one object (with as many --image as prompts, "
                                              "prompt i and image i make object i together)")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="condition image, repeatable, one object each: RGBA (alpha = the object's mask) or RGB on a "
                        "plain background (no background removal is done); the object is centred and scaled")
    g.add_argument("--out", default="out", help="output directory (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"{SEED.help}; object i uses seed + i (default: random, printed)")
    add_option_flags(g, GenerationOptions())
    g.add_argument("--format", default="glb", help=f"mesh format, one of {', '.join(FORMATS)} (default: glb)")
    g.add_argument("--ckpt", default=None, help=f"model checkpoint (default: the shipped {DEFAULT_CHECKPOINT_NAME})")
    g.add_argument("--backend", default="eager", help=f"{backends_help()} (default: eager)")
    g.add_argument("--engine", default=None, help="engine directory from export/build_engine.py (aoti/onnx/tensorrt)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    add_precision_flag(g)
    g.add_argument("--object-threads", type=int, default=None, metavar="N", help=OBJECT_THREADS_HELP)
    g.add_argument("--text-encoder", default=None,
                   help="text encoder: a local transformers directory or a Hugging Face id already in the local "
                        "cache (default: the one the checkpoint names; nothing is downloaded)")
    g.add_argument("--image-encoders", nargs=2, default=None, metavar=("CLIP", "DINO"),
                   help="the published image model's encoders: CLIP ViT-L/14 and DINOv2-with-registers ViT-L/14, "
                        "each a local directory or a cached Hugging Face id (default: the ones the checkpoint names)")
    c = sub.add_parser("convert", help="a published LN3Diff checkpoint -> this runtime's checkpoint format",
                       description="Convert a released LN3Diff joint model (Hugging Face yslan/LN3Diff, "
                                   "downloaded by you) strictly: every key is loaded or dropped by name, anything "
                                   "else is an error naming it. The official code and weights are under the S-Lab "
                                   "License 1.0 (non-commercial). Example: ln3diff convert official-t23d --ckpt "
                                   "t23d/model_joint_denoise_rec_model3910000.safetensors --out t23d.safetensors")
    c.add_argument("model", choices=["official-t23d", "official-i23d"], help="which published model the file is")
    c.add_argument("--ckpt", required=True, help="the released file (.safetensors, or .pt read weights-only)")
    c.add_argument("--out", required=True, help="the converted checkpoint to write (.safetensors)")
    c.add_argument("--heads", type=int, default=None,
                   help="DiT attention heads (default: read from the cross-attention width, 64 per head)")
    c.add_argument("--vae-heads", type=int, default=None,
                   help="VAE decoder attention heads (default: 16, the published value; no shape shows it)")
    b = sub.add_parser("batch", help="a list of prompts (text, JSONL, Parquet) -> assets and a manifest; resumable",
                       description="Generate every item of a list into --out, in batches; each finished item is "
                                   "recorded in OUT/manifest.jsonl (prompt, seed, files with sha256, timings) at once, "
                                   "so a rerun skips what is done. Example: ln3diff batch prompts.txt --out catalogue/")
    b.add_argument("list", help="one prompt per line (text); or one {\"prompt\", \"seed\", \"image\"} object per line "
                                "(.jsonl, image paths relative to the list); or a .parquet table with those columns")
    b.add_argument("--out", required=True, help="output folder; its manifest says what is done")
    b.add_argument("--seed", type=int, default=0, help="items without a seed use seed + their position (default: 0)")
    add_option_flags(b, GenerationOptions())
    b.add_argument("--format", default="glb", help=f"mesh formats, comma-separated, of {', '.join(FORMATS)} "
                                                   "(default: glb)")
    b.add_argument("--batch-size", type=int, default=4, help="items sampled together (default: %(default)s)")
    b.add_argument("--ckpt", default=None, help=f"model checkpoint (default: the shipped {DEFAULT_CHECKPOINT_NAME})")
    b.add_argument("--backend", default="eager", help=f"{backends_help()} (default: eager)")
    b.add_argument("--engine", default=None, help="engine directory from export/build_engine.py (aoti/onnx/tensorrt)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu; with --ray, auto: a "
                                                  "GPU per worker where the cluster has them)")
    b.add_argument("--text-encoder", default=None, help="text encoder: a local directory or a cached Hugging Face id")
    add_precision_flag(b)
    b.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray Data across the cluster's devices: its address (host:6379, auto) or 'local' "
                        "for a Ray instance on this machine (the cluster extra); OUT must be visible to every node")
    b.add_argument("--workers", type=int, default=None, help="with --ray: model workers (default: one per GPU, or 1)")
    b.add_argument("--object-threads", type=int, default=None, metavar="N", help=OBJECT_THREADS_HELP)
    return parser


def generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ln3diff_rt.images import read_image
    from ln3diff_rt.options import resolve_seed
    from ln3diff_rt.outputs import check_out_dir, write_result
    from ln3diff_rt.pipeline import Generator
    from ln3diff_rt.prompts import normalise_prompt
    from ln3diff_rt.runner import Request, run

    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}")
    args.prompts = [normalise_prompt(p) for p in args.prompts]  # NFC, no control or zero-width characters
    for i, prompt in enumerate(args.prompts):
        if not prompt:
            raise ValueError(f"prompt {i + 1} is empty: describe the object, e.g. \"a red cube\"")
    if not args.prompts and not args.image:
        raise ValueError("nothing to generate: give a prompt (\"a red cube\") or --image FILE")
    if args.prompts and args.image and len(args.prompts) != len(args.image):
        raise ValueError(f"{len(args.prompts)} prompts and {len(args.image)} images: give as many of each (prompt "
                         "i goes with image i), or only prompts, or only images")
    images = [read_image(path) for path in args.image]  # unreadable files fail here, named, before the model loads
    check_out_dir(args.out)
    count = max(len(args.prompts), len(images))
    prompts, images = args.prompts or [""] * count, images or [None] * count
    names = args.prompts or [Path(path).stem for path in args.image]
    options_from_args(args)  # bad flags fail before the model is loaded
    first = resolve_seed(args.seed)
    if first + count - 1 > MAX_SEED:
        raise InvalidOption("seed", first, f"at most {MAX_SEED - count + 1} for {count} objects "
                                           "(object i uses seed + i)")
    if args.backend not in BACKENDS:
        raise ValueError(f"backend={args.backend!r}: expected one of {', '.join(BACKENDS)}")
    if args.object_threads is not None and args.object_threads < 1:
        raise ValueError(f"--object-threads {args.object_threads}: expected at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")

    start = time.perf_counter()
    generator = Generator.from_checkpoint(args.ckpt, device=args.device, backend=args.backend,
                                          engine_dir=args.engine, text_encoder=args.text_encoder,
                                          image_encoders=tuple(args.image_encoders) if args.image_encoders else None,
                                          precision=args.precision)
    load_s = time.perf_counter() - start
    options = options_from_args(args, generator.default_options())  # unset flags take the model's defaults
    for prompt in dict.fromkeys(p for p in prompts if p):
        for warning in generator.prompt_warnings(prompt):
            print(f"warning: {warning}", file=sys.stderr)
    seeds = [first + i for i in range(count)]
    bars: dict[str, tqdm] = {}
    tty = sys.stderr.isatty()  # bars on a terminal; in a file or a pipe, one line per batch stage

    def progress(stage: str, done: int, total: int, index: int | None) -> None:
        if not tty:
            if index is None and (done == 0 or (stage == "sample" and done == total)):
                print(f"{stage} {done}/{total}", file=sys.stderr, flush=True)
            return
        if index is not None:  # per-object stages: one bar counting finished objects
            stage, done, total = "objects", index + (done == total), count
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, leave=False))
        bar.n = done
        bar.refresh()

    requests = [Request(p, s, options, (args.format,), image=image, name=name)
                for p, s, image, name in zip(prompts, seeds, images, names, strict=True)]
    done = 0
    try:
        for result in run(generator, requests, progress=progress,  # each object is written as soon as it is made
                          object_threads=args.object_threads):
            paths = write_result(result, args.out)
            done += 1
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
            tqdm.write(f"{names[result.index]!r} (seed {result.seed}): {stages}")
            if result.mesh is None or result.mesh.empty:
                tqdm.write("  no surface found at the density threshold: no mesh written (try another seed)")
            else:
                tqdm.write(f"  mesh: {len(result.mesh.vertices)} vertices, {len(result.mesh.faces)} faces")
            for p in paths:
                tqdm.write(f"  wrote {p}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {done} of {count} objects written to {args.out}", file=sys.stderr)
        return INTERRUPTED
    finally:
        for bar in bars.values():
            bar.close()
    print(f"model load {load_s:.2f}s, total {time.perf_counter() - start:.2f}s")
    return 0


def batch(args: argparse.Namespace) -> int:
    import importlib.util

    from tqdm import tqdm

    from ln3diff_rt.batch import ModelSpec, run_batch
    from ln3diff_rt.options import option_specs

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        raise ValueError(f"--format {args.format!r}: expected some of {', '.join(FORMATS)}, comma-separated, "
                         "each once")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise ValueError("--ray needs the cluster extra (ray[data]): pip install 'ln3diff-rt[cluster]'")
    overrides = {name: getattr(args, name) for name in option_specs() if getattr(args, name) is not None}
    model = ModelSpec(args.ckpt, args.device or ("auto" if args.ray else "cpu"), args.backend, args.engine,
                      args.text_encoder, args.precision)
    tty, bar, done = sys.stderr.isatty(), None, []  # on a terminal a bar, in a file or a pipe a line per item

    def on_plan(total: int, skipped: int) -> None:
        nonlocal bar
        print(f"{total} items, {skipped} already in the manifest, {total - skipped} to make", file=sys.stderr)
        bar = tqdm(total=total - skipped, desc="items", disable=not tty)

    def on_record(record: dict) -> None:
        bar.update()
        done.append(record["key"])
        if not tty:
            print(f"[{len(done)}/{bar.total}] {record['prompt'] or record['image']!r} (seed {record['seed']}): "
                  f"{len(record['files'])} files, {record['timings']['wall']:.2f}s", file=sys.stderr, flush=True)

    try:
        summary = run_batch(args.list, args.out, model, overrides, formats, args.seed, args.batch_size, args.ray,
                            args.workers, on_plan, on_record, args.object_threads)
    finally:
        if bar is not None:
            bar.close()
    print(f"made {summary.made}, skipped {summary.skipped} of {summary.total} items in {summary.seconds:.1f}s; "
          f"manifest {summary.manifest}" + (f" and {summary.parquet.name}" if summary.parquet else ""))
    return 0


def convert(args: argparse.Namespace) -> int:
    from ln3diff_rt.official.convert import convert as convert_official

    start = time.perf_counter()
    config = convert_official(args.model.removeprefix("official-"), args.ckpt, args.out, args.heads, args.vae_heads)
    dit, vae = config.official_dit, config.official_vae
    print(f"converted {args.ckpt} -> {args.out} in {time.perf_counter() - start:.1f}s: {config.preset}, DiT "
          f"{dit.depth} blocks x {dit.width} ({dit.heads} heads), VAE decoder {vae.depth} blocks x {vae.width} "
          f"({vae.heads} heads), tri-plane {'x'.join(map(str, config.triplane_shape))}")
    print(f"next: ln3diff generate \"a red car\" --ckpt {args.out}"
          + (" --text-encoder PATH_TO/clip-vit-large-patch14" if config.objective == "eps" else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from ln3diff_rt.presets import presets_table

        print(presets_table())
        return 0
    from ln3diff_rt.checkpoint import CheckpointError

    try:
        return {"convert": convert, "batch": batch}.get(args.command, generate)(args)
    except KeyboardInterrupt:
        print(f"\nln3diff {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except InvalidOption as e:
        print(f"ln3diff {args.command}: error: {flag_name(e.field)}={e.value!r}: expected {e.expected}",
              file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"ln3diff {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR


def entry() -> None:
    """The `ln3diff` console script: `main`, then, after `generate`, an exit that skips the interpreter's teardown.

    Tearing down a process that imported torch takes ~0.5 s (`python -c "import torch"` spends 0.48 s after its
    last line on this project's CPU machine), a fifth of a cold `ln3diff generate`. By then every file is written
    and closed; the streams and logging are flushed here. Not when something may still own other processes or
    need its exit hooks: torch.compile's workers, multiprocessing children, or another command (`batch` on Ray).
    """
    import multiprocessing

    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] == ["generate"] and "torch._inductor" not in sys.modules and not multiprocessing.active_children():
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
