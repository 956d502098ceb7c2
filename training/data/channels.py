"""The per-view channels beyond RGBA, in G-Objaverse's file format, which both layouts use:

- `*_albedo.png`: the unlit base colour over black, i.e. premultiplied by the view's alpha (the RGBA
  PNG's alpha; G-Objaverse's albedo alpha is 255 everywhere and is not read);
- `*_nd.exr`: R, G, B the unit surface normal in the layout's file axes, A the depth along the camera's
  viewing axis (z-depth) in file units; both blended with the empty background (normal (0, 0, 1),
  depth 0) by the view's alpha, the normal renormalised after (measured on the shared deer).

Decoded, they are in the project's conventions: `depth` is the distance from the camera centre along
each pixel's ray (what `RenderOutput.depth` holds) in project units, given a hit (the alpha blend
undone), 0 where alpha is 0; `normal` is the unit surface normal in project world axes, 0 where alpha
is 0. `encode_normal_depth` writes the same format; decoding inverts it exactly where alpha is 0.5 or more
(the synthetic generator's alpha is 0 or 1), and below picks the normal that faces the camera.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR
from PIL import Image, UnidentifiedImageError

from training.data.records import DatasetError, Layout

BACKGROUND_NORMAL = np.array([0.0, 0.0, 1.0])  # in file axes, where the EXR's alpha blend starts from
EXR_CHANNELS = ["A", "B", "G", "R"]  # sorted, as OpenEXR lists them
_READ_ERRORS = (RuntimeError, ValueError, OSError, KeyError)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def read_exr_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an RGBA EXR from its header; checks that it has the R, G, B and A channels."""
    try:
        header = OpenEXR.File(str(path), header_only=True).header()
        names = sorted(c.name for c in header["channels"])
        low, high = header["dataWindow"]
    except _READ_ERRORS as err:
        raise DatasetError(f"{where}: cannot read EXR {path} ({_one_line(err)})") from err
    if names != EXR_CHANNELS:
        raise DatasetError(f"{where}: EXR {path} has channels {','.join(names)}, expected R,G,B,A")
    return int(high[0] - low[0] + 1), int(high[1] - low[1] + 1)


def read_exr(path: Path, where: str) -> np.ndarray:
    """Decode an RGBA EXR to float32 [H, W, 4]."""
    try:
        with OpenEXR.File(str(path)) as exr:
            pixels = exr.channels()["RGBA"].pixels
    except _READ_ERRORS as err:
        raise DatasetError(f"{where}: cannot decode EXR {path} ({_one_line(err)})") from err
    return np.asarray(pixels, dtype=np.float32)


def write_exr(path: Path, rgba: np.ndarray) -> None:
    """Write [H, W, 4] as a half-float RGBA EXR with ZIP compression, as G-Objaverse stores them."""
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {"RGBA": np.ascontiguousarray(rgba, dtype=np.float16)}).write(str(path))


def read_albedo(path: Path, where: str) -> np.ndarray:
    """Albedo over black (premultiplied by the view's alpha), uint8 [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{where}: cannot decode image {path} ({err})") from err


def pixel_directions(intrinsics: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Camera-axis directions [N, 3] through pixel centres (cols + 0.5, rows + 0.5), scaled to z = -1 (OpenGL
    axes, as `camera_rays`): their length is the ray distance per unit of z-depth."""
    fx, fy, cx, cy = (float(k) for k in intrinsics)
    return np.stack([(cols + 0.5 - cx) / fx, -(rows + 0.5 - cy) / fy, -np.ones(len(rows))], axis=-1)


def decode_normal_depth(nd: np.ndarray, alpha: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray, layout: Layout
                        ) -> tuple[np.ndarray, np.ndarray]:
    """An `_nd.exr` [H, W, 4] and the view's alpha [H, W] in [0, 1] -> depth [H, W] and normal [H, W, 3]
    (float32, project conventions, 0 where alpha is 0) for the camera c2w [4, 4], intrinsics (fx, fy, cx, cy)."""
    hit = alpha > 0
    rows, cols = np.nonzero(hit)  # only covered pixels, a few percent of a view
    a = alpha[hit].astype(np.float64)[:, None]  # [N, 1]
    dirs = pixel_directions(intrinsics, rows, cols)  # [N, 3]
    depth, normal = np.zeros(alpha.shape, np.float32), np.zeros((*alpha.shape, 3), np.float32)
    depth[hit] = nd[hit, 3] / a[:, 0] * np.linalg.norm(dirs, axis=-1) * layout.world_scale
    # Undo m = |a n + c b|^-1 (a n + c b), c = 1 - a, b the background normal: s = |a n + c b| solves
    # |s m - c b| = |a n| = a, s = c (m.b) +- sqrt((c (m.b))^2 - c^2 + a^2), and n = (s m - c b) / a. For a >= 0.5
    # only + gives s > 0; below, both can, and the normal that faces the camera is taken, + if both do.
    m = nd[hit, :3] / np.maximum(np.linalg.norm(nd[hit, :3], axis=-1, keepdims=True), 1e-12)
    c, mb = 1.0 - a, m @ BACKGROUND_NORMAL[:, None]
    root = np.sqrt(np.maximum((c * mb) ** 2 - c * c + a * a, 0.0))
    plus, minus = ((c * mb + sign * root) * m - c * BACKGROUND_NORMAL for sign in (1.0, -1.0))
    minus_valid = c * mb - root > 0
    plus, minus = (n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12) @ layout.axes.T
                   for n in (plus, minus))
    view = dirs @ np.asarray(c2w, dtype=np.float64)[:3, :3].T  # world ray directions
    flip = ((plus * view).sum(-1, keepdims=True) > 0) & ((minus * view).sum(-1, keepdims=True) <= 0)
    normal[hit] = np.where(flip & minus_valid, minus, plus)
    return depth, normal


def encode_normal_depth(depth: np.ndarray, normal: np.ndarray, alpha: np.ndarray, intrinsics: np.ndarray,
                        layout: Layout) -> np.ndarray:
    """The inverse of `decode_normal_depth`: depth [H, W], world normal [H, W, 3], alpha [H, W] -> nd [H, W, 4]."""
    a = alpha.astype(np.float64)[..., None]
    rows, cols = np.indices(alpha.shape).reshape(2, -1)
    lengths = np.linalg.norm(pixel_directions(intrinsics, rows, cols), axis=-1).reshape(alpha.shape)
    z = depth / lengths / layout.world_scale
    blended = a * (normal @ layout.axes) + (1.0 - a) * BACKGROUND_NORMAL
    blended = blended / np.maximum(np.linalg.norm(blended, axis=-1, keepdims=True), 1e-12)
    return np.concatenate([blended, a * z[..., None]], axis=-1).astype(np.float32)
