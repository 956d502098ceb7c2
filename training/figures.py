"""The model card's figures, regenerated from a checkpoint and the procedural dataset.

    python -m training.figures --data data/synth --out docs/        # the shipped model

Writes three PNGs:
- vae_reconstructions.png: held-out objects, one per shape; per row three ground-truth views
  (left) and the VAE's reconstruction rendered from the same cameras (right);
- sample_previews.png: one row per prompt, four turntable previews of the generated object, as a request
  returns them (its mesh rasterised in the field's lit colour);
- sample_meshes.png: the meshes extracted from those objects (what the GLB holds), drawn with flat
  Lambert shading per face (`ln3diff_rt.raster`, back faces culled), so what is shown is the triangles themselves.
and for an image-conditioned model two more, one row per condition image (empty prompt): the image as
the encoder sees it (centred, at its input size), four turntable views and the mesh drawing:
- image_to_3d.png: a render of each of the first held-out objects of every shape;
- image_to_3d_photos.png: the photos given with --images (`images.read_image`: RGBA, or RGB on a plain
  background).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.conventions import PREVIEW_ELEVATION, PREVIEW_FOV, PREVIEW_RADIUS
from ln3diff_rt.images import centre_object, read_image
from ln3diff_rt.meshing import MeshResult
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.raster import render_mesh
from ln3diff_rt.rendering import render_chunked
from ln3diff_rt.runner import Request, generate, run
from training.data.dataset import MultiViewDataset, load_image
from training.vae import reconstruct_planes

DEFAULT_PROMPTS = ("a red cube", "a blue sphere", "a yellow torus", "a green cone", "a purple cylinder",
                   "an orange snowman")
CELL = 128


def grid_image(rows: list[list[np.ndarray]], cell: int = CELL) -> Image.Image:
    """Tile [H, W, 3] uint8 images (each resized to cell x cell) into one picture, row by row."""
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (columns * cell, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.LANCZOS)
            canvas.paste(tile, (x * cell, y * cell))
    return canvas


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def first_of_each_shape(dataset: MultiViewDataset) -> list[int]:
    """Indices of the first held-out object of each shape, in dataset order."""
    first: dict[str, int] = {}
    for i, record in enumerate(dataset.records):
        first.setdefault(record.meta.get("ln3diff_synth", {}).get("shape", f"object {i}"), i)
    return list(first.values())


@torch.no_grad()
def vae_reconstructions(generator: Generator, data: str, views: int = 3) -> list[list[np.ndarray]]:
    """Rows of `views` ground-truth views then the same views rendered from the VAE's reconstruction."""
    cfg = generator.config
    dataset = MultiViewDataset(data, "val", cfg.encoder.num_views, views, cfg.encoder.image_size, "skip", seed=0)
    first_of_shape = first_of_each_shape(dataset)
    rows = []
    vae = generator.models.vae
    for index in first_of_shape[:6]:
        item = dataset[index]
        planes = reconstruct_planes(vae, item)
        truth = [to_uint8(image.permute(1, 2, 0)) for image in item["target_images"]]
        size = item["target_images"].shape[-1]
        rendered = []
        for c2w, intrinsics in zip(item["target_c2w"], item["target_intrinsics"], strict=True):
            origins, dirs = camera_rays(c2w, intrinsics, size, size)
            out = render_chunked(vae.field, planes, origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3), cfg.renderer)
            rendered.append(to_uint8(out.rgb[0].reshape(size, size, 3)))
        rows.append(truth + rendered)
    return rows


def draw_mesh(mesh: MeshResult, c2w: torch.Tensor, size: int = 256, fov: float = PREVIEW_FOV) -> np.ndarray:
    """Flat-shaded faces (each its own vertices, so one colour a face), back faces culled, over white: the
    faceting a preview's smooth colours hide, rasterised as previews are (`ln3diff_rt.raster`)."""
    if mesh.empty:
        return np.full((size, size, 3), 255, np.uint8)
    tri = torch.from_numpy(np.ascontiguousarray(mesh.vertices[mesh.faces], dtype=np.float32))  # [F, 3, 3] world
    normals = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=1)
    facing = (normals * (c2w[:3, 3].float() - tri.mean(dim=1))).sum(dim=1) > 0  # towards the camera
    light = c2w[:3, :3].float() @ torch.tensor([0.3, 0.5, 0.8]) / math.sqrt(0.98)  # over the viewer's shoulder
    shade = 0.35 + 0.65 * (normals @ light).clamp(0.0, 1.0)
    colours = torch.from_numpy(mesh.vertex_colors[mesh.faces, :3].astype(np.float32)).mean(dim=1) * shade[:, None]
    tri, colours = tri[facing], colours[facing]
    faces = torch.arange(3 * len(tri)).view(-1, 3)
    image = render_mesh(tri.reshape(-1, 3), faces, colours.repeat_interleave(3, dim=0), c2w,
                        intrinsics_from_fov(fov, size, size), size, (255.0, 255.0, 255.0))
    return (image + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def samples(generator: Generator, prompts: list[str], seed: int, views: int = 4
            ) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Turntable previews (rows of `views` frames) and one mesh drawing per prompt."""
    options = GenerationOptions(preview_views=views, preview_size=CELL)
    results = generate(generator, prompts, [seed + i for i in range(len(prompts))], options)
    c2w = orbit_camera(-60.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
    return [r.previews for r in results], [draw_mesh(r.mesh, c2w) for r in results]


def image_samples(generator: Generator, images: list[np.ndarray], seed: int, views: int = 4
                  ) -> list[list[np.ndarray]]:
    """Per RGBA condition image [H, W, 4] (empty prompt): the image as the encoder sees it, `views` turntable
    frames of the generated object and its mesh drawing."""
    options = GenerationOptions(preview_views=views, preview_size=CELL)
    requests = [Request("", seed + i, options, image=image) for i, image in enumerate(images)]
    c2w = orbit_camera(-60.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
    return [[to_uint8(centre_object(image, generator.image_size).permute(1, 2, 0)), *r.previews,
             draw_mesh(r.mesh, c2w)] for image, r in zip(images, run(generator, requests), strict=True)]


def held_out_renders(data: str, frame: int = 0) -> list[np.ndarray]:
    """View `frame` (RGBA) of the first held-out object of each shape."""
    dataset = MultiViewDataset(data, "val", 1, 1, None, "skip", seed=0)
    return [load_image(dataset.records[i], frame) for i in first_of_each_shape(dataset)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="model checkpoint (default: the shipped model)")
    p.add_argument("--data", required=True, help="dataset made by python -m training.data.synth (for the VAE figure)")
    p.add_argument("--out", default="docs", help="output folder (default: %(default)s)")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="prompts of the sample figures")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt's object; prompt i uses seed + i")
    p.add_argument("--images", nargs="*", default=[], help="photos for image_to_3d_photos.png (image models)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    generator = Generator.from_checkpoint(args.ckpt)
    grid_image(vae_reconstructions(generator, args.data)).save(out / "vae_reconstructions.png")
    previews, meshes = samples(generator, args.prompts, args.seed)
    grid_image(previews).save(out / "sample_previews.png")
    grid_image([meshes], cell=160).save(out / "sample_meshes.png")
    written = ["vae_reconstructions.png", "sample_previews.png", "sample_meshes.png"]
    if generator.config.takes_images:
        grid_image(image_samples(generator, held_out_renders(args.data), args.seed)).save(out / "image_to_3d.png")
        written.append("image_to_3d.png")
        if args.images:
            photos = [read_image(path) for path in args.images]
            grid_image(image_samples(generator, photos, args.seed)).save(out / "image_to_3d_photos.png")
            written.append("image_to_3d_photos.png")
    for name in written:
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
