"""The NeRF-synthetic reader: valid objects load exactly, broken ones fail naming the file and frame."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.channels import write_exr
from training.data.dataset import (
    DatasetError,
    MultiViewDataset,
    _weighted_channels,
    load_channels,
    load_image,
    load_object,
    read_transforms,
)
from training.data.synth import generate

VIEWS, SIZE = 6, 16


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, objects=4, views=VIEWS, size=SIZE, seed=0, val_fraction=0.25)
    return root


def _first_object(root):
    return sorted((root / "train").iterdir())[0]


def _edit_json(folder, edit):
    path = folder / "transforms.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_load_object_reads_the_files_exactly(synth_root):
    folder = _first_object(synth_root)
    meta = json.loads((folder / "transforms.json").read_text())
    views = load_object(folder)
    assert views.images.shape == (VIEWS, SIZE, SIZE, 4) and views.images.dtype == torch.float32
    assert views.c2w.shape == (VIEWS, 4, 4) and views.intrinsics.shape == (VIEWS, 4)
    raw = np.array(Image.open(folder / "r_2.png"))
    assert torch.equal(views.images[2], torch.from_numpy(raw).float() / 255.0)
    assert torch.allclose(views.c2w[1].double(), torch.tensor(meta["frames"][1]["transform_matrix"]).double())
    fx = 0.5 * SIZE / math.tan(0.5 * meta["camera_angle_x"])
    assert torch.allclose(views.intrinsics[0], torch.tensor([fx, fx, SIZE / 2, SIZE / 2]))
    assert views.caption == meta["caption"]
    assert views.meta["ln3diff_synth"]["shape"] in meta["caption"]
    assert load_object(folder / "transforms.json").caption == views.caption


def test_focal_fields_and_extensionless_paths(synth_root, tmp_path):
    folder = shutil.copytree(_first_object(synth_root), tmp_path / "obj")

    def to_focal_fields(data):
        del data["camera_angle_x"]
        data.update(fl_x=20.0, fl_y=21.0, cx=7.5, cy=8.5)
        for frame in data["frames"]:
            frame["file_path"] = "./" + frame["file_path"].removesuffix(".png")
        data["frames"][0]["fl_x"] = 30.0  # per-frame values override the top level

    _edit_json(folder, to_focal_fields)
    views = load_object(folder)
    assert views.intrinsics[0].tolist() == [30.0, 21.0, 7.5, 8.5]
    assert views.intrinsics[1].tolist() == [20.0, 21.0, 7.5, 8.5]


def test_dataset_items(synth_root):
    ds = MultiViewDataset(synth_root, "train", num_input_views=2, num_target_views=3)
    assert len(ds) == 3 and ds.skipped == []
    item = ds[1]
    assert item["input_images"].shape == (2, 3, SIZE, SIZE)
    assert item["input_c2w"].shape == (2, 4, 4) and item["input_intrinsics"].shape == (2, 4)
    assert item["target_images"].shape == (3, 3, SIZE, SIZE)
    assert item["target_masks"].shape == (3, 1, SIZE, SIZE)
    assert item["target_c2w"].shape == (3, 4, 4) and item["target_intrinsics"].shape == (3, 4)
    assert item["index"] == 1 and item["caption"].startswith("a ")

    views = load_object(ds.records[1].transforms_path)
    frames = [int((views.c2w - c).abs().flatten(1).sum(-1).argmin()) for c in item["target_c2w"]]
    inputs = [int((views.c2w - c).abs().flatten(1).sum(-1).argmin()) for c in item["input_c2w"]]
    assert not set(frames) & set(inputs)
    # White composite: background exactly 1.0, object pixels the stored straight colour.
    straight = views.images[frames].permute(0, 3, 1, 2)  # [Vt, 4, H, W]
    alpha = item["target_masks"]
    assert torch.equal(alpha, straight[:, 3:])
    assert (item["target_images"][(alpha == 0).expand(-1, 3, -1, -1)] == 1.0).all()
    solid = (alpha == 1).expand(-1, 3, -1, -1)
    assert solid.any() and torch.equal(item["target_images"][solid], straight[:, :3][solid])


def test_views_are_reproducible_per_epoch_and_cache_is_transparent(synth_root):
    ds = MultiViewDataset(synth_root, num_input_views=2, num_target_views=2, seed=3)
    cached = MultiViewDataset(synth_root, num_input_views=2, num_target_views=2, seed=3, cache=True)
    first = [ds[i]["target_c2w"] for i in range(len(ds))]
    assert all(torch.equal(a, ds[i]["target_c2w"]) for i, a in enumerate(first))
    for _ in range(2):  # second pass served from the cache
        assert all(torch.equal(cached[i]["target_images"], ds[i]["target_images"]) for i in range(len(ds)))
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["target_c2w"]) for i, a in enumerate(first))


def test_cached_channels_are_compact_and_items_the_same_with_or_without_the_cache(synth_root):
    """Resized to an odd size, so the channels are alpha-weighted averages, not the files' values."""
    kwargs = dict(num_input_views=1, num_target_views=3, image_size=13, seed=5, channels="available")
    ds, cached = MultiViewDataset(synth_root, **kwargs), MultiViewDataset(synth_root, cache=True, **kwargs)
    for _ in range(2):
        for i in range(len(ds)):
            a, b = ds[i], cached[i]
            assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("target_")), i
    view = next(iter(cached._cache.values()))
    assert {k: v.dtype for k, v in view.items()} == {"rgba": np.uint8, "albedo": np.uint8, "depth": np.float16,
                                                     "normal": np.float16}
    # Against the float32 channels they were made from: within a uint8 / float16 step, normals of unit length.
    record = ds.records[0]
    item = ds[0]
    frame = int(np.abs(record.c2w - item["target_c2w"][0].numpy()).sum((1, 2)).argmin())
    straight = load_image(record, frame)
    alpha = straight[..., 3].astype(np.float32) / 255.0
    exact = _weighted_channels(alpha, load_channels(record, frame, alpha, ["albedo", "depth", "normal"]), (13, 13))
    got = {name: item[f"target_{name}s"][0].permute(1, 2, 0).numpy() for name in ("albedo", "depth", "normal")}
    np.testing.assert_allclose(got["albedo"], exact["albedo"], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(got["depth"], exact["depth"], rtol=1e-3)
    np.testing.assert_allclose(got["normal"], exact["normal"], atol=2e-3)
    hit = np.linalg.norm(exact["normal"], axis=-1) > 0
    assert hit.sum() > 10 and (np.linalg.norm(got["normal"], axis=-1)[~hit] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(got["normal"], axis=-1)[hit], 1.0, atol=1e-6)


def test_few_views_repeat_instead_of_failing(synth_root):
    item = MultiViewDataset(synth_root, num_input_views=4, num_target_views=VIEWS)[0]
    assert item["input_images"].shape[0] == 4 and item["target_images"].shape[0] == VIEWS


def test_resize_scales_intrinsics(synth_root):
    item = MultiViewDataset(synth_root, "val", num_input_views=1, num_target_views=1, image_size=8)[0]
    full = MultiViewDataset(synth_root, "val", num_input_views=1, num_target_views=1)[0]
    assert item["input_images"].shape == (1, 3, 8, 8) and item["target_masks"].shape == (1, 1, 8, 8)
    assert torch.allclose(item["target_intrinsics"], full["target_intrinsics"] / 2)
    assert item["target_images"].min() >= 0.0 and item["target_images"].max() <= 1.0


def _remove_image(folder):
    (folder / "r_2.png").unlink()


def _scale_pose(folder):
    _edit_json(folder, lambda d: d["frames"][1].update(
        transform_matrix=(np.array(d["frames"][1]["transform_matrix"]) * [[2], [2], [2], [1]]).tolist()))


def _three_by_four_pose(folder):
    _edit_json(folder, lambda d: d["frames"][1].update(
        transform_matrix=d["frames"][1]["transform_matrix"][:3]))


def _string_angle(folder):
    _edit_json(folder, lambda d: d.update(camera_angle_x="0.87"))


def _numeric_file_path(folder):
    _edit_json(folder, lambda d: d["frames"][3].update(file_path=3))


def _small_image(folder):
    Image.new("RGBA", (8, 8)).save(folder / "r_4.png")


def _garbage_png(folder):
    (folder / "r_1.png").write_bytes(b"definitely not a png")


def _remove_transforms(folder):
    (folder / "transforms.json").unlink()


def _remove_normal_depth(folder):
    (folder / "r_2_nd.exr").unlink()


def _drop_one_albedo(folder):
    _edit_json(folder, lambda d: d["frames"][3].pop("albedo_path"))


def _small_exr(folder):
    write_exr(folder / "r_1_nd.exr", np.zeros((8, 8, 4)))


BROKEN = [  # (break it, what the message must name besides the transforms file)
    (_remove_image, ["frames[2]", "r_2.png", "not found"]),
    (_scale_pose, ["frames[1].transform_matrix", "rigid"]),
    (_three_by_four_pose, ["frames[1].transform_matrix", "4x4"]),
    (_string_angle, ["camera_angle_x (used by frames[0])", "number"]),
    (_numeric_file_path, ["frames[3].file_path", "string"]),
    (_small_image, ["frames[4]", "r_4.png", "8x8"]),
    (_garbage_png, ["frames[1]", "r_1.png"]),
    (_remove_transforms, ["not found"]),
    (_remove_normal_depth, ["frames[2].normal_depth_path", "r_2_nd.exr", "not found"]),
    (_drop_one_albedo, ["frames[3]: no albedo_path while frames[0] has one"]),
    (_small_exr, ["frames[1].normal_depth_path", "r_1_nd.exr is 8x8, expected 16x16"]),
]


@pytest.mark.parametrize("breaker,expected", BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_broken_object_names_file_and_frame(synth_root, tmp_path, breaker, expected):
    folder = shutil.copytree(_first_object(synth_root), tmp_path / "obj")
    breaker(folder)
    with pytest.raises(DatasetError) as err:
        load_object(folder)
    message = str(err.value)
    assert str(folder / "transforms.json") in message
    for fragment in expected:
        assert fragment in message


def _truncate_png(folder):
    data = (folder / "r_5.png").read_bytes()
    (folder / "r_5.png").write_bytes(data[: len(data) // 2])


def test_truncated_png_passes_the_header_check_but_fails_to_load(synth_root, tmp_path):
    folder = shutil.copytree(_first_object(synth_root), tmp_path / "obj")
    _truncate_png(folder)
    read_transforms(folder)
    expected = r"obj/transforms\.json: frames\[5\]: cannot decode image .*r_5\.png"
    with pytest.raises(DatasetError, match=expected):
        load_object(folder)


@pytest.fixture
def mixed_root(synth_root, tmp_path):
    """Three good objects, one per kind of breakage found by the validation pass, one truncated PNG."""
    train = tmp_path / "train"
    good = sorted((synth_root / "train").iterdir())
    for obj in good:
        shutil.copytree(obj, train / obj.name)
    for breaker, _ in BROKEN:
        breaker(shutil.copytree(good[0], train / f"broken{breaker.__name__}"))
    _truncate_png(shutil.copytree(good[0], train / "truncated"))
    return tmp_path


def test_skip_mode_counts_bad_objects(mixed_root):
    ds = MultiViewDataset(mixed_root, num_input_views=3, num_target_views=3)
    assert len(ds) == 4  # 3 good + the truncated one, whose header is fine
    assert len(ds.skipped) == len(BROKEN)
    assert all("broken_" in path and reason for path, reason in ds.skipped)
    truncated = next(i for i, r in enumerate(ds.records) if r.transforms_path.parent.name == "truncated")
    item = ds[truncated]  # cannot decode -> recorded, and the next object stands in
    assert item["index"] != truncated
    assert len(ds.skipped) == len(BROKEN) + 1 and ds.skipped[-1][0].endswith("truncated")
    assert [ds[i]["index"] for i in range(len(ds))].count(truncated) == 0
    assert len(ds.skipped) == len(BROKEN) + 1


def test_raise_mode_stops_at_the_first_problem(mixed_root):
    with pytest.raises(DatasetError, match="broken_"):
        MultiViewDataset(mixed_root, on_error="raise")


def test_missing_split_folder(synth_root):
    with pytest.raises(DatasetError, match="test: split folder not found"):
        MultiViewDataset(synth_root, "test")
