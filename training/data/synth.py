"""Procedural multi-view data: coloured primitives rendered exactly by sphere tracing their SDFs.

Each object is written with a caption such as "a small red torus" in either layout the readers take
(`--layout`): NeRF-synthetic (`transforms.json` plus RGBA PNG views, the default) or G-Objaverse
(`campos_512_v4/000NN/` with OpenCV camera JSONs in G-Objaverse's world scale and axes, the caption in
`meta.json`). Both carry the same channels per view: RGBA (lit), albedo (the named colour, unlit) and
normal + depth (`training.data.channels`), so the whole training and evaluation path runs on two CPU
cores without downloading Objaverse. The analytic geometry stays available through `ObjectSpec` and
`sdf`, which tests and evaluation use as ground truth.

    python -m training.data.synth --out data/synth --objects 500
    python -m training.data.synth --out data/synth-gobjaverse --objects 500 --layout gobjaverse
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from training.data import gobjaverse
from training.data.channels import encode_normal_depth, write_exr
from training.data.records import NERF, Layout

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.55, 0.20, 0.75),
    "white": (0.95, 0.95, 0.95),
    "pink": (0.95, 0.50, 0.70),
    "cyan": (0.10, 0.80, 0.85),
    "brown": (0.50, 0.30, 0.12),
}
# Half-extent of the object in world units: large fills the [-0.9, 0.9]^3 scene box, small half of it.
SIZES: dict[str, float] = {"small": 0.45, "medium": 0.68, "large": 0.9}

FOV_X = math.radians(50.0)
# With this radius and field of view all 8 corners of [-0.9, 0.9]^3 project inside the image for every
# azimuth and elevation in ELEVATION_RANGE (worst corner at 0.91 of the half-width).
CAMERA_RADIUS = 4.0
ELEVATION_RANGE = (-10.0, 60.0)
# Ambient + diffuse stays below 1 so a white object never matches the white training background.
LIGHT_DIR = np.array([0.5, 0.35, 0.8]) / np.linalg.norm([0.5, 0.35, 0.8])
AMBIENT, DIFFUSE = 0.4, 0.55

HIT_EPS = 1e-4
MAX_STEPS = 256
LAYOUTS: dict[str, Layout] = {"nerf": NERF, "gobjaverse": gobjaverse.GOBJAVERSE}


# Canonical shapes live in the unit frame: z in [-1, 1] and the footprint inside the unit disk in x-y,
# so that any yaw keeps the scaled object inside the scene box. Each maps points [..., 3] -> distances [...].

def _length(*components: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(c * c for c in components))


def _sd_sphere(p: np.ndarray, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return _length(p[..., 0] - centre[0], p[..., 1] - centre[1], p[..., 2] - centre[2]) - radius


def _sd_box(p: np.ndarray, half: float) -> np.ndarray:
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


def _sd_cylinder(radial: np.ndarray, axial: np.ndarray, radius: float, half_height: float) -> np.ndarray:
    """Exact capped cylinder from the distance to the axis and the coordinate along it."""
    dr, da = radial - radius, np.abs(axial) - half_height
    return np.minimum(np.maximum(dr, da), 0.0) + _length(np.maximum(dr, 0.0), np.maximum(da, 0.0))


def _sd_capped_cone(p: np.ndarray, half_height: float, r_bottom: float, r_top: float) -> np.ndarray:
    """Exact capped cone along z (Inigo Quilez's formulation), centred at the origin."""
    qx, qy = _length(p[..., 0], p[..., 1]), p[..., 2]
    k2x, k2y = r_top - r_bottom, 2.0 * half_height
    cax = qx - np.minimum(qx, np.where(qy < 0.0, r_bottom, r_top))
    cay = np.abs(qy) - half_height
    h = np.clip(((r_top - qx) * k2x + (half_height - qy) * k2y) / (k2x * k2x + k2y * k2y), 0.0, 1.0)
    cbx, cby = qx - r_top + k2x * h, qy - half_height + k2y * h
    sign = np.where((cbx < 0.0) & (cay < 0.0), -1.0, 1.0)
    return sign * np.sqrt(np.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))


def _sd_torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    return _length(_length(p[..., 0], p[..., 1]) - major, p[..., 2]) - minor


def _sd_capsule_x(p: np.ndarray, half_length: float, radius: float) -> np.ndarray:
    return _length(p[..., 0] - np.clip(p[..., 0], -half_length, half_length), p[..., 1], p[..., 2]) - radius


def _mushroom(p: np.ndarray) -> np.ndarray:
    stem = _sd_cylinder(_length(p[..., 0], p[..., 1]), p[..., 2] + 0.475, 0.25, 0.475)
    cap = np.maximum(_sd_sphere(p, (0.0, 0.0, -0.1), 0.88), -(p[..., 2] + 0.1))
    return np.minimum(stem, cap)


def _dumbbell(p: np.ndarray) -> np.ndarray:
    bells = np.minimum(_sd_sphere(p, (0.6, 0.0, 0.0), 0.38), _sd_sphere(p, (-0.6, 0.0, 0.0), 0.38))
    return np.minimum(bells, _sd_cylinder(_length(p[..., 1], p[..., 2]), p[..., 0], 0.13, 0.6))


_CANONICAL = {
    "sphere": lambda p: _sd_sphere(p, (0.0, 0.0, 0.0), 1.0),
    "cube": lambda p: _sd_box(p, 0.7),
    "cylinder": lambda p: _sd_cylinder(_length(p[..., 0], p[..., 1]), p[..., 2], 0.75, 0.95),
    "cone": lambda p: _sd_capped_cone(p, 0.95, 0.9, 0.0),
    "torus": lambda p: _sd_torus(p, 0.68, 0.3),
    "capsule": lambda p: _sd_capsule_x(p, 0.5, 0.48),
    "snowman": lambda p: np.minimum(_sd_sphere(p, (0.0, 0.0, -0.42), 0.56),
                                    _sd_sphere(p, (0.0, 0.0, 0.52), 0.42)),
    "mushroom": _mushroom,
    "dumbbell": _dumbbell,
}
SHAPES: tuple[str, ...] = tuple(_CANONICAL)


@dataclass(frozen=True)
class ObjectSpec:
    """One procedural object: the canonical shape scaled to `size` and turned by `yaw_deg` about world +Z."""

    shape: str
    colour: str
    size: str
    yaw_deg: float

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                      ("size", self.size, tuple(SIZES))):
            if value not in allowed:
                raise ValueError(f"ObjectSpec.{field}: {value!r} is not one of {', '.join(allowed)}")

    @property
    def colour_rgb(self) -> tuple[float, float, float]:
        return COLOURS[self.colour]

    @property
    def scale(self) -> float:
        return SIZES[self.size]

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def to_meta(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "colour_rgb": list(self.colour_rgb),
                "size": self.size, "yaw_deg": self.yaw_deg}

    @classmethod
    def from_meta(cls, meta: dict) -> ObjectSpec:
        """Rebuild the spec from the `ln3diff_synth` block of a transforms.json."""
        return cls(meta["shape"], meta["colour"], meta["size"], float(meta["yaw_deg"]))


def random_spec(rng: np.random.Generator) -> ObjectSpec:
    return ObjectSpec(shape=SHAPES[rng.integers(len(SHAPES))],
                      colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
                      size=tuple(SIZES)[rng.integers(len(SIZES))],
                      yaw_deg=round(float(rng.uniform(0.0, 360.0)), 3))


def sdf(spec: ObjectSpec, points: np.ndarray) -> np.ndarray:
    """Signed distance [...] from world points [..., 3] to the object (negative inside)."""
    points = np.asarray(points, dtype=np.float64)
    yaw = math.radians(spec.yaw_deg)
    c, s = math.cos(yaw), math.sin(yaw)
    # World -> canonical: undo the yaw (rotate by -yaw about z), then the scale.
    local = np.stack([c * points[..., 0] + s * points[..., 1], -s * points[..., 0] + c * points[..., 1],
                      points[..., 2]], axis=-1) / spec.scale
    return spec.scale * _CANONICAL[spec.shape](local)


def bounding_radius(spec: ObjectSpec) -> float:
    """Radius of a sphere about the origin that holds the object (canonical footprint <= 1, |z| <= 1)."""
    return spec.scale * math.sqrt(2.0)


def sample_cameras(rng: np.random.Generator, views: int) -> np.ndarray:
    """Camera-to-world [V, 4, 4] on the orbit sphere, random azimuth and elevation, looking at the origin."""
    azimuths = rng.uniform(0.0, 360.0, size=views)
    elevations = rng.uniform(*ELEVATION_RANGE, size=views)
    poses = [orbit_camera(float(a), float(e), CAMERA_RADIUS).numpy()
             for a, e in zip(azimuths, elevations, strict=True)]
    return np.stack(poses).astype(np.float64)


def _normals(spec: ObjectSpec, points: np.ndarray) -> np.ndarray:
    """Unit SDF gradients [N, 3] by the four-sample tetrahedron difference."""
    h = 1e-5
    offsets = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=np.float64)
    grad = sum(k * sdf(spec, points + h * k)[:, None] for k in offsets)
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class RenderedViews:
    """What `render` sees: rgba uint8 [V, H, W, 4] (straight Lambert + ambient colour, binary alpha), and
    where the alpha is 1 the distance along each pixel's ray to the surface, depth [V, H, W], and the unit
    world normal [V, H, W, 3] (both 0 elsewhere)."""

    rgba: np.ndarray
    depth: np.ndarray
    normal: np.ndarray


def render(spec: ObjectSpec, c2w: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> RenderedViews:
    """The object seen by cameras c2w [V, 4, 4] with intrinsics [4]."""
    origins, dirs = camera_rays(torch.from_numpy(c2w), torch.from_numpy(intrinsics).double(), height, width)
    origins, dirs = origins.reshape(-1, 3).numpy(), dirs.reshape(-1, 3).numpy()

    # Start each ray where it enters the bounding sphere; rays that miss it are background.
    b = (origins * dirs).sum(-1)
    disc = b * b - ((origins * origins).sum(-1) - bounding_radius(spec) ** 2)
    active = np.nonzero(disc > 0.0)[0]
    root = np.sqrt(disc[active])
    t, t_far = np.maximum(-b[active] - root, 0.0), -b[active] + root
    hit = np.zeros(len(dirs), dtype=bool)
    t_hit = np.zeros(len(dirs))
    for _ in range(MAX_STEPS):
        if len(active) == 0:
            break
        dist = sdf(spec, origins[active] + t[:, None] * dirs[active])
        done = dist < HIT_EPS
        hit[active[done]], t_hit[active[done]] = True, t[done]
        keep = ~done & (t + dist < t_far)
        active, t, t_far = active[keep], t[keep] + dist[keep], t_far[keep]
    # Rays still marching after MAX_STEPS are grazing the surface; within half a pixel counts as a hit.
    graze = sdf(spec, origins[active] + t[:, None] * dirs[active]) < 0.5 * t / float(intrinsics[0])
    hit[active[graze]], t_hit[active[graze]] = True, t[graze]

    rgba, normal = np.zeros((len(dirs), 4)), np.zeros((len(dirs), 3))
    idx = np.nonzero(hit)[0]
    normal[idx] = _normals(spec, origins[idx] + t_hit[idx, None] * dirs[idx])
    shade = AMBIENT + DIFFUSE * np.maximum(normal[idx] @ LIGHT_DIR, 0.0)
    rgba[idx, :3] = shade[:, None] * np.array(spec.colour_rgb)
    rgba[idx, 3] = 1.0
    shape = (len(c2w), height, width)
    return RenderedViews(rgba=np.round(rgba * 255.0).astype(np.uint8).reshape(*shape, 4),
                         depth=np.where(hit, t_hit, 0.0).reshape(shape), normal=normal.reshape(*shape, 3))


def write_object(folder: Path, spec: ObjectSpec, c2w: np.ndarray, size: int, layout: str = "nerf") -> None:
    """Render every view of `spec` and write the object folder in `layout` (one of LAYOUTS): RGBA, albedo
    and normal + depth per view, the cameras c2w [V, 4, 4] (OpenGL, project units) and the caption."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    folder.mkdir(parents=True)
    intrinsics = intrinsics_from_fov(FOV_X, size, size).numpy()
    views = render(spec, c2w, intrinsics, size, size)
    alpha = views.rgba[..., 3] / 255.0
    albedo = np.round(alpha[..., None] * np.array(spec.colour_rgb) * 255.0).astype(np.uint8)  # over black
    frames = []
    for i, pose in enumerate(c2w):
        if layout == "nerf":
            names = {"image": f"r_{i}.png", "albedo": f"r_{i}_albedo.png", "normal_depth": f"r_{i}_nd.exr"}
            paths = {k: folder / name for k, name in names.items()}
            frames.append({"file_path": names["image"], "transform_matrix": pose.tolist(),
                           "albedo_path": names["albedo"], "normal_depth_path": names["normal_depth"]})
        else:
            paths = gobjaverse.view_files(folder / gobjaverse.VIEWS_DIR, i)
            paths["json"].parent.mkdir(parents=True)
            box = [[-spec.scale] * 3, [spec.scale] * 3]  # holds any yaw of the canonical shape
            paths["json"].write_text(json.dumps(gobjaverse.camera_json(pose, FOV_X, FOV_X, box), indent=4) + "\n")
        Image.fromarray(views.rgba[i], "RGBA").save(paths["image"])
        Image.fromarray(albedo[i], "RGB").save(paths["albedo"])
        write_exr(paths["normal_depth"], encode_normal_depth(views.depth[i], views.normal[i], alpha[i], intrinsics,
                                                             LAYOUTS[layout]))
    if layout == "nerf":
        transforms = {"camera_angle_x": FOV_X, "w": size, "h": size, "caption": spec.caption,
                      "ln3diff_synth": spec.to_meta(), "frames": frames}
        (folder / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n")
    else:
        meta = {"caption": spec.caption, "ln3diff_synth": spec.to_meta()}
        (folder / gobjaverse.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def generate(out_dir: str | Path, objects: int, views: int = 24, size: int = 64, seed: int = 0,
             val_fraction: float = 0.1, progress: bool = False, layout: str = "nerf") -> list[dict]:
    """Write `objects` objects under out_dir/{train,val}/<id>/ and out_dir/index.json; return the index.

    Every object draws from its own generator seeded by (seed, object number), so the output is
    byte-identical for a seed whatever the order of work.
    """
    if objects < 1 or views < 1 or size < 8:
        raise ValueError(f"need objects >= 1, views >= 1 and size >= 8; got {objects}, {views}, {size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        # Stale object folders from an earlier run would silently join the dataset.
        raise ValueError(f"{out_dir} exists and is not empty; pick a new --out or delete it")
    n_val = min(round(objects * val_fraction), objects - 1)
    val_ids = set(np.random.default_rng([seed, 0]).permutation(objects)[:n_val].tolist())
    index = []
    for i in tqdm(range(objects), desc="objects", unit="obj", disable=not progress):
        rng = np.random.default_rng([seed, 1, i])
        spec = random_spec(rng)
        split, object_id = ("val" if i in val_ids else "train"), f"obj_{i:06d}"
        write_object(out_dir / split / object_id, spec, sample_cameras(rng, views), size, layout)
        index.append({"id": object_id, "split": split, "path": f"{split}/{object_id}",
                      "caption": spec.caption, "shape": spec.shape, "colour": spec.colour, "size": spec.size})
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.data.synth",
        description="Render procedural coloured primitives (sphere, cube, cylinder, cone, torus, capsule, "
                    "snowman, mushroom, dumbbell) with captions, albedo, normals and depth, into NeRF-synthetic or "
                    "G-Objaverse object folders.")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--objects", type=int, required=True, help="number of objects to generate")
    parser.add_argument("--views", type=int, default=24, help="views per object (default: 24)")
    parser.add_argument("--size", type=int, default=64, help="image width = height in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical output (default: 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of objects put in the val split (default: 0.1)")
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default="nerf",
                        help="nerf: transforms.json per object; gobjaverse: campos_512_v4/000NN/ (default: nerf)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        index = generate(args.out, args.objects, args.views, args.size, args.seed, args.val_fraction,
                         progress=True, layout=args.layout)
    except ValueError as err:
        parser.error(str(err))
    seconds = time.perf_counter() - start
    n_val = sum(entry["split"] == "val" for entry in index)
    print(f"wrote {len(index)} objects ({len(index) - n_val} train, {n_val} val) to {args.out} "
          f"in {seconds:.1f} s ({len(index) / seconds:.2f} objects/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
