"""The G-Objaverse reader on the shared deer, its errors on broken copies, and the channel format both layouts share."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from ln3diff_rt.cameras import camera_rays, orbit_camera, project_points
from training.data.channels import decode_normal_depth, encode_normal_depth, pixel_directions
from training.data.dataset import DatasetError, MultiViewDataset, load_channels, load_image, read_object
from training.data.gobjaverse import GOBJAVERSE, VIEWS_DIR
from training.data.records import NERF

DEER = ("samples", "gobjaverse", "Animals", "0", "10120")
VIEWS = 40


@pytest.fixture(scope="module")
def deer():
    return read_object(shared_path(*DEER))


def _box_corners(box: np.ndarray) -> torch.Tensor:
    return torch.tensor([[box[i, 0], box[j, 1], box[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)],
                        dtype=torch.float32)


def _surface_normals(points: np.ndarray, inside: np.ndarray, eye: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normals [N, 3] of a back-projected depth map [H, W, 3] by central differences, facing the camera at `eye`,
    at the pixels whose four neighbours are also inside (a mask [N] over `inside`'s pixels)."""
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    n *= np.sign(((eye - points[1:-1, 1:-1]) * n).sum(-1, keepdims=True))
    core = inside[1:-1, 1:-1] & inside[2:, 1:-1] & inside[:-2, 1:-1] & inside[1:-1, 2:] & inside[1:-1, :-2]
    return n[core], core


def test_deer_cameras_project_its_box_onto_its_mask_and_depth_lands_in_the_box(deer):
    """For every view: the box from the camera JSON, through the converted camera, frames the alpha mask; the depth
    at covered pixels back-projects into that box; the EXR normals match the depth map's surface normals."""
    assert len(deer.image_paths) == VIEWS and deer.layout == GOBJAVERSE
    box = np.array(deer.meta["bbox"])  # project units: G-Objaverse's +-0.45 is the project's +-0.9
    np.testing.assert_allclose(np.abs(box).max(), 0.9, atol=1e-6)
    corners = _box_corners(box)
    for f in range(VIEWS):
        c2w, k = torch.from_numpy(deer.c2w[f]), torch.from_numpy(deer.intrinsics[f])
        uv, depth = project_points(corners, c2w, k)
        assert (depth > 0).all(), f"view {f}: box behind the camera"
        (u0, v0), (u1, v1) = uv.min(0).values.tolist(), uv.max(0).values.tolist()
        alpha = load_image(deer, f)[..., 3] / 255.0
        rows, cols = np.nonzero(alpha > 0)
        mask_rect = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)  # pixel edges
        margin = 2.0
        assert u0 - margin <= mask_rect[0] and mask_rect[2] <= u1 + margin, f"view {f}: {mask_rect} vs u {u0, u1}"
        assert v0 - margin <= mask_rect[1] and mask_rect[3] <= v1 + margin, f"view {f}: {mask_rect} vs v {v0, v1}"
        ((cu, cv),), _ = project_points(torch.tensor(box.mean(0)[None], dtype=torch.float32), c2w, k)
        assert mask_rect[0] <= cu <= mask_rect[2] and mask_rect[1] <= cv <= mask_rect[3], f"view {f}: centre"
        area = (mask_rect[2] - mask_rect[0]) * (mask_rect[3] - mask_rect[1])
        assert area > 0.35 * (u1 - u0) * (v1 - v0), f"view {f}: the box is far larger than the object"  # 0.43 min

        channels = load_channels(deer, f, alpha.astype(np.float32), ("depth", "normal"))
        assert (channels["depth"][alpha == 0] == 0).all() and (channels["normal"][alpha == 0] == 0).all()
        # The renderer's rays through the mask's rectangle (a crop: the principal point moves by its corner).
        c0, r0, c1, r1 = mask_rect
        origins, dirs = camera_rays(c2w.double(), (k - torch.tensor([0, 0, c0, r0])).double(), r1 - r0, c1 - c0)
        crop = (slice(r0, r1), slice(c0, c1))
        points = (origins + dirs * torch.from_numpy(channels["depth"][crop]).double()[..., None]).numpy()
        covered = alpha[crop] >= 0.5  # below, 8-bit alpha is too coarse to undo the EXR's alpha blend of depth
        tol = 0.02  # 1% of the box: half-float depth and edge pixels mixing two surfaces
        assert ((points[covered] >= box[0] - tol) & (points[covered] <= box[1] + tol)).all(), f"view {f}: depth"
        from_depth, core = _surface_normals(points, alpha[crop] >= 1.0, deer.c2w[f][:3, 3])
        cos = (channels["normal"][crop][1:-1, 1:-1][core] * from_depth).sum(-1)
        assert np.median(cos) > 0.98, f"view {f}: EXR normals vs depth normals, median cos {np.median(cos):.3f}"


def test_deer_dataset_items(deer, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "deer").symlink_to(shared_path(*DEER), target_is_directory=True)
    assert read_object(shared_path(*DEER, VIEWS_DIR)).image_paths == deer.image_paths  # the views folder works too
    ds = MultiViewDataset(tmp_path, "train", num_input_views=2, num_target_views=3, image_size=64,
                          channels="available", on_error="raise")
    assert ds.channels == ("albedo", "depth", "normal")
    item = ds[0]
    shapes = {"input_images": (2, 3, 64, 64), "input_c2w": (2, 4, 4), "input_intrinsics": (2, 4),
              "target_images": (3, 3, 64, 64), "target_masks": (3, 1, 64, 64), "target_c2w": (3, 4, 4),
              "target_intrinsics": (3, 4), "target_albedos": (3, 3, 64, 64), "target_depths": (3, 1, 64, 64),
              "target_normals": (3, 3, 64, 64)}
    for key, shape in shapes.items():
        assert item[key].shape == shape and item[key].dtype == torch.float32, key
    assert item["caption"] == "" and item["index"] == 0
    torch.testing.assert_close(item["target_intrinsics"][0], torch.from_numpy(deer.intrinsics[0]) / 8)
    mask, depth, normal = item["target_masks"], item["target_depths"], item["target_normals"]
    assert (depth[mask == 0] == 0).all() and (normal[(mask == 0).expand_as(normal)] == 0).all()
    assert (depth[mask > 0] > 2.0).all() and (depth[mask > 0] < 4.6).all()  # cameras at 3.35, object within 0.9*sqrt3
    torch.testing.assert_close(normal.norm(dim=1)[mask[:, 0] > 0], torch.ones(int((mask > 0).sum())))
    albedo = item["target_albedos"]
    assert albedo.min() >= 0 and albedo.max() <= 1 and (albedo[(mask == 0).expand_as(albedo)] == 1).all()
    plain = MultiViewDataset(tmp_path, "train", num_input_views=2, num_target_views=3, image_size=64)[0]
    assert "target_depths" not in plain and torch.equal(plain["target_images"], item["target_images"])


def _mirror(source, target):
    """A copy of an object folder made of symlinks to its files, so that a test can break single files cheaply."""
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).symlink_to(path)
    return target


def _replace(path, data: bytes):
    path.unlink()
    path.write_bytes(data)


def _corrupt_json(obj):
    _replace(obj / VIEWS_DIR / "00007" / "00007.json", b'{"origin": [1.6, 0.0, ')


def _missing_exr(obj):
    (obj / VIEWS_DIR / "00012" / "00012_nd.exr").unlink()


def _bent_camera(obj):
    camera = json.loads((obj / VIEWS_DIR / "00003" / "00003.json").read_text())
    camera["x"] = [2.0, 0.0, 0.0]
    _replace(obj / VIEWS_DIR / "00003" / "00003.json", json.dumps(camera).encode())


def _missing_view(obj):
    shutil.rmtree(obj / VIEWS_DIR / "00020")


def _garbage_exr(obj):
    _replace(obj / VIEWS_DIR / "00005" / "00005_nd.exr", b"not an exr")


BROKEN = [  # (break it, what the one-line message must name)
    (_corrupt_json, ["00007/00007.json", "not valid JSON"]),
    (_missing_exr, ["00012/00012_nd.exr", "not found"]),
    (_bent_camera, ["00003/00003.json", "x, y, z, origin", "rigid"]),
    (_missing_view, [VIEWS_DIR, "00020/ missing"]),
    (_garbage_exr, ["00005/00005_nd.exr", "cannot read EXR"]),
]


@pytest.mark.parametrize("breaker,expected", BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_broken_deer_copy_names_the_file_in_one_line(breaker, expected, tmp_path):
    obj = _mirror(shared_path(*DEER), tmp_path / "deer")
    breaker(obj)
    with pytest.raises(DatasetError) as err:
        read_object(obj)
    message = str(err.value)
    assert "\n" not in message and str(obj) in message
    for fragment in expected:
        assert fragment in message


def test_broken_deer_copies_are_skipped_or_raise(tmp_path):
    source = shared_path(*DEER)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "good").symlink_to(source, target_is_directory=True)
    _corrupt_json(_mirror(source, tmp_path / "train" / "bad_json"))
    _missing_exr(_mirror(source, tmp_path / "train" / "no_exr"))
    truncated = _mirror(source, tmp_path / "train" / "truncated_exr")  # passes the header check, fails to decode
    for exr in truncated.glob(f"{VIEWS_DIR}/*/*_nd.exr"):
        _replace(exr, exr.read_bytes()[:3000])

    ds = MultiViewDataset(tmp_path, num_input_views=1, num_target_views=1, channels=("depth",))
    assert [p.rsplit("/", 1)[1] for p, _ in ds.skipped] == ["bad_json", "no_exr"]
    assert "00007.json: not valid JSON" in ds.skipped[0][1] and "00012_nd.exr: view file not found" in ds.skipped[1][1]
    bad = next(i for i, r in enumerate(ds.records) if r.transforms_path.parent.name == "truncated_exr")
    assert ds[bad]["index"] != bad  # its target view's EXR fails to decode: the next object stands in
    assert ds.skipped[-1][0].endswith("truncated_exr") and "cannot decode EXR" in ds.skipped[-1][1]
    with pytest.raises(DatasetError, match="00007.json: not valid JSON"):
        MultiViewDataset(tmp_path, on_error="raise")


def test_a_folder_of_neither_layout_names_both(tmp_path):
    expected = f"transforms.json: transforms file not found, nor a G-Objaverse {VIEWS_DIR}/"
    with pytest.raises(DatasetError, match=expected):
        read_object(tmp_path)


@pytest.mark.parametrize("layout", [NERF, GOBJAVERSE], ids=lambda layout: layout.name)
def test_normal_depth_encoding_round_trips_with_partial_alpha(layout):
    """Exact where alpha >= 0.5; below, a blend can come from two normals, and the one facing the camera is read."""
    rng = np.random.default_rng(0)
    h, w = 9, 13
    alpha = rng.choice([0.0, 0.1, 0.3, 0.5, 0.9, 1.0], size=(h, w)).astype(np.float32)
    depth = np.where(alpha > 0, rng.uniform(2.0, 5.0, (h, w)), 0.0)
    c2w = orbit_camera(30.0, 20.0, 4.0).double().numpy()
    intrinsics = np.array([20.0, 22.0, 6.0, 4.5])
    rows, cols = np.indices((h, w)).reshape(2, -1)
    view = (pixel_directions(intrinsics, rows, cols) @ c2w[:3, :3].T).reshape(h, w, 3)
    normal = rng.normal(size=(h, w, 3))
    normal -= 2 * np.maximum((normal * view).sum(-1, keepdims=True), 0) * view / (view * view).sum(-1, keepdims=True)
    normal = np.where(alpha[..., None] > 0, normal / np.linalg.norm(normal, axis=-1, keepdims=True), 0.0)
    nd = encode_normal_depth(depth, normal, alpha, intrinsics, layout)
    np.testing.assert_allclose(np.linalg.norm(nd[..., :3], axis=-1), 1.0, atol=1e-6)  # renormalised, as stored
    got_depth, got_normal = decode_normal_depth(nd, alpha, c2w, intrinsics, layout)
    np.testing.assert_allclose(got_depth, depth, rtol=1e-5, atol=1e-6)
    sure = alpha >= 0.5
    np.testing.assert_allclose(got_normal[sure], normal[sure], atol=1e-4)
    assert ((got_normal * view).sum(-1)[alpha > 0] <= 1e-6).all()  # facing the camera
    np.testing.assert_allclose(encode_normal_depth(got_depth, got_normal, alpha, intrinsics, layout), nd, atol=1e-4)


def test_view_figure_draws_each_channel_and_refuses_a_bad_view(tmp_path, capsys):
    from training.data import view_figure
    from training.data.synth import ObjectSpec, sample_cameras, write_object

    obj = tmp_path / "obj"
    write_object(obj, ObjectSpec("cube", "red", "medium", 10.0), sample_cameras(np.random.default_rng(0), 2), 24,
                 "gobjaverse")
    assert view_figure.main([str(obj), "--view", "1", "--out", str(tmp_path / "fig.png")]) == 0
    figure = np.asarray(Image.open(tmp_path / "fig.png"))
    assert figure.shape == (24, 4 * 24 + 3 * 4, 3)  # RGB + box, albedo, depth, normals
    assert view_figure.main([str(obj), "--view", "2", "--out", str(tmp_path / "no.png")]) == 1
    assert capsys.readouterr().err.strip().endswith("view 2 out of range (the object has 2)")
