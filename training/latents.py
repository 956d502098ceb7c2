"""Stage 2 input: the dataset encoded once by the frozen VAE encoder, cached as safetensors shards.

Each object is encoded from several random input-view subsets (a cheap augmentation: the same
object seen from other cameras gives a slightly different posterior). Captions are encoded
once by the text encoder. For image conditioning, `CONDITION_VIEWS` of each object's views are
kept as condition images, centred and scaled exactly as a user's image is (`images.centre_object`);
training draws one of them per latent and step. The cache is keyed by the VAE checkpoint's sha256
and the condition image size, so a new VAE re-encodes instead of silently reusing stale latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ln3diff_rt.checkpoint import atomic_save_safetensors, file_sha256, load_models
from ln3diff_rt.images import centre_object
from ln3diff_rt.text import TextEncoder
from training.data.dataset import MultiViewDataset, load_image

CONDITION_VIEWS = 8  # condition images kept per object (seeded choice among its views; repeats if it has fewer)


@dataclass
class LatentSet:
    mean: torch.Tensor  # [N, 3, c, h, w] posterior means, unscaled
    logvar: torch.Tensor  # [N, 3, c, h, w]
    caption_ids: torch.Tensor  # [N] index into captions
    captions: list[str]  # captions[0] == "" is the unconditional (dropped) prompt
    context: torch.Tensor  # [len(captions), L, Dc] text tokens
    pooled: torch.Tensor  # [len(captions), Dc]
    object_ids: torch.Tensor  # [N] index of each latent's object in `images`
    images: torch.Tensor | None = None  # [objects, CONDITION_VIEWS, 3, S, S] uint8 condition images, or None


def condition_images(dataset: MultiViewDataset, size: int, seed: int) -> torch.Tensor:
    """[objects, CONDITION_VIEWS, 3, size, size] uint8: views of each object centred as user images are."""
    out = torch.empty(len(dataset.records), CONDITION_VIEWS, 3, size, size, dtype=torch.uint8)
    for j, record in enumerate(tqdm(dataset.records, desc="condition images", leave=False)):
        views = len(record.image_paths)
        frames = np.random.default_rng([seed, j]).choice(views, CONDITION_VIEWS, replace=views < CONDITION_VIEWS)
        for k, frame in enumerate(frames):
            image = centre_object(load_image(record, int(frame)), size, str(record.image_paths[frame]))
            out[j, k] = (image * 255.0).round().to(torch.uint8)  # centre_object's values are k / 255: exact
    return out


def _encode_split(vae, dataset: MultiViewDataset, passes: int, device: str, desc: str):
    means, logvars, captions, objects = [], [], [], []
    with torch.no_grad():
        for p in range(passes):
            dataset.set_epoch(p)
            for i in tqdm(range(len(dataset)), desc=f"{desc} pass {p + 1}/{passes}", leave=False):
                item = dataset[i]
                mean, logvar = vae.encode(*(item[k][None].to(device)
                                            for k in ("input_images", "input_c2w", "input_intrinsics")))
                means.append(mean[0].cpu())
                logvars.append(logvar[0].cpu())
                captions.append(item["caption"])
                objects.append(item["index"])
    return torch.stack(means), torch.stack(logvars), captions, torch.tensor(objects)


def build_latent_cache(data: str, vae_path: str, out_dir: Path, passes: int, text_encoder: str, device: str = "cpu",
                       seed: int = 0, image_size: int = 0) -> dict[str, Path]:
    """Encode train and val splits into `out_dir/{split}.safetensors`, with condition images of `image_size`
    (0: none); reuse them if the VAE and the image size are unchanged."""
    vae_sha = file_sha256(vae_path)
    paths = {split: out_dir / f"{split}.safetensors" for split in ("train", "val")}
    if all(_cache_matches(p, vae_sha, image_size) for p in paths.values()):
        return paths
    models = load_models(vae_path, device, require=("vae",))
    cfg = models.config
    text = TextEncoder(text_encoder, cfg.dit.context_len)
    for split, path in paths.items():
        dataset = MultiViewDataset(data, split, cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed,
                                   cache=False)
        mean, logvar, captions, objects = _encode_split(models.vae, dataset, passes if split == "train" else 1, device,
                                                        split)
        unique = [""] + sorted(set(captions) - {""})
        cond = text(unique)
        ids = torch.tensor([unique.index(c) for c in captions])
        tensors = {"mean": mean, "logvar": logvar, "caption_ids": ids, "context": cond.context.cpu(),
                   "pooled": cond.pooled.cpu(), "object_ids": objects}
        if image_size:
            tensors["images"] = condition_images(dataset, image_size, seed)
        atomic_save_safetensors(tensors, path, {"vae_sha256": vae_sha, "captions": json.dumps(unique),
                                                "text_encoder": text_encoder, "image_size": str(image_size)})
    return paths


def _cache_matches(path: Path, vae_sha: str, image_size: int) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("vae_sha256") == vae_sha and meta.get("image_size") == str(image_size)


def load_latents(path: Path) -> LatentSet:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return LatentSet(t["mean"], t["logvar"], t["caption_ids"], json.loads(meta["captions"]), t["context"],
                     t["pooled"], t["object_ids"], t.get("images"))
