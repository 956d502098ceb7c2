"""Models with random weights at a preset's size, for tests, benchmarks and the profiler.

Untrained weights alone do no real work: AdaLN-Zero makes the DiT output zeros, and the preset's
mesh threshold may lie outside every density the field gives. So the DiT's weights are perturbed
and the mesh threshold is set to the median density of a decoded random latent, and every stage
of a request (sampling, decoding, meshing, previews) runs on real values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ln3diff_rt.checkpoint import Models, save_checkpoint
from ln3diff_rt.config import ModelConfig, get_preset
from ln3diff_rt.models.build import build_dit, build_vae

DIT_PERTURBATION = 0.02  # std of the noise added to every DiT weight
THRESHOLD_POINTS = 4096  # points in the box whose median density becomes the mesh threshold


@torch.no_grad()
def random_models(preset: str | ModelConfig = "tiny", seed: int = 0, device: str | torch.device = "cpu") -> Models:
    """The preset's (a name, or a ModelConfig such as a small `official_config`) VAE and DiT (eval mode, the modules
    `models.build` makes for it) with random weights drawn from `seed`; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
        vae, dit = build_vae(cfg).eval(), build_dit(cfg).eval()
        for p in dit.parameters():
            p.add_(DIT_PERTURBATION * torch.randn_like(p))
        vae, dit = vae.to(device), dit.to(device)
        planes = vae.decode(torch.randn(1, *cfg.latent_shape).to(device))  # [1, 3, C, R, R]
        density, _ = vae.field(planes, (torch.rand(1, THRESHOLD_POINTS, 3) * 2 - 1).to(device))
    cfg = cfg.replace(renderer=dataclasses.replace(cfg.renderer, mesh_threshold=float(density.median())))
    return Models(cfg, vae, dit, Path(f"<random {cfg.preset}, seed {seed}>"), {})


def random_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """`random_models(preset, seed)` saved as a checkpoint at `path`; returns the path."""
    models = random_models(preset, seed)
    save_checkpoint(path, models.config, {"vae": models.vae, "dit": models.dit})
    return Path(path)
