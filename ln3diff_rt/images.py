"""Input images as users have them -> the square, centred object image an image encoder takes.

Users bring RGBA images (alpha is the object mask: renders, cut-outs, the LN3Diff / InstantMesh demo
inputs) or RGB photos on a plain background. Either way the object is found, cropped to its box,
padded to a square in which it fills `FILL` of the side (as image-to-3D preprocessing does: objects
come out centred and scaled alike whatever the input size), composited on white and resized.
Background removal for cluttered RGB photos would need downloaded weights: out of scope, and said so.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

FILL = 0.85  # the object's longest side as a fraction of the square's
MAX_PIXELS = 4096 * 4096  # larger inputs are refused (decompression bombs), as is anything PIL cannot decode
BACKGROUND_TOLERANCE = 24  # RGB: a pixel further than this (max over channels) from the border colour is object
MIN_OBJECT_PIXELS = 16


class ImageError(ValueError):
    """An input image that cannot be used; the message names it and says why."""


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """An image file or its bytes -> RGBA uint8 [H, W, 4] (opaque alpha for RGB inputs)."""
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror or e})") from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{name}: {image.width} x {image.height} pixels; at most {MAX_PIXELS} are taken")
            rgba = np.asarray(image.convert("RGBA"))
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image (PNG, JPEG, WebP, ...)") from e
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: damaged or unsupported image: {e}") from e
    return rgba


def object_mask(rgba: np.ndarray) -> np.ndarray:
    """bool [H, W]: the alpha channel where the image has transparency, else what differs from the border."""
    alpha = rgba[..., 3]
    if alpha.min() < 255:
        return alpha > 127
    rgb = rgba[..., :3].astype(np.int16)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    return np.abs(rgb - background).max(axis=-1) > BACKGROUND_TOLERANCE


def centre_object(rgba: np.ndarray, size: int, name: str = "image") -> torch.Tensor:
    """RGBA uint8 [H, W, 4] -> RGB float [3, size, size] in [0, 1]: the object centred on white, FILL of the side."""
    mask = object_mask(rgba)
    if mask.sum() < MIN_OBJECT_PIXELS:
        raise ImageError(f"{name}: no object found (transparent everywhere, or an RGB image without a plain "
                         "background; cut the object out or photograph it on a plain background)")
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    if rgba[..., 3].min() == 255:  # RGB on a plain background: the background becomes white too
        alpha = mask[..., None].astype(np.float32)
    rgb = rgba[..., :3].astype(np.float32) / 255.0 * alpha + (1.0 - alpha)  # composite on white
    crop = rgb[top:bottom, left:right]
    side = int(np.ceil(max(crop.shape[:2]) / FILL))
    square = np.ones((side, side, 3), np.float32)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    resized = Image.fromarray((square * 255.0 + 0.5).astype(np.uint8)).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized, np.float32) / 255.0).permute(2, 0, 1).contiguous()
