"""Multi-view object datasets: one reader per on-disk layout, chosen from the object folder (`read_object`).

- NeRF-synthetic (`transforms.json` + RGBA images per object): the synthetic generator's output and any
  NeRF-synthetic style capture: intrinsics from `camera_angle_x` (+ `camera_angle_y`) or
  `fl_x`/`fl_y`/`cx`/`cy` (+ `w`/`h`), top level or per frame, and `file_path` with or without its
  extension; optional per-frame `albedo_path` and `normal_depth_path` (in every frame or in none) name
  the channel files of `training.data.channels`, in project units and axes.
- G-Objaverse (`campos_512_v4/000NN/` per object, `training.data.gobjaverse`).

Everything read is checked once, here, and problems raise `DatasetError` naming the file and the frame,
so a training run can skip or stop on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from training.data.channels import decode_normal_depth, read_albedo, read_exr, read_exr_size
from training.data.gobjaverse import VIEWS_DIR, is_gobjaverse, read_gobjaverse
from training.data.records import (
    CHANNELS,
    DatasetError,
    ObjectRecord,
    check_number,
    check_rigid,
    check_size,
    image_size,
)

IMAGE_SUFFIX = ".png"  # appended to extension-less file_path entries, as in the original NeRF-synthetic
CHANNEL_FIELDS = {"albedo_path": "albedo", "normal_depth_path": "normal_depth"}  # optional per-frame files


@dataclass(frozen=True)
class ObjectViews:
    """All views of one object: RGBA [V, H, W, 4] in [0, 1], c2w [V, 4, 4], intrinsics [V, 4]."""

    images: torch.Tensor
    c2w: torch.Tensor
    intrinsics: torch.Tensor
    caption: str | None
    meta: dict


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
        return check_number(frame[key], f"{tpath}: frames[{i}].{key}", positive)
    if key in top:
        return check_number(top[key], f"{tpath}: {key} (used by frames[{i}])", positive)
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
    channel_paths: dict[str, list[Path | None]] = {key: [] for key in CHANNEL_FIELDS}
    for i, frame in enumerate(frames):
        where = f"{tpath}: frames[{i}]"
        if not isinstance(frame, dict):
            raise DatasetError(f"{where}: expected an object, got {type(frame).__name__}")
        file_path = frame.get("file_path")
        if not isinstance(file_path, str):
            raise DatasetError(f"{where}.file_path: expected a string, got {type(file_path).__name__}")
        poses.append(check_rigid(frame.get("transform_matrix"), f"{where}.transform_matrix"))
        image_path = _resolve_image(tpath.parent, file_path, f"{where}.file_path")
        width, height = image_size(image_path, where)  # reads the header only
        expected = (int(_camera_field(data, frame, "w", tpath, i) or width),
                    int(_camera_field(data, frame, "h", tpath, i) or height))
        if (width, height) != expected or (size is not None and (width, height) != size):
            want = expected if (width, height) != expected else size
            raise DatasetError(f"{where}: image {image_path} is {width}x{height}, "
                               f"expected {want[0]}x{want[1]}")
        size = (width, height)
        intrinsics.append(_intrinsics(data, frame, width, height, tpath, i))
        image_paths.append(image_path)
        for key, paths in channel_paths.items():
            paths.append(_channel_file(tpath, frame, key, size, i))
    for key, paths in channel_paths.items():
        if any(p is None for p in paths) and any(p is not None for p in paths):
            i, j = (next(n for n, p in enumerate(paths) if (p is None) == missing) for missing in (True, False))
            raise DatasetError(f"{tpath}: frames[{i}]: no {key} while frames[{j}] has one (all frames or none)")
    return ObjectRecord(transforms_path=tpath, image_paths=tuple(image_paths), c2w=np.stack(poses),
                        intrinsics=np.array(intrinsics, dtype=np.float32), height=size[1], width=size[0],
                        caption=caption, meta={k: v for k, v in data.items() if k != "frames"},
                        **{f"{CHANNEL_FIELDS[k]}_paths": None if paths[0] is None else tuple(paths)
                           for k, paths in channel_paths.items()})


def _channel_file(tpath: Path, frame: dict, key: str, size: tuple[int, int], i: int) -> Path | None:
    """The checked path of frame i's optional channel file `key` (albedo_path, normal_depth_path), if any."""
    if key not in frame:
        return None
    where = f"{tpath}: frames[{i}].{key}"
    if not isinstance(frame[key], str):
        raise DatasetError(f"{where}: expected a string, got {type(frame[key]).__name__}")
    path = tpath.parent / frame[key]
    if not path.is_file():
        raise DatasetError(f"{where}: {frame[key]!r} not found (looked for {path})")
    found = read_exr_size(path, where) if key == "normal_depth_path" else image_size(path, where)
    check_size(path, found, size, where)
    return path


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


def read_object(path: str | Path) -> ObjectRecord:
    """Validate one object with the reader its layout needs: a transforms json, or a folder holding
    transforms.json (NeRF-synthetic) or campos_512_v4/ (G-Objaverse; that folder itself works too)."""
    path = Path(path)
    if path.suffix == ".json" or (path / "transforms.json").is_file():
        return read_transforms(path)
    if is_gobjaverse(path) or path.name == VIEWS_DIR:
        return read_gobjaverse(path if is_gobjaverse(path) else path.parent)
    raise DatasetError(f"{path / 'transforms.json'}: transforms file not found, nor a G-Objaverse "
                       f"{VIEWS_DIR}/ folder beside it")


def load_channels(record: ObjectRecord, frame: int, alpha: np.ndarray, channels: Sequence[str]
                  ) -> dict[str, np.ndarray]:
    """Decode the requested channels of view `frame` at full size, float32: "albedo" [H, W, 3] over black
    (premultiplied by `alpha`), "depth" [H, W] and "normal" [H, W, 3] as `channels.decode_normal_depth` gives
    them (project units and axes, 0 where `alpha` [H, W] in [0, 1] is 0)."""
    where = f"{record.transforms_path}: frames[{frame}]"
    missing = sorted(set(channels) - record.channels)
    if missing:
        raise DatasetError(f"{where}: the object has no {', '.join(missing)} files")
    out = {}
    if "albedo" in channels:
        albedo = read_albedo(record.albedo_paths[frame], where)
        check_size(record.albedo_paths[frame], albedo.shape[1::-1], (record.width, record.height), where)
        out["albedo"] = albedo.astype(np.float32) / 255.0
    if "depth" in channels or "normal" in channels:
        path = record.normal_depth_paths[frame]
        nd = read_exr(path, where)
        check_size(path, nd.shape[1::-1], (record.width, record.height), where)
        depth, normal = decode_normal_depth(nd, alpha, record.c2w[frame], record.intrinsics[frame], record.layout)
        out.update({k: v for k, v in (("depth", depth), ("normal", normal)) if k in channels})
    return out


def load_object(path: str | Path) -> ObjectViews:
    """Read and validate every view of one object (any layout `read_object` knows)."""
    record = read_object(path)
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
    """Objects under root/split/<object>/ in either layout, each item a random set of input and target views.

    An item holds input_images [Vi, 3, H, W] (RGB over white), input_c2w [Vi, 4, 4], input_intrinsics
    [Vi, 4], the same for the targets plus target_masks [Vt, 1, H, W] (alpha), caption and index; and,
    for each of `channels` (of "albedo", "depth", "normal"; "available": those every object has, or with
    `partial_channels` those some object has), target
    views' target_albedos [Vt, 3, H, W] (unlit colour over white), target_depths [Vt, 1, H, W] (distance
    along each pixel's ray given a hit, project units, as `RenderOutput.depth`; 0 where target_masks is 0)
    and target_normals [Vt, 3, H, W] (unit world normals, 0 where target_masks is 0), with has_albedo,
    has_depth, has_normal (bool scalars) saying whether the object has the channel. Resizing averages
    depth and normals weighted by alpha, so an edge pixel holds the surface's values, not the background's.

    An object that lacks a requested channel is a validation failure, unless `partial_channels`: then it is
    kept, its items hold the empty value (white albedo, zero depth and normals) and has_<channel> False, and
    `self.channels` is the requested channels at least one object has (a loss on them masks per item).

    on_error="skip" drops objects that fail the validation pass at construction (a missing requested
    channel included) and objects whose files fail to decode later (an item then falls back to the next
    object); every skip is in `self.skipped` as (path, reason). DataLoader workers keep their own copy of
    `skipped` and of the cache, so the complete report comes from the main process (num_workers=0) or
    from the construction pass. on_error="raise" raises on the first problem.
    """

    def __init__(self, root: str | Path, split: str = "train", num_input_views: int = 4,
                 num_target_views: int = 4, image_size: int | tuple[int, int] | None = None,
                 on_error: Literal["skip", "raise"] = "skip", seed: int = 0, cache: bool = False,
                 channels: Sequence[str] | Literal["available"] = (), partial_channels: bool = False) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if num_input_views < 1 or num_target_views < 1:
            raise ValueError(f"num_input_views and num_target_views must be >= 1, got "
                             f"{num_input_views} and {num_target_views}")
        if channels != "available" and not set(channels) <= set(CHANNELS):
            raise ValueError(f"channels must be 'available' or some of {', '.join(CHANNELS)}, got {channels!r}")
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
                record = read_object(folder)
                missing = [] if channels == "available" or partial_channels else sorted(set(channels) - record.channels)
                if missing:
                    raise DatasetError(f"{record.transforms_path}: no {', '.join(missing)} files "
                                       f"(the dataset was asked for {', '.join(channels)})")
                self.records.append(record)
            except DatasetError as err:
                if on_error == "raise":
                    raise
                self.skipped.append((str(folder), str(err)))
        if not self.records:
            reason = f"; first problem: {self.skipped[0][1]}" if self.skipped else ""
            raise DatasetError(f"{split_dir}: no valid objects ({len(self.skipped)} skipped){reason}")
        combine = frozenset.union if partial_channels else frozenset.intersection
        have = combine(*(r.channels for r in self.records))
        self.channels = tuple(c for c in CHANNELS if c in (have if channels == "available" else channels))
        self._failed: set[int] = set()
        # Decoded views keyed by (object, frame), compact (CPU training re-reads them every epoch; 5000 objects of
        # 24 views with every channel are 7 GB so, 15 GB in float32): RGBa and albedo uint8, depth and normals
        # float16. Items are made from the same compact views with or without the cache.
        self._cache: dict[tuple[int, int], dict[str, np.ndarray]] | None = {} if cache else None

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

    def _view(self, j: int, frame: int) -> dict[str, np.ndarray]:
        """One view at the output size, from the cache when enabled: "rgba" premultiplied uint8 [H, W, 4],
        and per requested channel "albedo" (over white, uint8) [H, W, 3], "depth" [H, W, 1] and "normal" [H, W, 3]
        (float16)."""
        if self._cache is not None and (j, frame) in self._cache:
            return self._cache[j, frame]
        straight = load_image(self.records[j], frame)
        image = Image.fromarray(straight, "RGBA").convert("RGBa")
        resize = self.image_size is not None and image.size != self.image_size[::-1]
        if resize:
            # Resizing premultiplied colour keeps the empty (RGB = 0) background from bleeding into edges;
            # PIL's bilinear filter widens with the scale factor, so downscaling is antialiased.
            image = image.resize(self.image_size[::-1], Image.Resampling.BILINEAR)
        view = {"rgba": np.asarray(image)}
        if self.channels:
            alpha = straight[..., 3].astype(np.float32) / 255.0
            full = load_channels(self.records[j], frame, alpha, [c for c in self.channels
                                                                 if c in self.records[j].channels])
            channels = _weighted_channels(alpha, full, self.image_size if resize else None)
            view.update({name: np.round(v * 255.0).astype(np.uint8) if name == "albedo" else v.astype(np.float16)
                         for name, v in channels.items()})
        if self._cache is not None:
            self._cache[j, frame] = view
        return view

    def _views(self, j: int, frames: np.ndarray, channels: bool = False) -> dict[str, torch.Tensor]:
        """Views -> "images" (RGB over white) [V, 3, H, W], "masks" (alpha) [V, 1, H, W], "c2w" [V, 4, 4],
        "intrinsics" [V, 4] and, with `channels`, "albedos", "depths", "normals" [V, C, H, W]."""
        record = self.records[j]
        views = [self._view(j, int(f)) for f in frames]
        # Pixel work stays in numpy: torch's thread pool costs ~40x on tiny tensors on a busy 2-core machine.
        rgba = np.stack([v["rgba"] for v in views]).transpose(0, 3, 1, 2) / np.float32(255.0)
        alpha = rgba[:, 3:]
        out = {"images": np.clip(rgba[:, :3] + (1.0 - alpha), 0.0, 1.0), "masks": alpha}
        for name in self.channels if channels else ():
            if name in record.channels:
                out[name + "s"] = _expand(name, np.stack([v[name] for v in views]).transpose(0, 3, 1, 2))
            else:  # partial_channels: the empty value, and has_<name> False in the item
                out[name + "s"] = np.full((len(frames), 3 if name != "depth" else 1, *alpha.shape[2:]),
                                          1.0 if name == "albedo" else 0.0, np.float32)
        intrinsics = record.intrinsics[frames]
        if self.image_size is not None:
            h, w = self.image_size
            sx, sy = w / record.width, h / record.height
            intrinsics = intrinsics * np.array([sx, sy, sx, sy], dtype=np.float32)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        return {**tensors, "c2w": torch.from_numpy(record.c2w[frames]), "intrinsics": torch.from_numpy(intrinsics)}

    def _item(self, j: int) -> dict:
        record = self.records[j]
        rng = np.random.default_rng([self.seed, self.epoch, j])
        inputs, targets = choose_views(len(record.image_paths), self.num_input_views,
                                       self.num_target_views, rng)
        source = self._views(j, inputs)
        target = self._views(j, targets, channels=True)
        return {"input_images": source["images"], "input_c2w": source["c2w"], "input_intrinsics": source["intrinsics"],
                **{f"target_{k}": v for k, v in target.items()}, "caption": record.caption or "", "index": j,
                **{f"has_{name}": torch.tensor(name in record.channels) for name in self.channels}}


def _expand(name: str, compact: np.ndarray) -> np.ndarray:
    """A channel stack [V, C, H, W] as `_view` holds it -> float32: albedo / 255, normals unit length again."""
    if name == "albedo":
        return compact / np.float32(255.0)
    values = compact.astype(np.float32)
    if name == "normal":
        length = np.linalg.norm(values, axis=1, keepdims=True)
        values = np.where(length > 0, values / np.maximum(length, 1e-12), 0.0).astype(np.float32)
    return values


def _weighted_channels(alpha: np.ndarray, full: dict[str, np.ndarray], size: tuple[int, int] | None
                       ) -> dict[str, np.ndarray]:
    """Full-size channels -> [h, w, C] at `size` (h, w) (None: as they are): albedo composited over white,
    depth and normals averaged with alpha weights; white and 0 where the resized alpha is below half a uint8
    step, as the mask (uint8) is 0 there."""
    names = list(full)
    stack = [alpha[..., None]] + [full[n] if n == "albedo" else alpha[..., None] * full[n].reshape(*alpha.shape, -1)
                                  for n in names]
    planes = np.concatenate(stack, axis=-1)
    if size is not None:
        h, w = size
        planes = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize(
            (w, h), Image.Resampling.BILINEAR)) for c in range(planes.shape[-1])], axis=-1)
    a, out, start = planes[..., :1], {}, 1
    valid = a >= 0.5 / 255.0
    for name in names:
        width = 1 if name == "depth" else 3
        value = planes[..., start:start + width]
        start += width
        if name == "albedo":
            out[name] = np.where(valid, np.clip(value + (1.0 - a), 0.0, 1.0), 1.0)
        elif name == "depth":
            out[name] = np.where(valid, value / np.maximum(a, 1e-12), 0.0)
        else:
            out[name] = np.where(valid, value / np.maximum(np.linalg.norm(value, axis=-1, keepdims=True), 1e-12), 0.0)
    return {k: v.astype(np.float32) for k, v in out.items()}
