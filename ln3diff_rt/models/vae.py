"""The 3D-aware VAE: encoder -> KL tri-plane latent -> decoder -> tri-planes -> field for rendering."""

from __future__ import annotations

import torch
from torch import nn

from ln3diff_rt.cameras import camera_rays, plucker_rays
from ln3diff_rt.config import ModelConfig
from ln3diff_rt.models.decoder import Decoder
from ln3diff_rt.models.encoder import Encoder
from ln3diff_rt.models.field import TriplaneField


def encoder_input(images: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor,
                  depth: torch.Tensor | None = None) -> torch.Tensor:
    """images [B, V, 3, H, W] in [0, 1], c2w [B, V, 4, 4], intrinsics [B, V, 4] -> [B, V, 9 (+1), H, W]."""
    h, w = images.shape[-2:]
    origins, dirs = camera_rays(c2w, intrinsics, h, w)  # [B, V, H, W, 3]
    rays = plucker_rays(origins, dirs).permute(0, 1, 4, 2, 3)
    parts = [images * 2.0 - 1.0, rays.to(images.dtype)]
    if depth is not None:
        parts.append(depth)
    return torch.cat(parts, dim=2)


class TriplaneVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.field = TriplaneField(cfg.decoder.triplane_channels, cfg.renderer)

    def encode(self, images: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor,
               depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, V, 3, H, W] in [0, 1] with their cameras -> posterior mean, logvar [B, 3, c, h, w]."""
        return self.encoder(encoder_input(images, c2w, intrinsics, depth), c2w, intrinsics)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, 3, c, h, w] (unscaled) -> tri-planes [B, 3, C, R, R]."""
        return self.decoder(z)

    @staticmethod
    def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q || N(0, I)) per element, averaged: keeps the loss weight independent of latent size."""
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
