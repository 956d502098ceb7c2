"""The tri-plane field head: summed tri-plane features -> MLP 32 -> 64 -> 4 -> density and colour.

As the official LN3Diff head: density softplus(sigma - 1), colour sigmoid, points in [-1, 1]^3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triplane_sample
from ln3diff_rt.config import RendererConfig


class TriplaneField(nn.Module):
    """Density and colour of a tri-plane at points in [-1, 1]^3."""

    def __init__(self, triplane_channels: int, cfg: RendererConfig):
        super().__init__()
        self.density_bias = cfg.density_bias
        self.mlp = nn.Sequential(nn.Linear(triplane_channels, cfg.hidden), nn.Softplus(), nn.Linear(cfg.hidden, 4))

    def forward(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes [B, 3, C, R, R], points [B, N, 3] -> density [B, N], rgb [B, N, 3]."""
        raw = self.mlp(triplane_sample(planes, points))
        density = F.softplus(raw[..., 0] + self.density_bias)
        rgb = torch.sigmoid(raw[..., 1:])
        return density, rgb
