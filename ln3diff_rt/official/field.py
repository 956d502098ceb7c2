"""The official LN3Diff tri-plane field, in the project's box and plane order.

Official convention (see `../shared/official-ln3diff/README.md`, "Renderer"): objects live in the world
box [-0.45, 0.45]^3; a point x is scaled by 2 / box_warp (box_warp = 0.9) so that box maps onto the
planes' [-1, 1]; planes (xy, yz, zx) are sampled at (x, y), (y, z), (z, x), bilinear, zero padding,
align_corners=False, and the three 32-channel features are AVERAGED; an MLP 32 -> 64 -> 4 with a
run-time weight gain 1 / sqrt(fan_in) gives the raw sigma and rgb = sigmoid * 1.002 - 0.001.

Bridge to the project (decided here, used by `vae.py`, `render.py` and the pipeline):

- Box. Fields here take points in the project's box [-1, 1]^3: project point p is official world point
  0.45 p. Since 0.45 p * 2 / 0.9 = p, the planes are sampled at p itself, exactly the project's
  convention, so `kernels.triplane_sample` (Triton on GPU) does the gather. Meshes come out in the
  project's unit box (official mesh vertices / 0.45) and assets are rescaled to 1 m anyway; the
  world axes are the same, so the project's Z-up -> Y-up export rotation (x, y, z) -> (x, z, -y) is
  the official -90 degree rotation about x.
- Planes. Tri-planes are handed over as [B, 3, C, R, R] in the project's order (xy, xz, yz; see
  `ln3diff_rt.conventions.PLANE_AXES`): official plane yz is the project's yz, and official zx sampled
  at (z, x) is the project's xz plane transposed (sampled at (x, z)). Summing the project's three
  samples and dividing by 3 is the official mean.
- Density. `forward` returns density = 0.45 * softplus(sigma - 1): the official optical density per
  official unit is softplus(sigma - 1), and a project unit is 0.45 official units, so the project's
  ray marcher (distances in project units) composites the same opacity as the official one per
  sample. The official mesh is marching cubes at raw sigma = 10: mesh `raw_sigma` at level
  `MESH_SIGMA_LEVEL` for the official surface exactly; thresholding `forward`'s density at
  `MESH_DENSITY_LEVEL` classifies every grid node identically (the map is monotone) but places
  vertices by interpolating softplus values, a fraction of a cell off where sigma jumps steeply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triplane_sample
from ln3diff_rt.models.field import DensitySurface

BOX_WARP = 0.9  # official: world coordinates are multiplied by 2 / BOX_WARP before sampling
BOX_HALF = BOX_WARP / 2  # official object box [-0.45, 0.45]^3 = project box [-1, 1]^3
MESH_SIGMA_LEVEL = 10.0  # official marching-cubes level on raw sigma
MESH_RESOLUTION = 192  # official dense marching-cubes grid


def density_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Raw sigma -> optical density per project unit: softplus(sigma - 1) per official unit x 0.45."""
    return F.softplus(sigma - 1.0) * BOX_HALF


MESH_DENSITY_LEVEL = float(density_from_sigma(torch.tensor(MESH_SIGMA_LEVEL)))  # ~4.05: same nodes inside


def points_from_official(xyz: torch.Tensor) -> torch.Tensor:
    """Official world points [..., 3] (object box +-0.45) -> project box points (+-1), as the official scaling."""
    return xyz * (2.0 / BOX_WARP)


def triplane_from_official(triplane: torch.Tensor) -> torch.Tensor:
    """Official tri-plane [B, 3C, R, R] (channel = plane * C + c; planes xy, yz, zx) -> [B, 3, C, R, R] (xy, xz, yz)."""
    b, channels, r, _ = triplane.shape
    xy, yz, zx = triplane.reshape(b, 3, channels // 3, r, r).unbind(1)
    return torch.stack([xy, zx.transpose(-1, -2), yz], dim=1)


def triplane_to_official(planes: torch.Tensor) -> torch.Tensor:
    """Project tri-plane [B, 3, C, R, R] (xy, xz, yz) -> official [B, 3 * C, R, R] (xy, yz, zx, plane-major)."""
    b, _, c, r, _ = planes.shape
    xy, xz, yz = planes.unbind(1)
    return torch.stack([xy, yz, xz.transpose(-1, -2)], dim=1).reshape(b, 3 * c, r, r)


class GainLinear(nn.Module):
    """Linear layer whose weight is scaled by 1 / sqrt(fan_in) at run time (StyleGAN-style equalised lr).

    The stored weight is the official checkpoint's raw weight; biases are used as stored (lr_mul = 1).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in], raw
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = 1.0 / math.sqrt(in_features)
        nn.init.normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias)


class OfficialTriplaneField(DensitySurface, nn.Module):
    """Density and colour of an official tri-plane at points of the project box, as `TriplaneField` does.

    Attribute names follow the official `triplane_decoder.decoder.net.*` keys (net.1 is the softplus).
    """

    def __init__(self, channels: int = 32, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(GainLinear(channels, hidden), nn.Softplus(), GainLinear(hidden, 4))

    def raw(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes [B, 3, C, R, R] (xy, xz, yz), points [B, N, 3] in [-1, 1]^3 -> raw sigma [B, N], rgb [B, N, 3].

        Exactly the official `forward_points`: no box filter; outside [-1, 1] the planes read zeros.
        """
        features = triplane_sample(planes, points) / 3.0  # [B, N, C], the mean over the three planes
        out = self.net(features)  # [B, N, 4]
        return out[..., 0], torch.sigmoid(out[..., 1:]) * 1.002 - 0.001

    def forward(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes [B, 3, C, R, R], points [B, N, 3] -> density per project unit [B, N], rgb [B, N, 3]."""
        sigma, rgb = self.raw(planes, points)
        return density_from_sigma(sigma), rgb
