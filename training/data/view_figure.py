"""A figure of one view as the dataset readers deliver it, to check cameras and channels by eye.

    python -m training.data.view_figure ../shared/samples/gobjaverse/Animals/0/10120 --view 9 \
        --out docs/gobjaverse_reader.png

Four panels: the RGBA view over white with the object's box (the camera JSON's `bbox`, or the project's
[-0.9, 0.9]^3 without one) projected through the converted camera in red and the mask's bounding
rectangle in blue; the albedo over white; the depth (distance along each ray, project units, near
yellow to far purple); the world normals as RGB = (n + 1) / 2 (+X red, +Y green, +Z (up) blue).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ln3diff_rt.cameras import project_points
from training.data.dataset import DatasetError, load_channels, load_image, read_object

# Colour stops from near to far (yellow -> green -> teal -> purple), linearly interpolated.
DEPTH_COLOURS = np.array([[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]]) / 255.0
SCENE_BOX = [[-0.9] * 3, [0.9] * 3]


def _colour_depth(depth: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, float, float]:
    near, far = float(depth[hit].min()), float(depth[hit].max())
    t = np.clip((depth - near) / max(far - near, 1e-9), 0.0, 1.0) * (len(DEPTH_COLOURS) - 1)
    low = np.minimum(t.astype(int), len(DEPTH_COLOURS) - 2)
    colour = DEPTH_COLOURS[low] + (t - low)[..., None] * (DEPTH_COLOURS[low + 1] - DEPTH_COLOURS[low])
    return np.where(hit[..., None], colour, 1.0), near, far


def _panel(rgb: np.ndarray, title: str) -> Image.Image:
    image = Image.fromarray(np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
    ImageDraw.Draw(image).text((8, 6), title, fill=(0, 0, 0))
    return image


def view_figure(path: str | Path, view: int) -> Image.Image:
    """The four panels of view `view` of the object at `path` (any layout `read_object` knows), side by side."""
    record = read_object(path)
    if not 0 <= view < len(record.image_paths):
        raise DatasetError(f"{path}: view {view} out of range (the object has {len(record.image_paths)})")
    rgba = load_image(record, view).astype(np.float32) / 255.0
    alpha = rgba[..., 3]
    channels = load_channels(record, view, alpha, sorted(record.channels))
    white = 1.0 - alpha[..., None]
    panels = [_panel(rgba[..., :3] * alpha[..., None] + white, f"view {view}: RGB, box projected (red)")]
    if "albedo" in channels:
        panels.append(_panel(channels["albedo"] + white, "albedo"))
    if "depth" in channels:
        depth, near, far = _colour_depth(channels["depth"], alpha > 0)
        panels.append(_panel(depth, f"depth {near:.2f} (yellow) to {far:.2f} (purple)"))
    if "normal" in channels:
        normal = np.where(alpha[..., None] > 0, (channels["normal"] + 1.0) / 2.0, 1.0)
        panels.append(_panel(normal, "world normal: +X red, +Y green, +Z blue"))

    box = np.array(record.meta.get("bbox", SCENE_BOX))
    corners = torch.tensor(list(itertools.product(*box.T)), dtype=torch.float32)  # [8, 3], index bits = (x, y, z)
    uv, _ = project_points(corners, torch.from_numpy(record.c2w[view]), torch.from_numpy(record.intrinsics[view]))
    draw = ImageDraw.Draw(panels[0])
    for a, b in itertools.combinations(range(8), 2):
        if bin(a ^ b).count("1") == 1:  # corners differing in one coordinate share an edge
            draw.line([tuple(uv[a].tolist()), tuple(uv[b].tolist())], fill=(220, 30, 30), width=2)
    rows, cols = np.nonzero(alpha > 0)
    draw.rectangle([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], outline=(40, 80, 220), width=1)

    figure = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * (panel.width + 4), 0))
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.view_figure", description=__doc__.split("\n")[0])
    parser.add_argument("object", help="object folder (NeRF-synthetic or G-Objaverse)")
    parser.add_argument("--view", type=int, default=0, help="view index (default: 0)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        figure = view_figure(args.object, args.view)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
