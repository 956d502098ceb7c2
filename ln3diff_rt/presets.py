"""Parameter counts and tensor shapes of each preset, computed on the meta device (no memory)."""

from __future__ import annotations

import torch

from ln3diff_rt.config import PRESETS, ModelConfig


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(cfg: ModelConfig) -> dict:
    from ln3diff_rt.models.build import build_dit, build_vae

    with torch.device("meta"):
        vae, dit = build_vae(cfg), build_dit(cfg)
    tokens = 3 * (cfg.latent_size // cfg.dit.patch_size) ** 2
    encoder = getattr(vae, "encoder", None)  # the published models are converted without their encoder
    return {
        "preset": cfg.preset,
        "encoder": count_parameters(encoder) if encoder is not None else 0,
        "decoder": count_parameters(vae) - (count_parameters(encoder) if encoder is not None else 0),
        "dit": count_parameters(dit),
        "input": f"{cfg.encoder.num_views} x {cfg.encoder.in_channels} x {cfg.encoder.image_size}^2",
        "latent": "x".join(map(str, cfg.latent_shape)),
        "triplane": "x".join(map(str, cfg.triplane_shape)),
        "dit_tokens": tokens,
    }


def presets_table() -> str:
    rows = [describe(cfg) for cfg in PRESETS.values()]
    header = f"{'preset':<13} {'encoder':>9} {'decoder':>9} {'DiT':>9} {'views':>16} {'latent':>12} " \
             f"{'tri-plane':>14} {'DiT tokens':>10}"
    lines = [header]
    for r in rows:
        millions = " ".join(f"{r[k] / 1e6:>8.2f}M" for k in ("encoder", "decoder", "dit"))
        shapes = f"{r['input']:>16} {r['latent']:>12} {r['triplane']:>14} {r['dit_tokens']:>10}"
        lines.append(f"{r['preset']:<13} {millions} {shapes}")
    return "\n".join(lines)
