"""The procedural generator: renders agree with the analytic geometry, output is reproducible and well formed.

Reference silhouettes are computed here from the files on disk (transforms.json poses, camera_angle_x)
with a hand-written pinhole model, so the checks also pin the camera convention of what was written.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov
from training.data import synth
from training.data.dataset import MultiViewDataset, read_object
from training.data.synth import ObjectSpec, generate, sdf, write_object


def _read(folder):
    meta = json.loads((folder / "transforms.json").read_text())
    images = np.stack([np.asarray(Image.open(folder / f["file_path"])) for f in meta["frames"]])
    c2w = np.array([f["transform_matrix"] for f in meta["frames"]], dtype=np.float64)
    return meta, images, c2w


def _pixel_rays(meta, c2w, size):
    """Origins [3] and unit directions [H, W, 3] through pixel centres: OpenGL camera, looks down -Z."""
    focal = 0.5 * size / math.tan(0.5 * meta["camera_angle_x"])
    v, u = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    cam = np.stack([(u - size / 2) / focal, -(v - size / 2) / focal, -np.ones_like(u)], axis=-1)
    dirs = cam @ c2w[:3, :3].T
    return c2w[:3, 3], dirs / np.linalg.norm(dirs, axis=-1, keepdims=True), focal


def _render_one(tmp_path, spec, views=3, size=48, seed=0):
    c2w = synth.sample_cameras(np.random.default_rng(seed), views)
    write_object(tmp_path / "obj", spec, c2w, size)
    return _read(tmp_path / "obj")


@pytest.mark.parametrize("size_name", ["small", "large"])
def test_sphere_mask_is_the_closed_form_disk(tmp_path, size_name):
    spec = ObjectSpec("sphere", "blue", size_name, 0.0)
    size = 48
    meta, images, c2w = _render_one(tmp_path, spec, views=4, size=size)
    radius = synth.SIZES[size_name]
    for image, pose in zip(images, c2w, strict=True):
        origin, dirs, focal = _pixel_rays(meta, pose, size)
        # Distance from the sphere's centre (the origin) to each pixel ray's line.
        dist = np.linalg.norm(np.cross(origin, dirs), axis=-1)
        inside = dist < radius
        band = np.abs(dist - radius) < np.linalg.norm(origin) / focal  # one pixel either side of the rim
        mask = image[..., 3] == 255
        assert set(np.unique(image[..., 3])) <= {0, 255}
        assert np.array_equal(mask[~band], inside[~band])
        assert inside.sum() > 20


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_mask_matches_brute_force_ray_march(tmp_path, shape):
    """Dense fixed-step marching of the SDF (no sphere tracing) decides each pixel independently."""
    spec = ObjectSpec(shape, "green", "large", 37.0)
    size = 32
    meta, images, c2w = _render_one(tmp_path, spec, views=1, size=size, seed=1)
    origin, dirs, focal = _pixel_rays(meta, c2w[0], size)
    r = np.linalg.norm(origin)
    ts = np.arange(r - 1.6, r + 1.6, 0.004)
    min_sdf = np.full((size, size), np.inf)
    for chunk in np.array_split(ts, 8):
        points = origin + chunk[:, None, None, None] * dirs[None]  # [T, H, W, 3]
        min_sdf = np.minimum(min_sdf, sdf(spec, points).min(axis=0))
    inside = min_sdf < 0.0
    # Rays passing within half a pixel of the surface are the boundary: either answer is right there.
    clear = np.abs(min_sdf) > 0.5 * r / focal
    mask = images[0, ..., 3] == 255
    assert np.array_equal(mask[clear], inside[clear])
    assert mask.sum() > 10


def test_cube_mask_matches_projected_solid(tmp_path):
    """Project a dense sampling of the cube's interior with the pinhole model; compare within a pixel."""
    spec = ObjectSpec("cube", "red", "medium", 20.0)
    size = 48
    meta, images, c2w = _render_one(tmp_path, spec, views=3, size=size, seed=2)
    grid = np.linspace(-0.9, 0.9, 121)
    points = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    points = points[sdf(spec, points) < 0.0]
    focal = 0.5 * size / math.tan(0.5 * meta["camera_angle_x"])

    def dilate(m):
        padded = np.pad(m, 1)
        return np.any([padded[1 + dy:1 + dy + size, 1 + dx:1 + dx + size]
                       for dy, dx in itertools.product((-1, 0, 1), repeat=2)], axis=0)

    for image, pose in zip(images, c2w, strict=True):
        cam = (points - pose[:3, 3]) @ pose[:3, :3]
        u = focal * cam[:, 0] / -cam[:, 2] + size / 2
        v = size / 2 - focal * cam[:, 1] / -cam[:, 2]
        splat = np.zeros((size, size), dtype=bool)
        splat[v.astype(int), u.astype(int)] = True
        mask = image[..., 3] == 255
        assert not (splat & ~dilate(mask)).any()
        assert not (mask & ~dilate(splat)).any()


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_objects_fit_the_scene_box_and_large_fills_it(shape):
    grid = np.linspace(-1.1, 1.1, 89)
    points = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1)
    for yaw in (0.0, 45.0, 123.0):
        inside = points[sdf(ObjectSpec(shape, "red", "large", yaw), points) < 0.0]
        assert np.abs(inside).max() <= 0.9
        # Any yaw must fit, so a large object reaches the cylinder |xy|, |z| <= 0.9 rather than the box.
        assert np.maximum(np.linalg.norm(inside[:, :2], axis=-1), np.abs(inside[:, 2])).max() > 0.8


def test_sdf_is_exact_off_a_cube_face():
    spec = ObjectSpec("cube", "red", "large", 90.0)
    half = 0.9 * 0.7
    points = np.array([[half + 0.1, 0.0, 0.0], [0.0, 0.0, -half - 0.25], [0.0, 0.0, 0.0]])
    assert np.allclose(sdf(spec, points), [0.1, 0.25, -half])


def test_whole_scene_box_is_in_view():
    rng = np.random.default_rng(0)
    corners = np.array(list(itertools.product((-0.9, 0.9), repeat=3)))
    half_width = math.tan(0.5 * synth.FOV_X)
    for pose in synth.sample_cameras(rng, 200):
        cam = (corners - pose[:3, 3]) @ pose[:3, :3]
        assert np.abs(cam[:, :2] / -cam[:, 2:]).max() < half_width


def test_shading_is_lambert_times_the_named_colour(tmp_path):
    spec = ObjectSpec("torus", "orange", "large", 0.0)
    _, images, _ = _render_one(tmp_path, spec, views=3, size=32)
    mask = images[..., 3] == 255
    rgb = images[..., :3].astype(np.float64) / 255.0
    assert (images[~mask][:, :3] == 0).all()
    ratio = rgb[mask] / np.array(spec.colour_rgb)  # [N, 3]: one shading factor per pixel
    assert np.abs(ratio - ratio.mean(-1, keepdims=True)).max() < 0.05
    assert ratio.min() > synth.AMBIENT - 0.03 and ratio.max() < synth.AMBIENT + synth.DIFFUSE + 0.03
    assert ratio.max() - ratio.min() > 0.2  # shaded, not flat


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_reproducible_captioned_and_split(tmp_path):
    index = generate(tmp_path / "a", objects=7, views=3, size=16, seed=5, val_fraction=0.3)
    generate(tmp_path / "b", objects=7, views=3, size=16, seed=5, val_fraction=0.3)
    generate(tmp_path / "c", objects=7, views=3, size=16, seed=6, val_fraction=0.3)
    files_a = _files(tmp_path / "a")
    assert files_a == _files(tmp_path / "b")
    assert files_a != _files(tmp_path / "c")
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == index

    splits = {s: {p.name for p in (tmp_path / "a" / s).iterdir()} for s in ("train", "val")}
    assert not splits["train"] & splits["val"]
    assert len(splits["val"]) == 2 and len(splits["train"]) == 5
    for entry in index:
        assert entry["id"] in splits[entry["split"]]
        meta, images, c2w = _read(tmp_path / "a" / entry["path"])
        spec = ObjectSpec.from_meta(meta["ln3diff_synth"])
        assert meta["caption"] == entry["caption"] == spec.caption
        assert meta["caption"] == f"a {entry['size']} {entry['colour']} {entry['shape']}"
        assert (spec.shape, spec.colour, spec.size) == (entry["shape"], entry["colour"], entry["size"])
        assert meta["ln3diff_synth"]["colour_rgb"] == list(synth.COLOURS[spec.colour])
        assert [f["file_path"] for f in meta["frames"]] == ["r_0.png", "r_1.png", "r_2.png"]
        assert images.shape == (3, 16, 16, 4) and c2w.shape == (3, 4, 4)


def test_cli_writes_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert synth.main(["--out", str(out), "--objects", "2", "--views", "2", "--size", "16"]) == 0
    assert "wrote 2 objects" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--out", str(out), "--objects", "2"])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["nerf", "gobjaverse"])
def test_either_layout_round_trips_through_the_reader(tmp_path, layout):
    """Cameras, caption and spec come back; depth lands on the primitive's surface, normals are its SDF gradient,
    albedo is its named colour, and all of it matches what the renderer saw."""
    spec = ObjectSpec("torus", "orange", "large", 30.0)
    size, views = 32, 3
    c2w = synth.sample_cameras(np.random.default_rng(4), views)
    write_object(tmp_path / "train" / "obj", spec, c2w, size, layout)
    record = read_object(tmp_path / "train" / "obj")
    assert record.layout.name == layout and record.channels == {"albedo", "depth", "normal"}
    np.testing.assert_allclose(record.c2w, c2w, atol=1e-6)
    np.testing.assert_allclose(record.intrinsics, intrinsics_from_fov(synth.FOV_X, size, size)[None].expand(views, 4),
                               rtol=1e-6)
    assert record.caption == spec.caption and ObjectSpec.from_meta(record.meta["ln3diff_synth"]) == spec

    item = MultiViewDataset(tmp_path, "train", 1, views, channels="available", on_error="raise")[0]
    order = [int(np.abs(record.c2w - c.numpy()).sum((1, 2)).argmin()) for c in item["target_c2w"]]
    seen = synth.render(spec, c2w[order], record.intrinsics[0], size, size)
    mask = item["target_masks"][:, 0].numpy()
    assert np.array_equal(mask, seen.rgba[..., 3] / 255.0) and mask.sum() > 100
    depth, normal = item["target_depths"][:, 0].numpy(), item["target_normals"].permute(0, 2, 3, 1).numpy()
    hit = mask == 1
    assert (depth[~hit] == 0).all() and (normal[~hit] == 0).all()
    np.testing.assert_allclose(depth[hit], seen.depth[hit], rtol=1e-3)  # half-float files
    np.testing.assert_allclose(normal[hit], seen.normal[hit], atol=2e-3)
    origins, dirs = camera_rays(item["target_c2w"].double(), item["target_intrinsics"].double(), size, size)
    points = (origins + dirs * torch.from_numpy(depth).double()[..., None]).numpy()[hit]
    assert np.abs(sdf(spec, points)).max() < 0.01  # half a pixel at this size is ~0.06
    h = 1e-4
    grad = np.stack([sdf(spec, points + h * e) - sdf(spec, points - h * e) for e in np.eye(3)], axis=-1)
    cos = (normal[hit] * grad / np.linalg.norm(grad, axis=-1, keepdims=True)).sum(-1)
    assert np.median(cos) > 0.999 and cos.min() > 0.95  # the torus's inner rim is curved within a pixel
    albedo = item["target_albedos"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(albedo[hit], np.broadcast_to(spec.colour_rgb, albedo[hit].shape), atol=0.5 / 255)
    assert (albedo[~hit] == 1.0).all()


def test_cli_writes_the_gobjaverse_layout(tmp_path, capsys):
    out = tmp_path / "out"
    assert synth.main(["--out", str(out), "--objects", "2", "--views", "2", "--size", "16", "--val-fraction", "0",
                       "--layout", "gobjaverse"]) == 0
    index = json.loads((out / "index.json").read_text())
    for entry in index:
        assert sorted(p.name for p in (out / entry["path"] / "campos_512_v4").iterdir()) == ["00000", "00001"]
    ds = MultiViewDataset(out, "train", 1, 1, channels="available", on_error="raise")
    assert len(ds) == 2 and ds.channels == ("albedo", "depth", "normal")
    assert [r.caption for r in ds.records] == [e["caption"] for e in index]
