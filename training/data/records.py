"""What a dataset reader hands on: one validated object (`ObjectRecord`) and the checks every reader shares.

Both on-disk layouts (NeRF-synthetic, G-Objaverse) validate into the same record: cameras already in the
project's convention (OpenGL camera-to-world, world +Z up, project world units), pixel files by view, and
the `Layout` that says how the layout's own files differ from the project (world scale, normal axes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

RIGID_TOL = 1e-3  # max |R^T R - I| and |last row - (0, 0, 0, 1)|: float32 poses sit far below it
CHANNELS = ("albedo", "depth", "normal")  # the optional per-view channels beyond RGBA


class DatasetError(Exception):
    """A dataset file is missing or malformed; the message names the file and the frame."""


@dataclass(frozen=True)
class Layout:
    """How a layout's files relate to the project's world: positions and depths in file units times
    `world_scale` are project units, and `file_to_world` [3x3] turns the files' normal vectors (and boxes)
    into the project's world axes (world +Z up)."""

    name: str
    world_scale: float
    file_to_world: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def axes(self) -> np.ndarray:
        return np.array(self.file_to_world, dtype=np.float64)


NERF = Layout("nerf", 1.0)


@dataclass(frozen=True)
class ObjectRecord:
    """What the validation pass learns from an object's camera files and image headers, no pixels decoded.

    `transforms_path` is the file or folder errors name, and its parent is the object folder: the
    transforms.json of a NeRF-synthetic object, the campos_512_v4/ folder of a G-Objaverse one.
    `albedo_paths` and `normal_depth_paths` are per view, or None where the object has no such files.
    """

    transforms_path: Path
    image_paths: tuple[Path, ...]
    c2w: np.ndarray  # [V, 4, 4] float32, OpenGL camera-to-world in project units
    intrinsics: np.ndarray  # [V, 4] float32, (fx, fy, cx, cy) in pixels at the image size
    height: int
    width: int
    caption: str | None
    meta: dict  # the top-level fields other than frames (G-Objaverse: "layout", "bbox" and meta.json's)
    albedo_paths: tuple[Path, ...] | None = None
    normal_depth_paths: tuple[Path, ...] | None = None
    layout: Layout = NERF

    @property
    def channels(self) -> frozenset[str]:
        """The optional channels (of CHANNELS) this object has for every view."""
        have = {"albedo"} if self.albedo_paths is not None else set()
        return frozenset(have | ({"depth", "normal"} if self.normal_depth_paths is not None else set()))


def check_number(value: object, where: str, positive: bool = False) -> float:
    """A finite (and, if asked, positive) JSON number, or a DatasetError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DatasetError(f"{where}: expected a finite number, got {type(value).__name__} {value!r:.60}")
    if positive and value <= 0:
        raise DatasetError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def check_vector(value: object, where: str, length: int = 3) -> list[float]:
    """A JSON list of `length` finite numbers."""
    if not isinstance(value, list) or len(value) != length:
        raise DatasetError(f"{where}: expected a list of {length} numbers, got {json.dumps(value)[:80]}")
    return [check_number(x, where) for x in value]


def check_rigid(value: object, where: str) -> np.ndarray:
    """A 4x4 list of lists holding a rigid, right-handed camera-to-world matrix -> float32 [4, 4]."""
    rows_ok = isinstance(value, list) and all(isinstance(r, list) and len(r) == 4 for r in value)
    if not (rows_ok and len(value) == 4):
        raise DatasetError(f"{where}: expected a 4x4 list of lists, got {json.dumps(value)[:80]}")
    m = np.array([[check_number(x, where) for x in row] for row in value], dtype=np.float64)
    rot = m[:3, :3]
    row_err = np.abs(m[3] - [0.0, 0.0, 0.0, 1.0]).max()
    ortho_err = np.abs(rot.T @ rot - np.eye(3)).max()
    if row_err > RIGID_TOL or ortho_err > RIGID_TOL or np.linalg.det(rot) < 0:
        raise DatasetError(f"{where}: not a rigid camera-to-world matrix (last row off by {row_err:.3g}, "
                           f"|R^T R - I| = {ortho_err:.3g}, det R = {np.linalg.det(rot):.3g})")
    return m.astype(np.float32)


def check_field_of_view(value: object, where: str) -> float:
    angle = check_number(value, where, positive=True)
    if angle >= math.pi:
        raise DatasetError(f"{where}: {angle} is not a field of view in radians")
    return angle


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{where}: cannot read image {path} ({err})") from err


def check_size(path: Path, size: tuple[int, int], expected: tuple[int, int], where: str) -> None:
    if size != expected:
        raise DatasetError(f"{where}: {path} is {size[0]}x{size[1]}, expected {expected[0]}x{expected[1]}")
