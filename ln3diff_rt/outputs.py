"""Writing a generation result to disk: the mesh file, turntable PNGs and an animated GIF."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from ln3diff_rt.runner import GenerationResult

SLUG_CHARS = 60


def slug(prompt: str, seed: int) -> str:
    """A file-name stem from the prompt and seed: 'a red cube', 7 -> 'a-red-cube_s7'.

    Where the readable part loses something (other scripts than ASCII, punctuation, a cut at
    SLUG_CHARS), a short hash of the whole prompt keeps distinct prompts in distinct files:
    '红色的立方体', 0 -> 'object-1b2c3d_s0'.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    stem = readable[:SLUG_CHARS] or "object"
    if stem != re.sub(r"\s+", "-", prompt.strip().lower()):
        stem += "-" + hashlib.sha256(prompt.encode()).hexdigest()[:6]
    return f"{stem}_s{seed}"


def check_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` if needed and prove it writable, before any work: ValueError naming the problem."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".ln3diff-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    return out


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
