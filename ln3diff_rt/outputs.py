"""Writing a generation result to disk: the asset's files, turntable PNGs and an animated GIF."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from ln3diff_rt.mesh_export import export_file_name
from ln3diff_rt.runner import GenerationResult


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


def write_result(result: GenerationResult, out_dir: str | Path) -> list[Path]:
    """Write what the result holds (its asset files side by side, as they refer to each other, and previews),
    files named after the result's stem (the request's name or prompt, and the seed); returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = result.stem
    written = []
    for key, data in result.exports.items():
        path = out / export_file_name(stem, key)
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
