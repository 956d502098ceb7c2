"""Writing a generation result to disk: the mesh file, turntable PNGs and an animated GIF."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from ln3diff_rt.runner import GenerationResult


def slug(prompt: str, seed: int) -> str:
    """A file-name stem from the prompt and seed: 'a red cube', 7 -> 'a-red-cube_s7'."""
    stem = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "object"
    return f"{stem}_s{seed}"


def write_result(result: GenerationResult, out_dir: str | Path, name: str | None = None) -> list[Path]:
    """Write what the result holds (its exported meshes and previews), files named after `name` (default: the
    prompt) and the seed; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = slug(result.prompt if name is None else name, result.seed)
    written = []
    for fmt, data in result.exports.items():
        path = out / f"{stem}.{fmt}"
        path.write_bytes(data)
        written.append(path)
    frames = [Image.fromarray(f) for f in result.previews]
    for i, frame in enumerate(frames):
        path = out / f"{stem}_view{i:02d}.png"
        frame.save(path)
        written.append(path)
    if len(frames) > 1:
        path = out / f"{stem}_turntable.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
        written.append(path)
    return written
