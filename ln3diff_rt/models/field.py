"""The tri-plane field head: summed tri-plane features -> MLP 32 -> 64 -> 4 -> density and colour.

As the official LN3Diff head: density softplus(sigma - 1), colour sigmoid, points in [-1, 1]^3. With
`RendererConfig.albedo` the last layer has 7 outputs: density, the lit colour (what renders) and the unlit
base colour (what assets carry); the first 4 mean what they mean without it. With `RendererConfig.geometry
= "sdf"` the first output is a signed distance and density follows from it (VolSDF), so renderers, engines
and losses still see density; only meshing and the SDF losses look at the distance itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triplane_sample
from ln3diff_rt.config import RendererConfig

LIT = slice(1, 4)  # output channels of the lit colour
ALBEDO = slice(4, 7)  # of the unlit base colour, where the field has the head
SDF_INIT = 0.25  # an SDF field starts as empty space 5 beta from any surface: density 0.02, not a fog in the box


def sdf_density(sdf: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """VolSDF: density = Psi_beta(-s) / beta, Psi_beta the CDF of a zero-mean Laplace of scale beta; 1 / (2 beta)
    on the surface, 1 / beta deep inside."""
    x = -sdf / beta
    return torch.where(x <= 0, 0.5 * torch.exp(x.clamp(max=0.0)), 1.0 - 0.5 * torch.exp(-x.clamp(min=0.0))) / beta


def sdf_of_density(density: torch.Tensor, beta: float) -> torch.Tensor:
    """The inverse of `sdf_density`, for meshing from engines that return density only. In float32 it is exact to
    1% of beta from 10 beta inside the surface (where the density nears its ceiling 1 / beta; by 16 beta it
    saturates) to 80 beta outside; marching cubes needs it only across one cell."""
    p = (density.float() * beta).clamp(1e-37, 1.0 - 1e-7)
    return torch.where(p < 0.5, -beta * torch.log(2.0 * p), beta * torch.log(2.0 - 2.0 * p))


class DensitySurface:
    """Where a density field's surface is, for meshing and evaluation (the official field's too): density above the
    calibrated threshold. `TriplaneField` overrides both for SDF fields."""

    is_sdf = False

    def surface_density(self, threshold: float) -> float:
        """The density on the surface: the calibrated `threshold` (RendererConfig.mesh_threshold).
        `density > surface_density` is what counts as inside."""
        return threshold

    def mesh_level(self, density: torch.Tensor) -> torch.Tensor:
        """The scalar marching cubes cuts at `mesh_level(surface_density)`, from density: the density itself."""
        return density


class TriplaneField(DensitySurface, nn.Module):
    """Density and colour of a tri-plane at points in [-1, 1]^3 (and the albedo, with `has_albedo`)."""

    def __init__(self, triplane_channels: int, cfg: RendererConfig):
        super().__init__()
        self.density_bias, self.has_albedo, self.is_sdf = cfg.density_bias, cfg.albedo, cfg.geometry == "sdf"
        outputs = ALBEDO.stop if cfg.albedo else LIT.stop
        self.mlp = nn.Sequential(nn.Linear(triplane_channels, cfg.hidden), nn.Softplus(),
                                 nn.Linear(cfg.hidden, outputs))
        if self.is_sdf:
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.sdf_beta)))  # learned, as VolSDF's beta
            with torch.no_grad():
                self.mlp[2].bias[0] += SDF_INIT

    def forward(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes [B, 3, C, R, R], points [B, N, 3] -> density [B, N], lit rgb [B, N, 3]."""
        raw = self.mlp(triplane_sample(planes, points))
        return density_of(self, raw[..., 0]), torch.sigmoid(raw[..., LIT])

    def albedo(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """planes [B, 3, C, R, R], points [B, N, 3] -> unlit base colour [B, N, 3]."""
        if not self.has_albedo:
            raise ValueError("this field has no albedo head (RendererConfig.albedo is False)")
        return torch.sigmoid(self.mlp(triplane_sample(planes, points))[..., ALBEDO])

    def sdf(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """planes [B, 3, C, R, R], points [B, N, 3] -> signed distance [B, N] (box units, negative inside)."""
        if not self.is_sdf:
            raise ValueError("this field is a density field (RendererConfig.geometry is 'density')")
        return self.mlp(triplane_sample(planes, points))[..., 0]

    @property
    def beta(self) -> float:
        """The SDF field's Laplace scale (box units)."""
        return float(self.log_beta.detach().exp())

    def surface_density(self, threshold: float) -> float:
        """As a density field's, or an SDF field's density at s = 0."""
        return 0.5 / self.beta if self.is_sdf else threshold

    def mesh_level(self, density: torch.Tensor) -> torch.Tensor:
        """As a density field's, or an SDF field's -s (linear across the surface, so vertices land where the
        distance crosses 0)."""
        return -sdf_of_density(density, self.beta) if self.is_sdf else density


def density_of(field: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """The MLP's first output [B, N] -> density, for `field` (a `TriplaneField` or a rearrangement holding its
    `density_bias`, `is_sdf` and `log_beta`)."""
    if field.is_sdf:
        return sdf_density(raw, field.log_beta.exp())
    return F.softplus(raw + field.density_bias)
