"""Multi-view object datasets in the NeRF-synthetic layout (`transforms.json` + RGBA images per object).

Reads the synthetic generator's output and any NeRF-synthetic style capture: intrinsics from
`camera_angle_x` (+ `camera_angle_y`) or `fl_x`/`fl_y`/`cx`/`cy` (+ `w`/`h`), top level or per frame,
and `file_path` with or without its extension. Everything read is checked once, here, and problems
raise `DatasetError` naming the file and the frame, so a training run can skip or stop on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

RIGID_TOL = 1e-3  # max |R^T R - I| and |last row - (0, 0, 0, 1)|: float32 poses sit far below it
IMAGE_SUFFIX = ".png"  # appended to extension-less file_path entries, as in the original NeRF-synthetic


class DatasetError(Exception):
    """A dataset file is missing or malformed; the message names the file and the frame."""


@dataclass(frozen=True)
class ObjectViews:
    """All views of one object: RGBA [V, H, W, 4] in [0, 1], c2w [V, 4, 4], intrinsics [V, 4]."""

    images: torch.Tensor
    c2w: torch.Tensor
    intrinsics: torch.Tensor
    caption: str | None
    meta: dict


@dataclass(frozen=True)
class ObjectRecord:
    """What the validation pass learns from transforms.json and the image headers, no pixels decoded."""

    transforms_path: Path
    image_paths: tuple[Path, ...]
    c2w: np.ndarray  # [V, 4, 4] float32
    intrinsics: np.ndarray  # [V, 4] float32, (fx, fy, cx, cy) in pixels
    height: int
    width: int
    caption: str | None
    meta: dict  # the top-level fields other than frames


def _number(value: object, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DatasetError(f"{where}: expected a finite number, got {type(value).__name__} {value!r:.60}")
    if positive and value <= 0:
        raise DatasetError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _rigid_matrix(value: object, where: str) -> np.ndarray:
    rows_ok = isinstance(value, list) and all(isinstance(r, list) and len(r) == 4 for r in value)
    if not (rows_ok and len(value) == 4):
        raise DatasetError(f"{where}: expected a 4x4 list of lists, got {json.dumps(value)[:80]}")
    m = np.array([[_number(x, where) for x in row] for row in value], dtype=np.float64)
    rot = m[:3, :3]
    row_err = np.abs(m[3] - [0.0, 0.0, 0.0, 1.0]).max()
    ortho_err = np.abs(rot.T @ rot - np.eye(3)).max()
    if row_err > RIGID_TOL or ortho_err > RIGID_TOL or np.linalg.det(rot) < 0:
        raise DatasetError(f"{where}: not a rigid camera-to-world matrix (last row off by {row_err:.3g}, "
                           f"|R^T R - I| = {ortho_err:.3g}, det R = {np.linalg.det(rot):.3g})")
    return m.astype(np.float32)


def _resolve_image(folder: Path, file_path: str, where: str) -> Path:
    path = folder / file_path
    if path.is_file():
        return path
    with_suffix = path.with_name(path.name + IMAGE_SUFFIX)
    if with_suffix.is_file():
        return with_suffix
    raise DatasetError(f"{where}: image {file_path!r} not found (looked for {path} and {with_suffix})")


def _camera_field(top: dict, frame: dict, key: str, tpath: Path, i: int, positive: bool = True
                  ) -> float | None:
    """A per-frame camera field, falling back to the top level; the error names where it was found."""
    if key in frame:
        return _number(frame[key], f"{tpath}: frames[{i}].{key}", positive)
    if key in top:
        return _number(top[key], f"{tpath}: {key} (used by frames[{i}])", positive)
    return None


def _intrinsics(top: dict, frame: dict, width: int, height: int, tpath: Path, i: int) -> list[float]:
    """(fx, fy, cx, cy) for frame i from the per-frame or top-level fields."""
    def get(key: str, positive: bool = True) -> float | None:
        return _camera_field(top, frame, key, tpath, i, positive)

    def focal_from_angle(key: str, extent: int) -> float | None:
        angle = get(key)
        if angle is not None and angle >= math.pi:
            raise DatasetError(f"{tpath}: frames[{i}]: {key} = {angle} is not a field of view in radians")
        return None if angle is None else 0.5 * extent / math.tan(0.5 * angle)

    fx = get("fl_x") or focal_from_angle("camera_angle_x", width)
    if fx is None:
        raise DatasetError(f"{tpath}: frames[{i}]: needs camera_angle_x or fl_x")
    fy = get("fl_y") or focal_from_angle("camera_angle_y", height) or fx
    cx, cy = get("cx", positive=False), get("cy", positive=False)
    return [fx, fy, width / 2.0 if cx is None else cx, height / 2.0 if cy is None else cy]


def _transforms_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / "transforms.json"


def read_transforms(path: str | Path) -> ObjectRecord:
    """Validate an object (its folder or its transforms json) without decoding pixels.

    Checks field types, rigid 4x4 poses, that every image exists and that its header gives the
    expected size; raises `DatasetError` naming the file and frame on the first problem.
    """
    tpath = _transforms_path(path)
    if not tpath.is_file():
        raise DatasetError(f"{tpath}: transforms file not found")
    try:
        data = json.loads(tpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{tpath}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{tpath}: expected a JSON object at the top level, got {type(data).__name__}")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DatasetError(f"{tpath}: 'frames' must be a non-empty list, got {json.dumps(frames)[:80]}")
    caption = data.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DatasetError(f"{tpath}: 'caption' must be a string, got {type(caption).__name__}")

    image_paths, poses, intrinsics, size = [], [], [], None
    for i, frame in enumerate(frames):
        where = f"{tpath}: frames[{i}]"
        if not isinstance(frame, dict):
            raise DatasetError(f"{where}: expected an object, got {type(frame).__name__}")
        file_path = frame.get("file_path")
        if not isinstance(file_path, str):
            raise DatasetError(f"{where}.file_path: expected a string, got {type(file_path).__name__}")
        poses.append(_rigid_matrix(frame.get("transform_matrix"), f"{where}.transform_matrix"))
        image_path = _resolve_image(tpath.parent, file_path, f"{where}.file_path")
        try:
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetError(f"{where}: cannot read image {image_path} ({err})") from err
        expected = (int(_camera_field(data, frame, "w", tpath, i) or width),
                    int(_camera_field(data, frame, "h", tpath, i) or height))
        if (width, height) != expected or (size is not None and (width, height) != size):
            want = expected if (width, height) != expected else size
            raise DatasetError(f"{where}: image {image_path} is {width}x{height}, "
                               f"expected {want[0]}x{want[1]}")
        size = (width, height)
        intrinsics.append(_intrinsics(data, frame, width, height, tpath, i))
        image_paths.append(image_path)
    return ObjectRecord(transforms_path=tpath, image_paths=tuple(image_paths), c2w=np.stack(poses),
                        intrinsics=np.array(intrinsics, dtype=np.float32), height=size[1], width=size[0],
                        caption=caption, meta={k: v for k, v in data.items() if k != "frames"})


def load_image(record: ObjectRecord, frame: int) -> np.ndarray:
    """Decode view `frame` of a validated object to straight RGBA uint8 [H, W, 4]."""
    path = record.image_paths[frame]
    try:
        with Image.open(path) as image:
            rgba = np.asarray(image.convert("RGBA"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{record.transforms_path}: frames[{frame}]: "
                           f"cannot decode image {path} ({err})") from err
    if rgba.shape[:2] != (record.height, record.width):
        raise DatasetError(f"{record.transforms_path}: frames[{frame}]: image {path} decoded to "
                           f"{rgba.shape[1]}x{rgba.shape[0]}, expected {record.width}x{record.height}")
    return rgba


def load_object(path: str | Path) -> ObjectViews:
    """Read and validate every view of one object (its folder or its transforms json)."""
    record = read_transforms(path)
    images = np.stack([load_image(record, i) for i in range(len(record.image_paths))])
    return ObjectViews(images=torch.from_numpy(images).float() / 255.0, c2w=torch.from_numpy(record.c2w),
                       intrinsics=torch.from_numpy(record.intrinsics), caption=record.caption,
                       meta=record.meta)


def choose_views(num_views: int, num_input: int, num_target: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Input and target view indices: disjoint when the object has enough views, else drawn with repeats."""
    order = rng.permutation(num_views)
    if num_views >= num_input + num_target:
        return order[:num_input], order[num_input:num_input + num_target]
    inputs = order[:num_input] if num_views >= num_input else rng.choice(num_views, num_input)
    return inputs, rng.choice(num_views, num_target, replace=num_views < num_target)


class MultiViewDataset(torch.utils.data.Dataset):
    """Objects under root/split/<object>/, each item a random set of input and target views.

    on_error="skip" drops objects that fail the validation pass at construction and objects whose
    images fail to decode later (an item then falls back to the next object); every skip is in
    `self.skipped` as (path, reason). DataLoader workers keep their own copy of `skipped` and of the
    cache, so the complete report comes from the main process (num_workers=0) or from the
    construction pass. on_error="raise" raises on the first problem.
    """

    def __init__(self, root: str | Path, split: str = "train", num_input_views: int = 4,
                 num_target_views: int = 4, image_size: int | tuple[int, int] | None = None,
                 on_error: Literal["skip", "raise"] = "skip", seed: int = 0, cache: bool = False) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if num_input_views < 1 or num_target_views < 1:
            raise ValueError(f"num_input_views and num_target_views must be >= 1, got "
                             f"{num_input_views} and {num_target_views}")
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: split folder not found")
        self.num_input_views, self.num_target_views = num_input_views, num_target_views
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.on_error, self.seed, self.epoch = on_error, seed, 0
        self.skipped: list[tuple[str, str]] = []
        self.records: list[ObjectRecord] = []
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            try:
                self.records.append(read_transforms(folder))
            except DatasetError as err:
                if on_error == "raise":
                    raise
                self.skipped.append((str(folder), str(err)))
        if not self.records:
            reason = f"; first problem: {self.skipped[0][1]}" if self.skipped else ""
            raise DatasetError(f"{split_dir}: no valid objects ({len(self.skipped)} skipped){reason}")
        self._failed: set[int] = set()
        # Decoded views keyed by (object, frame), uint8 to stay small: CPU training re-reads them every epoch.
        self._cache: dict[tuple[int, int], np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of views per object each epoch, reproducibly."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            j = (index + offset) % len(self.records)
            if j in self._failed:
                continue
            try:
                return self._item(j)
            except DatasetError as err:
                if self.on_error == "raise":
                    raise
                self._failed.add(j)
                self.skipped.append((str(self.records[j].transforms_path.parent), str(err)))
        raise DatasetError(f"every object failed to load; first problem: {self.skipped[0][1]}")

    def _image(self, j: int, frame: int) -> np.ndarray:
        """Premultiplied RGBa uint8 [H, W, 4] at the output size, from the cache when enabled."""
        if self._cache is not None and (j, frame) in self._cache:
            return self._cache[j, frame]
        image = Image.fromarray(load_image(self.records[j], frame), "RGBA").convert("RGBa")
        if self.image_size is not None and image.size != self.image_size[::-1]:
            # Resizing premultiplied colour keeps the empty (RGB = 0) background from bleeding into edges;
            # PIL's bilinear filter widens with the scale factor, so downscaling is antialiased.
            image = image.resize(self.image_size[::-1], Image.Resampling.BILINEAR)
        premultiplied = np.asarray(image)
        if self._cache is not None:
            self._cache[j, frame] = premultiplied
        return premultiplied

    def _views(self, j: int, frames: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views -> RGB over white [V, 3, H, W], alpha [V, 1, H, W], c2w [V, 4, 4], intrinsics [V, 4]."""
        record = self.records[j]
        # Pixel work stays in numpy: torch's thread pool costs ~40x on tiny tensors on a busy 2-core machine.
        rgba = np.stack([self._image(j, int(f)) for f in frames]).transpose(0, 3, 1, 2) / np.float32(255.0)
        alpha = rgba[:, 3:]
        rgb = np.clip(rgba[:, :3] + (1.0 - alpha), 0.0, 1.0)
        intrinsics = record.intrinsics[frames]
        if self.image_size is not None:
            h, w = self.image_size
            sx, sy = w / record.width, h / record.height
            intrinsics = intrinsics * np.array([sx, sy, sx, sy], dtype=np.float32)
        return (torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(alpha)),
                torch.from_numpy(record.c2w[frames]), torch.from_numpy(intrinsics))

    def _item(self, j: int) -> dict:
        record = self.records[j]
        rng = np.random.default_rng([self.seed, self.epoch, j])
        inputs, targets = choose_views(len(record.image_paths), self.num_input_views,
                                       self.num_target_views, rng)
        input_rgb, _, input_c2w, input_k = self._views(j, inputs)
        target_rgb, target_alpha, target_c2w, target_k = self._views(j, targets)
        return {"input_images": input_rgb, "input_c2w": input_c2w, "input_intrinsics": input_k,
                "target_images": target_rgb, "target_masks": target_alpha, "target_c2w": target_c2w,
                "target_intrinsics": target_k, "caption": record.caption or "", "index": j}
