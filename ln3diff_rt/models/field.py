"""The tri-plane field head: summed tri-plane features -> MLP 32 -> 64 -> 4 -> density and colour.

As the official LN3Diff head: density softplus(sigma - 1), colour sigmoid, points in [-1, 1]^3. With
`RendererConfig.albedo` the last layer has 7 outputs: density, the lit colour (what renders) and the unlit
base colour (what assets carry); the first 4 mean what they mean without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triplane_sample
from ln3diff_rt.config import RendererConfig

LIT = slice(1, 4)  # output channels of the lit colour
ALBEDO = slice(4, 7)  # of the unlit base colour, where the field has the head


class TriplaneField(nn.Module):
    """Density and colour of a tri-plane at points in [-1, 1]^3 (and the albedo, with `has_albedo`)."""

    def __init__(self, triplane_channels: int, cfg: RendererConfig):
        super().__init__()
        self.density_bias, self.has_albedo = cfg.density_bias, cfg.albedo
        outputs = ALBEDO.stop if cfg.albedo else LIT.stop
        self.mlp = nn.Sequential(nn.Linear(triplane_channels, cfg.hidden), nn.Softplus(),
                                 nn.Linear(cfg.hidden, outputs))

    def forward(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes [B, 3, C, R, R], points [B, N, 3] -> density [B, N], lit rgb [B, N, 3]."""
        raw = self.mlp(triplane_sample(planes, points))
        return F.softplus(raw[..., 0] + self.density_bias), torch.sigmoid(raw[..., LIT])

    def albedo(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """planes [B, 3, C, R, R], points [B, N, 3] -> unlit base colour [B, N, 3]."""
        if not self.has_albedo:
            raise ValueError("this field has no albedo head (RendererConfig.albedo is False)")
        return torch.sigmoid(self.mlp(triplane_sample(planes, points))[..., ALBEDO])
