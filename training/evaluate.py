"""Evaluate a trained model on the procedural dataset: VAE reconstruction and prompt adherence.

    python -m training.evaluate --ckpt ln3diff_rt/assets/ln3diff-tiny.safetensors --data data/synth

1. VAE: PSNR of full novel views of every held-out (val) object, reconstructed from its input views (and of
   the first 50 training objects: near the held-out figure the VAE underfits, far above it overfits),
   and the IoU of each reconstruction's occupancy (density above the mesh threshold, 32^3) with the
   object's exact geometry, per shape.
2. Prompt adherence: `--seeds-per-prompt` objects per "a medium <colour> <shape>" prompt (every
   colour x shape) are generated, then
   - colour: the mean colour of its rendered foreground is compared with each named colour's mean
     foreground colour in the dataset renders (shading included); correct when the nearest is the
     named one (chance 1/10);
   - shape: its occupancy (density above the mesh threshold on a 32^3 grid) is compared by IoU
     with every primitive's exact occupancy at that size, best over yaw; correct when the named
     primitive has the highest IoU (chance 1/9);
   - the asset, as an engine gets it (the mesh at 96^3 with vertex colours): its mean vertex colour within 40
     (RGB, 0-255) of the named colour's albedo, and for tori whether the mesh has the hole (genus >= 1).
3. Image adherence (`--image`, image-conditioned models): `--image-views` renders of every held-out
   object (its dataset views) are the condition images of as many generations, with the empty
   prompt; colour and shape are judged as in 2 against the object's own colour and shape, the shape
   best over yaw and size (a centred image shows no absolute size).

`--vae-only` gives 1 alone for any checkpoint with a VAE (`training.vae`'s included), at the field's surface:
s = 0 for an SDF field, the best density threshold otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from kernels.occupancy import cell_centres
from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.checkpoint import load_models, save_checkpoint
from ln3diff_rt.meshing import vertex_components
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT, Generator
from ln3diff_rt.rendering import render_chunked
from ln3diff_rt.runner import Request, run
from training.data.dataset import MultiViewDataset, load_image, load_object, read_object, read_transforms
from training.data.synth import COLOURS, SHAPES, SIZES, ObjectSpec, sdf
from training.vae import evaluate_psnr, reconstruct_planes

GRID = 32
TRAIN_PSNR_OBJECTS = 50  # training objects whose reconstruction PSNR `--vae-only` also reports
YAWS = range(0, 360, 15)


def reference_colours(data: str, per_colour: int = 30) -> dict[str, np.ndarray]:
    """Mean foreground RGB (over white background removed) of dataset renders, per named colour."""
    sums: dict[str, list[np.ndarray]] = {c: [] for c in COLOURS}
    for transforms in sorted(Path(data, "train").glob("*/transforms.json")):
        meta = json.loads(transforms.read_text()).get("ln3diff_synth", {})
        colour = meta.get("colour")
        if colour not in sums or len(sums[colour]) >= per_colour:
            continue
        images = load_object(transforms.parent).images.numpy()  # [V, H, W, 4]
        fg = images[..., 3] > 0.5
        sums[colour].append(images[..., :3][fg].mean(axis=0))
        if all(len(v) >= per_colour for v in sums.values()):
            break
    return {c: np.mean(v, axis=0) for c, v in sums.items() if v}


def grid_points() -> torch.Tensor:
    """Centres [GRID^3, 3] of the evaluation grid's cells over the box [-1, 1]^3."""
    return cell_centres(GRID).reshape(-1, 3)


def primitive_occupancies(*sizes: str) -> dict[str, list[np.ndarray]]:
    """Exact occupancy grids of every primitive at each of `sizes`, one per size and yaw."""
    points = grid_points().numpy()
    return {shape: [sdf(ObjectSpec(shape, "red", size, float(yaw)), points) < 0 for size in sizes for yaw in YAWS]
            for shape in SHAPES}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def shape_scores(occupied: np.ndarray, shapes_ref: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """The shape test: each primitive's best IoU with an occupancy grid (over its references' yaws and sizes); the
    named shape is the highest."""
    return {s: max(iou(occupied, occ) for occ in occs) for s, occs in shapes_ref.items()}


@torch.no_grad()
def foreground_colour(generator: Generator, planes: torch.Tensor, views: int = 3, size: int = 48) -> np.ndarray | None:
    """Mean colour of the pixels the object covers, over a few views around it."""
    intrinsics = intrinsics_from_fov(math.radians(50.0), size, size)
    colours = []
    for i in range(views):
        c2w = orbit_camera(360.0 * i / views + 30.0, 25.0, 3.2)
        origins, dirs = camera_rays(c2w, intrinsics, size, size)
        out = render_chunked(generator.components.field, planes[None], origins.reshape(1, -1, 3),
                             dirs.reshape(1, -1, 3), generator.config.renderer)
        fg = out.opacity[0] > 0.5
        if fg.any():
            # undo the white background where the object is partly transparent
            alpha = out.opacity[0][fg, None]
            colours.append(((out.rgb[0][fg] - (1 - alpha)) / alpha).clamp(0, 1).mean(0).numpy())
    return np.mean(colours, axis=0) if colours else None


def judge(generator: Generator, planes: torch.Tensor, refs: dict[str, np.ndarray],
          shapes_ref: dict[str, list[np.ndarray]], colour: str, shape: str) -> dict:
    """Colour and shape of one generated tri-plane [3, C, R, R] against the intended `colour` and `shape`."""
    density, _ = generator.components.field(planes[None], grid_points()[None])
    occupied = (density[0] > generator.models.vae.field.surface_density(generator.config.renderer.mesh_threshold)
                ).numpy()
    scores = shape_scores(occupied, shapes_ref)
    mean_rgb = foreground_colour(generator, planes)
    nearest = None if mean_rgb is None else min(refs, key=lambda c: float(np.linalg.norm(refs[c] - mean_rgb)))
    return {"colour": colour, "shape": shape, "predicted_colour": nearest,
            "predicted_shape": max(scores, key=scores.get), "iou_named": round(scores.get(shape, 0.0), 3),
            "iou_best": round(max(scores.values()), 3),
            "occupied_voxels": int(occupied.sum())}


ASSET_COLOUR_TOLERANCE = 40.0  # RGB distance (0-255) of an asset's mean vertex colour from the named albedo


def mesh_figures(mesh, colour: str) -> dict:
    """What an engine gets, from the extracted mesh: its mean vertex colour against the named colour's albedo (RGB
    0-255; the asset colour: albedo where the model has the head, else the lit colour) and its genus, summed over
    its connected components (V - E + F = 2 (components - genus) for closed surfaces: a torus with its hole is 1)."""
    if mesh is None or mesh.empty:
        return {"asset_rgb": None, "asset_colour_error": None, "genus": None}
    rgb = mesh.vertex_colors[:, :3].astype(np.float64).mean(axis=0)
    edges = np.sort(np.concatenate([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]]), axis=1)
    euler = len(mesh.vertices) - len(np.unique(edges, axis=0)) + len(mesh.faces)
    components = len(np.unique(vertex_components(len(mesh.vertices), edges)))
    return {"asset_rgb": [round(float(c), 1) for c in rgb],
            "asset_colour_error": round(float(np.linalg.norm(rgb - 255.0 * np.asarray(COLOURS[colour]))), 1),
            "genus": int(round(components - euler / 2))}


def summarise(rows: list[dict]) -> dict:
    """Colour and shape accuracy over `rows` (judge's records), and the shape accuracy per intended shape."""
    shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
    return {"colour_accuracy": float(np.mean([r["predicted_colour"] == r["colour"] for r in rows])),
            "colour_chance": 1 / len(COLOURS),
            "shape_accuracy": float(np.mean([r["predicted_shape"] == r["shape"] for r in rows])),
            "shape_chance": 1 / len(SHAPES),
            "shape_accuracy_per_shape": {s: float(np.mean([r["predicted_shape"] == s for r in rows if r["shape"] == s]))
                                         for s in shapes},
            **asset_summary(rows)}


def asset_summary(rows: list[dict]) -> dict:
    """Over rows judged with their meshes: the share whose asset colour is within ASSET_COLOUR_TOLERANCE of the
    named albedo (overall and per colour), and the share of tori with a hole (genus >= 1)."""
    meshed = [r for r in rows if "asset_colour_error" in r]
    if not meshed:
        return {}

    def close(r: dict) -> bool:
        return r["asset_colour_error"] is not None and r["asset_colour_error"] <= ASSET_COLOUR_TOLERANCE

    colours = [c for c in COLOURS if any(r["colour"] == c for r in meshed)]
    tori = [r for r in meshed if r["shape"] == "torus"]
    return {"asset_colour_within": float(np.mean([close(r) for r in meshed])),
            "asset_colour_within_per_colour": {c: float(np.mean([close(r) for r in meshed if r["colour"] == c]))
                                               for c in colours},
            **({"tori_with_hole": float(np.mean([(r["genus"] or 0) >= 1 for r in tori]))} if tori else {})}


def prompt_adherence(generator: Generator, data: str, seed: int = 0, steps: int = 8, guidance: float = 3.0,
                     seeds_per_prompt: int = 1) -> dict:
    refs = reference_colours(data)
    shapes_ref = primitive_occupancies("medium")
    prompts = [(c, s) for s in SHAPES for c in COLOURS] * seeds_per_prompt
    texts = [f"a medium {c} {s}" for c, s in prompts]
    # Meshes as an engine would get them, at a resolution that resolves a torus's hole, undecimated, vertex colours.
    options = GenerationOptions(steps=steps, guidance=guidance, preview_views=0, mesh_resolution=96, faces=0,
                                texture=0)
    requests = [Request(text, seed + i, options) for i, text in enumerate(texts)]
    results = list(run(generator, requests))
    rows = [{"prompt": texts[i], "seed": seed + i,
             **judge(generator, results[i].triplane, refs, shapes_ref, colour, shape),
             **mesh_figures(results[i].mesh, colour)} for i, (colour, shape) in enumerate(prompts)]
    return {"prompts": len(rows) // seeds_per_prompt, "seeds_per_prompt": seeds_per_prompt, **summarise(rows),
            "steps": steps, "guidance": guidance, "rows": rows}


def image_adherence(generator: Generator, data: str, seed: int = 0, steps: int = 8, guidance: float = 3.0,
                    views: int = 3) -> dict:
    """Generate from `views` renders of each held-out object (empty prompt) and judge colour and shape against the
    object's own; the shape best over yaw and size."""
    refs = reference_colours(data)
    shapes_ref = primitive_occupancies(*SIZES)
    records = [read_transforms(t.parent) for t in sorted(Path(data, "val").glob("*/transforms.json"))]
    options = GenerationOptions(steps=steps, guidance=guidance, preview_views=0)
    cases = [(record, frame % len(record.image_paths)) for record in records for frame in range(views)]
    requests = [Request("", seed + i, options, mesh=False, image=load_image(record, frame))
                for i, (record, frame) in enumerate(cases)]
    planes = torch.stack([result.triplane for result in run(generator, requests)])
    rows = []
    for i, (record, frame) in enumerate(cases):
        spec = ObjectSpec.from_meta(record.meta["ln3diff_synth"])
        rows.append({"object": record.transforms_path.parent.name, "view": frame, "seed": seed + i,
                     **judge(generator, planes[i], refs, shapes_ref, spec.colour, spec.shape)})
    return {"objects": len(records), "views_per_object": views, **summarise(rows), "steps": steps,
            "guidance": guidance, "rows": rows}


@torch.no_grad()
def reconstructed_densities(vae, dataset: MultiViewDataset):
    """(object spec, density on the evaluation grid) of every held-out object, reconstructed from its views."""
    points = grid_points()
    dataset.set_epoch(0)
    for i, record in enumerate(dataset.records):
        item = dataset[i]
        density = vae.field(reconstruct_planes(vae, item), points[None])[0][0].numpy()
        yield ObjectSpec.from_meta(record.meta["ln3diff_synth"]), density


def calibrate_mesh_threshold(vae, dataset: MultiViewDataset, thresholds=None) -> dict:
    """The density threshold whose level set best matches the true geometry of held-out objects.

    The official LN3Diff threshold (10) belongs to its own density scale; ours is whatever training
    settled on, so the threshold is measured: mean IoU, over VAE reconstructions of the val objects,
    between {density > threshold} on a 32^3 grid and the exact occupancy of the generating SDF.
    """
    thresholds = thresholds or [1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0]
    points = grid_points().numpy()
    scores = np.zeros(len(thresholds))
    for spec, density in reconstructed_densities(vae, dataset):
        truth = sdf(spec, points) < 0
        scores += [iou(density > t, truth) for t in thresholds]
    scores /= max(1, len(dataset.records))
    best = int(np.argmax(scores))
    return {"threshold": thresholds[best], "iou": float(scores[best]),
            "iou_by_threshold": {str(t): round(float(v), 4) for t, v in zip(thresholds, scores, strict=True)}}


def reconstruction_iou(vae, dataset: MultiViewDataset, threshold: float) -> dict:
    """IoU of each held-out reconstruction's inside (density above the calibrated `threshold`, or s < 0 for an SDF
    field) with its exact geometry, by shape, and whether the shape test of the adherence figures (nearest
    primitive by IoU, best over yaw and size) names its shape: separates what the VAE loses (e.g. cube corners)
    from what the diffusion model gets wrong, which can name a shape no better than the VAE reproduces it."""
    points, threshold = grid_points().numpy(), vae.field.surface_density(threshold)
    shapes_ref = primitive_occupancies(*SIZES)
    by_shape: dict[str, list[float]] = {}
    named: dict[str, list[bool]] = {}
    for spec, density in reconstructed_densities(vae, dataset):
        inside = density > threshold
        by_shape.setdefault(spec.shape, []).append(iou(inside, sdf(spec, points) < 0))
        scores = shape_scores(inside, shapes_ref)
        named.setdefault(spec.shape, []).append(max(scores, key=scores.get) == spec.shape)
    every = [v for values in by_shape.values() for v in values]
    return {"mean": float(np.mean(every)) if every else 0.0,
            "per_shape": {s: round(float(np.mean(v)), 3) for s, v in sorted(by_shape.items())},
            "shape_named": float(np.mean([v for values in named.values() for v in values])) if every else 0.0,
            "shape_named_per_shape": {s: round(float(np.mean(v)), 3) for s, v in sorted(named.items())}}


def calibrate_checkpoint(ckpt: str, data: str, seed: int = 0) -> dict:
    """Measure the mesh threshold on held-out objects and store it in the checkpoint's config (atomic rewrite)."""
    models = load_models(ckpt, require=("vae",))
    cfg = models.config
    if models.vae.field.is_sdf:
        raise SystemExit(f"error: {ckpt} has an SDF field: its surface is s = 0, there is no threshold to calibrate")
    val = MultiViewDataset(data, "val", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=seed)
    result = calibrate_mesh_threshold(models.vae, val)
    new_cfg = cfg.replace(renderer=dataclasses.replace(cfg.renderer, mesh_threshold=result["threshold"]))
    components = {name: module for name, module in (("vae", models.vae), ("dit", models.dit)) if module is not None}
    extra = {k: v for k, v in models.metadata.items() if not k.startswith("ln3diff_rt.") and k != "format_version"}
    save_checkpoint(ckpt, new_cfg, components, {**extra, "mesh_threshold_iou": f"{result['iou']:.4f}"})
    return result


def evaluate_vae(ckpt: str, data: str, seed: int = 0) -> dict:
    """Held-out VAE figures of any checkpoint with a VAE (`training.vae`'s own included): PSNR, and where the
    objects are procedural the geometry IoU per shape at the surface: s = 0 for an SDF field, for a density field
    the best threshold (`calibrate_mesh_threshold`, not written back), so fields of either kind compare fairly."""
    models = load_models(ckpt, require=("vae",))
    cfg, vae = models.config, models.vae
    val = MultiViewDataset(data, "val", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=seed)
    result = {"vae_val_psnr": evaluate_psnr(vae, val, len(val), "cpu"), "val_objects": len(val),
              "geometry": cfg.renderer.geometry}
    train = MultiViewDataset(data, "train", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=seed)
    if len(train):  # the same figure on objects it may have trained on: far above held-out's means it overfits
        count = min(TRAIN_PSNR_OBJECTS, len(train))
        result.update(vae_train_psnr=evaluate_psnr(vae, train, count, "cpu"), train_objects=count)
    if val.records and all("ln3diff_synth" in r.meta for r in val.records):
        threshold = cfg.renderer.mesh_threshold if vae.field.is_sdf else calibrate_mesh_threshold(vae, val)["threshold"]
        result["vae_val_iou"] = reconstruction_iou(vae, val, threshold)
        result["threshold"] = vae.field.surface_density(threshold)
    return result


@torch.no_grad()
def object_psnr(ckpt: str | None, folder: str, seed: int = 0) -> dict:
    """Reconstruction PSNR of one object folder (either layout, e.g. a real G-Objaverse object): the encoder gets
    the model's number of views, drawn as for a held-out object, and every other view is rendered and compared
    (RGB over white at the model's image size)."""
    models = load_models(ckpt or DEFAULT_CHECKPOINT, require=("vae",))
    cfg, vae = models.config, models.vae
    folder = Path(folder)
    count = len(read_object(folder).image_paths)
    if count <= cfg.encoder.num_views:
        raise SystemExit(f"error: {folder}: {count} views; more than the encoder's {cfg.encoder.num_views} needed")
    data = MultiViewDataset(folder.parent.parent, folder.parent.name, cfg.encoder.num_views,
                            count - cfg.encoder.num_views, cfg.encoder.image_size, "raise", seed=seed)
    [index] = [i for i, r in enumerate(data.records) if r.transforms_path.is_relative_to(folder)]
    item = data[index]
    planes = reconstruct_planes(vae, item)
    _, _, h, w = item["target_images"].shape
    psnrs = []
    for c2w, intrinsics, target in zip(item["target_c2w"], item["target_intrinsics"], item["target_images"],
                                       strict=True):
        origins, dirs = camera_rays(c2w[None], intrinsics[None], h, w)
        out = render_chunked(vae.field, planes, origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3), cfg.renderer)
        mse = (out.rgb[0].clamp(0, 1) - target.permute(1, 2, 0).reshape(-1, 3)).square().mean().item()
        psnrs.append(10.0 * math.log10(1.0 / max(mse, 1e-10)))
    return {"object": str(folder), "held_out_views": len(psnrs), "input_views": cfg.encoder.num_views,
            "image_size": cfg.encoder.image_size, "psnr": float(np.mean(psnrs))}


def evaluate(ckpt: str | None, data: str, seed: int = 0, steps: int = 8, guidance: float = 3.0,
             seeds_per_prompt: int = 1, image_views: int = 0) -> dict:
    """VAE figures and prompt adherence, and image adherence from `image_views` renders per held-out object (0: not)."""
    torch.manual_seed(seed)
    generator = Generator.from_checkpoint(ckpt)
    cfg = generator.config
    val = MultiViewDataset(data, "val", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=seed)
    psnr = evaluate_psnr(generator.models.vae, val, len(val), "cpu")
    geometry = reconstruction_iou(generator.models.vae, val, cfg.renderer.mesh_threshold)
    result = {"vae_val_psnr": psnr, "val_objects": len(val), "vae_val_iou": geometry,
              "adherence": prompt_adherence(generator, data, seed, steps, guidance, seeds_per_prompt)}
    if image_views:
        result["image_adherence"] = image_adherence(generator, data, seed, steps, guidance, image_views)
    return result


def print_vae(result: dict) -> None:
    print(f"{'metric':<48} {'value':>8} {'chance':>8}")
    psnr = result['vae_val_psnr']
    print(f"{'VAE PSNR, held-out views (dB)':<48} {psnr:>8.2f} {'':>8}  ({result['val_objects']} objects)")
    if "vae_train_psnr" in result:
        print(f"{'VAE PSNR, training objects (dB)':<48} {result['vae_train_psnr']:>8.2f} {'':>8}  "
              f"(the first {result['train_objects']}: near held-out's, the VAE underfits; above, it overfits)")
    if "vae_val_iou" in result:
        geometry = result["vae_val_iou"]
        where = f"density > {result['threshold']:.3g}" if "threshold" in result else "mesh threshold"
        print(f"{'VAE geometry IoU, held-out objects':<48} {geometry['mean']:>8.3f} {'':>8}  (32^3, {where})")
        for shape, value in geometry["per_shape"].items():
            print(f"  {shape:<46} {value:>8.3f}")
        label = "VAE: shape nearest the object's"
        print(f"{label:<48} {geometry['shape_named']:>8.1%} {1 / len(SHAPES):>8.1%}  "
              "(its reconstruction, judged as samples are)")
        for shape, value in geometry["shape_named_per_shape"].items():
            print(f"  {shape:<46} {value:>8.1%}")


def print_assets(a: dict) -> None:
    if "asset_colour_within" not in a:
        return
    print(f"{f'asset colour within {ASSET_COLOUR_TOLERANCE:.0f} of the named albedo':<48} "
          f"{a['asset_colour_within']:>8.1%}")
    for colour, share in a["asset_colour_within_per_colour"].items():
        print(f"  {colour:<46} {share:>8.1%}")
    if "tori_with_hole" in a:
        print(f"{'tori with a hole (mesh genus >= 1)':<48} {a['tori_with_hole']:>8.1%}")


def print_adherence(title: str, a: dict) -> None:
    print(f"{title + ': colour nearest the intended one':<48} {a['colour_accuracy']:>8.1%} {a['colour_chance']:>8.1%}")
    print(f"{title + ': shape nearest the intended one':<48} {a['shape_accuracy']:>8.1%} {a['shape_chance']:>8.1%}")
    for shape, acc in a["shape_accuracy_per_shape"].items():
        print(f"  {shape:<46} {acc:>8.1%}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="model checkpoint (default: the shipped model)")
    p.add_argument("--data", default=None, help="dataset made by python -m training.data.synth")
    p.add_argument("--object", default=None,
                   help="instead of --data: the VAE's reconstruction PSNR on one object folder's held-out views "
                   "(either layout, e.g. a G-Objaverse object)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generated object")
    p.add_argument("--steps", type=int, default=8, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seeds-per-prompt", type=int, default=1,
                   help="objects per prompt (each figure moves by about 5 points with one; 3 for a model card)")
    p.add_argument("--image", action="store_true",
                   help="also measure image adherence: generate from renders of each held-out object (image models)")
    p.add_argument("--image-views", type=int, default=3, help="renders per held-out object with --image")
    p.add_argument("--json", default=None, help="also write the full result (every prompt) here")
    p.add_argument("--vae-only", action="store_true",
                   help="only the VAE figures (PSNR, geometry IoU at the surface), of any checkpoint with a VAE: "
                   "training.vae's vae.safetensors too")
    p.add_argument("--calibrate-threshold", action="store_true",
                   help="only measure the mesh density threshold on held-out objects and write it into --ckpt")
    args = p.parse_args(argv)
    if args.object:
        result = object_psnr(args.ckpt, args.object, args.seed)
        print(f"VAE PSNR on {result['held_out_views']} held-out views of {args.object}: {result['psnr']:.2f} dB "
              f"({result['input_views']} input views, {result['image_size']} px)")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if not args.data:
        p.error("--data is required (or --object)")
    if args.calibrate_threshold:
        if not args.ckpt:
            p.error("--calibrate-threshold rewrites a checkpoint: give it with --ckpt")
        result = calibrate_checkpoint(args.ckpt, args.data, args.seed)
        print(json.dumps(result, indent=1))
        return
    if args.vae_only:
        if not args.ckpt:
            p.error("--vae-only evaluates a given VAE: give it with --ckpt")
        result = evaluate_vae(args.ckpt, args.data, args.seed)
        print_vae(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if args.seeds_per_prompt < 1:
        p.error(f"--seeds-per-prompt {args.seeds_per_prompt}: expected at least 1")
    if args.image_views < 1:
        p.error(f"--image-views {args.image_views}: expected at least 1")
    result = evaluate(args.ckpt, args.data, args.seed, args.steps, args.guidance, args.seeds_per_prompt,
                      args.image_views if args.image else 0)
    print_vae(result)
    a = result["adherence"]
    print_adherence("prompt", a)
    print_assets(a)
    print(f"({a['prompts']} prompts x {a['seeds_per_prompt']} seeds, {a['steps']} steps, guidance {a['guidance']})")
    if "image_adherence" in result:
        a = result["image_adherence"]
        print_adherence("image", a)
        print(f"({a['objects']} held-out objects x {a['views_per_object']} renders, empty prompt, {a['steps']} steps, "
              f"guidance {a['guidance']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
