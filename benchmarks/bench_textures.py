"""Texture fidelity and cost: baked textures vs vertex colours at each level of detail, against the field's render.

Objects: the shipped model's (its colours are smooth: shaded primitives) and an analytic egg whose colour has
detail finer than a 2K-face mesh (stripes and a checker). Each is meshed at 30K faces, unwrapped and baked as a
request does (`texturing.unwrap`, `bake_texture`, `levels_of_detail`), and each level is drawn unlit from the
preview cameras twice, with its vertex colours and with the texture, against the field's own ray-marched render
from the same camera (`rendering.render_chunked`). The colour error is the mean absolute difference (0-255, RGB)
over the pixels inside both silhouettes (the mesh's, eroded by a pixel, and the field's opacity > 0.95): both
colourings of a level share its geometry, so the difference between them is the colour alone. Also times the
unwrap, the bake and the encoding of a textured GLB (wall and CPU seconds; the CPU is shared, so wall varies).

    OMP_NUM_THREADS=1 python benchmarks/bench_textures.py [--json [PATH]] [--figure docs/texture_lods.png]

(one torch thread: on two shared cores OpenMP's spin-waits otherwise inflate the field queries many times over)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.conventions import FIELD_CHUNK, PREVIEW_ELEVATION, PREVIEW_FOV, PREVIEW_RADIUS
from ln3diff_rt.mesh_export import Material, asset_files
from ln3diff_rt.meshing import MeshResult, extract_mesh
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.raster import rasterize
from ln3diff_rt.rendering import render_chunked
from ln3diff_rt.runner import generate
from ln3diff_rt.texturing import bake_texture, levels_of_detail, unwrap

PROMPTS = ["a medium red mushroom", "a medium blue snowman", "a medium green dumbbell"]
LODS = (30000, 8000, 2000)
EGG_AXES = torch.tensor([0.45, 0.55, 0.8])


def striped_egg(planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An analytic field (planes unused): density 10 on an egg, rising steeply inwards (a shell of density under 10
    only 0.005 units thick outside), colour bands 0.16 apart along z under a checker."""
    density = (2000 * (1.0 - (points / EGG_AXES).norm(dim=-1)) + 10.0).clamp(min=0.0)  # [B, N]
    x, y, z = points.unbind(-1)
    bands = 0.5 + 0.5 * torch.sin(40 * z)
    checker = ((torch.floor(8 * x) + torch.floor(8 * y)) % 2).to(points.dtype)
    rgb = torch.stack([bands, 0.2 + 0.6 * checker, 1.0 - bands], dim=-1)  # [B, N, 3]
    return density, rgb


def draw(mesh: MeshResult, c2w: torch.Tensor, size: int, texture: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Unlit z-buffered render over white (vertex colours, or `texture` on the mesh's UVs, bilinear, perspective-
    correct) with the preview cameras' intrinsics: image [size, size, 3] uint8 and coverage [size, size] bool."""
    w2c = torch.linalg.inv(c2w).numpy().astype(np.float64)
    cam = mesh.vertices.astype(np.float64) @ w2c[:3, :3].T + w2c[:3, 3]  # camera looks down -z
    fx, fy, cx, cy = intrinsics_from_fov(PREVIEW_FOV, size, size).tolist()
    depth = -cam[:, 2]
    pixels = np.stack([cx + fx * cam[:, 0] / depth, cy - fy * cam[:, 1] / depth], axis=1)
    rows, cols, tri, bary = (t.numpy() for t in rasterize(torch.from_numpy(pixels[mesh.faces]), size, size))
    inverse = bary / depth[mesh.faces[tri]]  # perspective-correct weights
    z = 1.0 / inverse.sum(axis=1)
    weights = inverse * z[:, None]
    pixel = rows * size + cols
    order = np.lexsort((z, pixel))
    first = order[np.unique(pixel[order], return_index=True)[1]]  # nearest fragment per pixel
    if texture is None:
        colour = np.einsum("kc,kcd->kd", weights[first], mesh.vertex_colors[mesh.faces[tri[first]], :3].astype(float))
    else:
        uv = np.einsum("kc,kcd->kd", weights[first], mesh.uvs[mesh.faces[tri[first]]].astype(float))
        colour = bilinear(texture, uv)
    image = np.full((size * size, 3), 255.0)
    image[pixel[first]] = colour
    covered = np.zeros(size * size, bool)
    covered[pixel[first]] = True
    return image.reshape(size, size, 3).round().clip(0, 255).astype(np.uint8), covered.reshape(size, size)


def bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texture [S, S, 3] at UVs [K, 2] (origin bottom-left), bilinear with clamped edges -> [K, 3] float."""
    size = texture.shape[0]
    x = uv[:, 0] * size - 0.5
    y = (1.0 - uv[:, 1]) * size - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def at(yy, xx):
        return texture[yy.clip(0, size - 1), xx.clip(0, size - 1)].astype(float)

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def colour_error(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(image.astype(float) - reference.astype(float))[mask].mean())


@torch.no_grad()
def field_render(field, planes: torch.Tensor, c2w: torch.Tensor, size: int, renderer) -> tuple[np.ndarray, np.ndarray]:
    """The field's ray-marched render [size, size, 3] uint8 from the preview camera, and its opacity [size, size]."""
    origins, dirs = camera_rays(c2w, intrinsics_from_fov(PREVIEW_FOV, size, size), size, size)
    out = render_chunked(field, planes, origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3), renderer)
    rgb = (out.rgb[0].reshape(size, size, 3).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return rgb, out.opacity[0].reshape(size, size).numpy()


def objects(gen: Generator, seed: int):
    """(name, mesh at 30K faces, field, planes [1, 3, C, R, R], renderer, colour: points [N, 3] -> what the bake
    stores [N, 3]) for each object: the prompts' (rendered as the model's previews are, in the asset colour, and
    baked as the request path bakes), then the egg (its sharp colour needs 4x the samples per ray to
    render sharp)."""
    options = GenerationOptions(faces=LODS[0], texture=0, preview_views=0)
    for result in generate(gen, PROMPTS, [seed + i for i in range(len(PROMPTS))], options):
        colour = gen.colour_fn(result.triplane)  # the albedo where the model has the head, else the lit colour

        def field(planes, points, colour=colour):  # the model's density with the asset colour, for the reference
            return gen.components.field(planes, points)[0], colour(points[0])[None]

        yield result.prompt, result.mesh, field, result.triplane[None], gen.config.renderer, colour
    planes = torch.zeros(1, 3, 1, 1, 1)

    def density(p):
        return striped_egg(planes, p[None])[0][0]

    def colour(p):
        return striped_egg(planes, p[None])[1][0]

    renderer = dataclasses.replace(gen.config.renderer, num_samples=128, num_importance=128)
    yield ("striped egg (analytic)", extract_mesh(density, 192, color_fn=colour, faces=LODS[0]), striped_egg, planes,
           renderer, colour)


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texture", type=int, default=1024)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--size", type=int, default=192, help="render size in pixels")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--json", nargs="?", const="benchmarks/bench_textures.json", default=None)
    p.add_argument("--figure", default=None, help="write the comparison picture here (PNG)")
    args = p.parse_args(argv)

    gen = Generator.from_checkpoint()
    cameras = [orbit_camera(360.0 * i / args.views - 90.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
               for i in range(args.views)]
    rows, figure = [], []
    print(f"{'object':<26} {'faces':>6} {'vertex MAE':>10} {'texture MAE':>11} {'ratio':>6}")
    for name, mesh, field, planes, renderer, colour in objects(gen, args.seed):
        renders = [field_render(field, planes, c2w, args.size, renderer) for c2w in cameras]
        unwrapped, unwrap_s, unwrap_cpu = timed(unwrap, mesh, args.texture)
        texture, bake_s, bake_cpu = timed(bake_texture, unwrapped, colour, args.texture, FIELD_CHUNK)
        material = Material(texture, 1.0)
        _, glb_s, glb_cpu = timed(asset_files, [unwrapped], ("glb",), None, "", None, material)
        levels = levels_of_detail(unwrapped, LODS)
        row = {"object": name, "faces": len(mesh.faces), "charts": unwrapped.stats["charts"],
               "unwrap_s": unwrap_s, "unwrap_cpu_s": unwrap_cpu, "bake_s": bake_s, "bake_cpu_s": bake_cpu,
               "glb_s": glb_s, "glb_cpu_s": glb_cpu, "levels": []}
        panels = [renders[1][0]]
        for level in levels:
            errors = {"vertex": [], "texture": []}
            for (reference, opacity), c2w in zip(renders, cameras, strict=True):
                vertex, covered = draw(level, c2w, args.size)
                textured, _ = draw(level, c2w, args.size, texture)
                inside = ndimage.binary_erosion(covered) & (opacity > 0.95)
                errors["vertex"].append(colour_error(vertex, reference, inside))
                errors["texture"].append(colour_error(textured, reference, inside))
                if c2w is cameras[1] and (level is levels[0] or level is levels[-1]):
                    panels += [vertex, textured]
            v, t = float(np.mean(errors["vertex"])), float(np.mean(errors["texture"]))
            row["levels"].append({"faces": len(level.faces), "vertex_mae": v, "texture_mae": t})
            print(f"{name:<26} {len(level.faces):>6} {v:>10.2f} {t:>11.2f} {t / v:>6.2f}")
        if name in (PROMPTS[0], "striped egg (analytic)"):
            figure.append((name, [len(levels[0].faces), len(levels[-1].faces)], panels))
        rows.append(row)
        print(f"{'':<26} unwrap {unwrap_s:.2f} s ({unwrap_cpu:.2f} CPU s, {row['charts']} charts), bake "
              f"{bake_s:.2f} s ({bake_cpu:.2f}), GLB {glb_s:.2f} s ({glb_cpu:.2f}) at {row['faces']} faces, "
              f"{args.texture}^2", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"texture": args.texture, "views": args.views, "size": args.size,
                                               "objects": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.figure:
        write_figure(figure, args.figure)
        print(f"wrote {args.figure}")
    return 0


def write_figure(rows: list[tuple[str, list[int], list[np.ndarray]]], path: str, cell: int = 256) -> None:
    """One row per object: the field's render, then vertex colours and texture at the most and least detailed
    level; a caption over each row and a label under each column."""
    from PIL import ImageDraw

    labels = ["field (ray-marched)", "LOD0: vertex colours", "LOD0: texture", "last LOD: vertex colours",
              "last LOD: texture"]
    label, caption = 18, 18
    canvas = Image.new("RGB", (cell * len(labels), len(rows) * (cell + caption) + label), "white")
    draw = ImageDraw.Draw(canvas)
    for y, (name, faces, panels) in enumerate(rows):
        top = y * (cell + caption)
        draw.text((6, top + 3), f"{name}: LOD0 {faces[0]} faces, last LOD {faces[-1]} faces", fill="black")
        for x, image in enumerate(panels):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.LANCZOS)
            canvas.paste(tile, (x * cell, top + caption))
    for x, text in enumerate(labels):
        draw.text((x * cell + 6, len(rows) * (cell + caption) + 3), text, fill="black")
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
