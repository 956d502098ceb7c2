"""Input images: read what users have, refuse what cannot be used (named), centre and scale every object alike."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from ln3diff_rt.cli import main
from ln3diff_rt.images import FILL, MAX_PIXELS, ImageError, centre_object, read_image

PHOTOS = ("bulldog", "cake", "extinguisher", "fox", "genshin_teapot", "plant", "robot", "sword")


def object_box(image) -> tuple[np.ndarray, np.ndarray]:
    """(centre xy, size xy) in pixels of what is not white in a [3, S, S] image."""
    rows, cols = np.nonzero((image.numpy() < 0.97).any(axis=0))
    lo, hi = np.array([cols.min(), rows.min()]), np.array([cols.max() + 1, rows.max() + 1])
    return (lo + hi) / 2, hi - lo


@pytest.mark.parametrize("name", PHOTOS)
def test_real_photos_come_out_centred_and_scaled_alike(name):
    rgba = read_image(shared_path("samples", "images", f"{name}-input.png"))
    image = centre_object(rgba, 224, name)
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1
    centre, size = object_box(image)
    assert np.abs(centre - 112).max() <= 3  # centred whatever the photo's framing
    assert size.max() == pytest.approx(FILL * 224, abs=4)  # the longest side fills FILL of the square
    corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 1).all()  # composited on white


def test_rgb_on_a_plain_background_is_cut_out_by_its_border_colour():
    rng = np.random.default_rng(3)
    rgb = np.full((97, 131, 3), (40, 90, 200), np.uint8)  # a blue backdrop
    rgb[20:50, 70:120] = rng.integers(150, 256, (30, 50, 3))  # the object, off centre
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    image = centre_object(read_image(buffer.getvalue()), 64)
    centre, size = object_box(image)
    assert np.abs(centre - 32).max() <= 1 and size.max() == pytest.approx(FILL * 64, abs=2)
    assert image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # the backdrop became white


def test_unusable_images_are_refused_by_name(tmp_path):
    with pytest.raises(ImageError, match="missing.png: cannot read the file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match=r"notes.png: not a readable image \(PNG, JPEG"):
        read_image(tmp_path / "notes.png")
    big = tmp_path / "big.png"
    Image.new("L", (4097, 4097)).save(big)
    assert 4097 * 4097 > MAX_PIXELS
    with pytest.raises(ImageError, match="4097 x 4097 pixels"):
        read_image(big)
    clear = np.zeros((40, 40, 4), np.uint8)
    with pytest.raises(ImageError, match="no object found"):
        centre_object(clear, 64, "clear.png")


def test_cli_image_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    photo = tmp_path / "red.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(photo)
    cases = [(["generate", "--image", str(tmp_path / "notes.png")], "notes.png: not a readable image"),
             (["generate", "a", "b", "--image", str(photo)], "2 prompts and 1 images"),
             (["generate"], "nothing to generate")]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
