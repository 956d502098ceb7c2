"""G-Objaverse, LN3Diff's own training renders: one object folder holding `campos_512_v4/000NN/` per view.

Each view folder holds `000NN.png` (RGBA, straight alpha), `000NN_albedo.png` and `000NN_nd.exr` (see
`training.data.channels`) and `000NN.json`: the camera as `origin` and axes `x`, `y`, `z` (the columns of an
OpenCV camera-to-world matrix: x right, y down, z forward), `x_fov`/`y_fov` in radians, and `bbox` (the
object's box as [min, max]); world +Z is up. Other fields (`scale`, `offset`, `max_depth`, ...) are not
read. An optional `meta.json` beside `campos_512_v4/` is this project's addition: its `caption` becomes the
record's caption, its other fields the record's meta (the synthetic generator writes one).

Into the project's conventions:
- scale: G-Objaverse objects fit +-0.45 (the official field's box); the project normalises objects to
  +-0.9 of its [-1, 1]^3 box, so positions and depths are multiplied by GOBJAVERSE.world_scale = 2;
- cameras: OpenCV -> OpenGL through `opencv_to_opengl`, the one converter; the cameras' world is already +Z up;
- normals and `bbox`: stored in a Y-up, mirrored frame: world (x, y, z) = (-file x, -file z, file y)
  (FILE_TO_WORLD, measured on the shared deer: under it the EXR normals agree with the normals of the
  depth maps to a median cosine above 0.99 in every view, and the box with the depth maps' extent);
- intrinsics: fx = W / 2 / tan(x_fov / 2), fy = H / 2 / tan(y_fov / 2), principal point at the centre of the
  image as loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.cameras import opencv_to_opengl
from training.data.channels import read_exr_size
from training.data.records import (
    DatasetError,
    Layout,
    ObjectRecord,
    check_field_of_view,
    check_rigid,
    check_size,
    check_vector,
    image_size,
)

VIEWS_DIR = "campos_512_v4"
META_FILE = "meta.json"
# world = FILE_TO_WORLD @ file for normals and boxes: world x = -file x, world y = -file z, world z = file y.
FILE_TO_WORLD = ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))
GOBJAVERSE = Layout("gobjaverse", 2.0, FILE_TO_WORLD)


def is_gobjaverse(folder: Path) -> bool:
    return (folder / VIEWS_DIR).is_dir()


def view_files(views_dir: Path, index: int) -> dict[str, Path]:
    """The files of view `index`: {"json", "image", "albedo", "normal_depth"} -> path."""
    name = f"{index:05d}"
    folder = views_dir / name
    return {"json": folder / f"{name}.json", "image": folder / f"{name}.png",
            "albedo": folder / f"{name}_albedo.png", "normal_depth": folder / f"{name}_nd.exr"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _box_to_world(box: list[list[float]]) -> list[list[float]]:
    """A [min, max] box in file axes and units -> the [min, max] box in project axes and units."""
    corners = np.array(box) @ GOBJAVERSE.axes.T * GOBJAVERSE.world_scale  # a signed permutation keeps it a box
    return [np.minimum(*corners).tolist(), np.maximum(*corners).tolist()]


def read_camera(path: Path) -> tuple[np.ndarray, float, float, list[list[float]]]:
    """A view's camera JSON -> OpenGL camera-to-world [4, 4] float32 in project units, x_fov, y_fov, project bbox."""
    data = _read_json(path)
    for key in ("origin", "x", "y", "z", "x_fov", "y_fov", "bbox"):
        if key not in data:
            raise DatasetError(f"{path}: missing field {key!r}")
    columns = [check_vector(data[key], f"{path}: {key}") for key in ("x", "y", "z", "origin")]
    opencv = check_rigid([[col[r] for col in columns] for r in range(3)] + [[0.0, 0.0, 0.0, 1.0]],
                         f"{path}: x, y, z, origin")
    c2w = opencv_to_opengl(torch.from_numpy(opencv).double()).numpy()
    c2w[:3, 3] *= GOBJAVERSE.world_scale
    box = data["bbox"]
    if not isinstance(box, list) or len(box) != 2:
        raise DatasetError(f"{path}: bbox: expected [[min x, y, z], [max x, y, z]], got {json.dumps(box)[:80]}")
    box = [check_vector(corner, f"{path}: bbox") for corner in box]
    if any(lo > hi for lo, hi in zip(*box, strict=True)):
        raise DatasetError(f"{path}: bbox: min {box[0]} exceeds max {box[1]}")
    return (c2w.astype(np.float32), check_field_of_view(data["x_fov"], f"{path}: x_fov"),
            check_field_of_view(data["y_fov"], f"{path}: y_fov"), _box_to_world(box))


def _view_count(views_dir: Path) -> int:
    names = sorted(p.name for p in views_dir.iterdir() if p.is_dir() and len(p.name) == 5 and p.name.isdigit())
    if not names:
        raise DatasetError(f"{views_dir}: no view folders (00000/, 00001/, ...)")
    missing = sorted(set(f"{i:05d}" for i in range(int(names[-1]) + 1)) - set(names))
    if missing:
        raise DatasetError(f"{views_dir}: view folder {missing[0]}/ missing ({len(missing)} of "
                           f"00000..{names[-1]} missing)")
    return len(names)


def read_gobjaverse(folder: str | Path) -> ObjectRecord:
    """Validate a G-Objaverse object (the folder holding campos_512_v4/) without decoding pixels.

    Checks that every view has its four files, that its camera is a rigid pose with fields of view and a
    box, and that every image and EXR header gives one common size; raises `DatasetError` naming the file.
    """
    folder = Path(folder)
    views_dir = folder / VIEWS_DIR
    if not views_dir.is_dir():
        raise DatasetError(f"{views_dir}: G-Objaverse views folder not found")
    files, poses, intrinsics, size, bbox = [], [], [], None, None
    for i in range(_view_count(views_dir)):
        paths = view_files(views_dir, i)
        for path in paths.values():
            if not path.is_file():
                raise DatasetError(f"{path}: view file not found")
        c2w, x_fov, y_fov, view_bbox = read_camera(paths["json"])
        bbox = bbox or view_bbox
        width, height = image_size(paths["image"], f"{paths['image'].parent}")
        size = size or (width, height)
        check_size(paths["image"], (width, height), size, f"{paths['image'].parent}")
        check_size(paths["albedo"], image_size(paths["albedo"], f"{paths['albedo'].parent}"), size,
                   f"{paths['albedo'].parent}")
        check_size(paths["normal_depth"], read_exr_size(paths["normal_depth"], f"{paths['normal_depth'].parent}"),
                   size, f"{paths['normal_depth'].parent}")
        intrinsics.append([0.5 * width / math.tan(0.5 * x_fov), 0.5 * height / math.tan(0.5 * y_fov),
                           0.5 * width, 0.5 * height])
        poses.append(c2w)
        files.append(paths)
    meta, caption = {"layout": GOBJAVERSE.name, "bbox": bbox}, None
    if (folder / META_FILE).is_file():
        extra = _read_json(folder / META_FILE)
        caption = extra.pop("caption", None)
        if caption is not None and not isinstance(caption, str):
            raise DatasetError(f"{folder / META_FILE}: 'caption' must be a string, got {type(caption).__name__}")
        meta.update(extra)
    return ObjectRecord(transforms_path=views_dir, image_paths=tuple(f["image"] for f in files),
                        c2w=np.stack(poses), intrinsics=np.array(intrinsics, dtype=np.float32),
                        height=size[1], width=size[0], caption=caption, meta=meta,
                        albedo_paths=tuple(f["albedo"] for f in files),
                        normal_depth_paths=tuple(f["normal_depth"] for f in files), layout=GOBJAVERSE)


def camera_json(c2w: np.ndarray, fov_x: float, fov_y: float, bbox: list[list[float]]) -> dict:
    """The inverse of `read_camera`: an OpenGL camera-to-world [4, 4] in project units and a project box ->
    the view's G-Objaverse camera JSON (the fields this reader reads)."""
    opencv = opencv_to_opengl(torch.from_numpy(np.asarray(c2w, dtype=np.float64))).numpy()
    corners = np.array(bbox) @ GOBJAVERSE.axes / GOBJAVERSE.world_scale
    return {"origin": (opencv[:3, 3] / GOBJAVERSE.world_scale).tolist(), "x": opencv[:3, 0].tolist(),
            "y": opencv[:3, 1].tolist(), "z": opencv[:3, 2].tolist(), "x_fov": fov_x, "y_fov": fov_y,
            "bbox": [np.minimum(*corners).tolist(), np.maximum(*corners).tolist()]}
