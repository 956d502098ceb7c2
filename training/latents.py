"""Stage 2 input: the dataset encoded once by the frozen VAE encoder, cached as safetensors shards.

Each object is encoded from several random input-view subsets (a cheap augmentation: the same
object seen from other cameras gives a slightly different posterior). Captions are encoded
once by the text encoder. The cache is keyed by the VAE checkpoint's sha256, so a new VAE
re-encodes instead of silently reusing stale latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ln3diff_rt.checkpoint import atomic_save_safetensors, file_sha256, load_models
from ln3diff_rt.text import TextEncoder
from training.data.dataset import MultiViewDataset


@dataclass
class LatentSet:
    mean: torch.Tensor  # [N, 3, c, h, w] posterior means, unscaled
    logvar: torch.Tensor  # [N, 3, c, h, w]
    caption_ids: torch.Tensor  # [N] index into captions
    captions: list[str]  # captions[0] == "" is the unconditional (dropped) prompt
    context: torch.Tensor  # [len(captions), L, Dc] text tokens
    pooled: torch.Tensor  # [len(captions), Dc]


def _encode_split(vae, dataset: MultiViewDataset, passes: int, device: str, desc: str):
    means, logvars, captions = [], [], []
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
    return torch.stack(means), torch.stack(logvars), captions


def build_latent_cache(data: str, vae_path: str, out_dir: Path, passes: int, text_encoder: str, device: str = "cpu",
                       seed: int = 0) -> dict[str, Path]:
    """Encode train and val splits into `out_dir/{split}.safetensors`; reuse them if the VAE is unchanged."""
    vae_sha = file_sha256(vae_path)
    paths = {split: out_dir / f"{split}.safetensors" for split in ("train", "val")}
    if all(_cache_matches(p, vae_sha) for p in paths.values()):
        return paths
    models = load_models(vae_path, device, require=("vae",))
    cfg = models.config
    text = TextEncoder(text_encoder, cfg.dit.context_len)
    for split, path in paths.items():
        dataset = MultiViewDataset(data, split, cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed,
                                   cache=False)
        mean, logvar, captions = _encode_split(models.vae, dataset, passes if split == "train" else 1, device, split)
        unique = [""] + sorted(set(captions) - {""})
        cond = text(unique)
        ids = torch.tensor([unique.index(c) for c in captions])
        tensors = {"mean": mean, "logvar": logvar, "caption_ids": ids, "context": cond.context.cpu(),
                   "pooled": cond.pooled.cpu()}
        atomic_save_safetensors(tensors, path, {"vae_sha256": vae_sha, "captions": json.dumps(unique),
                                                "text_encoder": text_encoder})
    return paths


def _cache_matches(path: Path, vae_sha: str) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("vae_sha256") == vae_sha


def load_latents(path: Path) -> LatentSet:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return LatentSet(t["mean"], t["logvar"], t["caption_ids"], json.loads(meta["captions"]), t["context"],
                     t["pooled"])
