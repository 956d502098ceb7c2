"""VAE encoder: multi-view RGB + Plücker images -> posterior over the tri-plane latent.

A shared convolutional trunk downsamples each view by f. The lift from image space to the three
world-aligned planes starts geometric: for every plane token, points at a few depths along the
plane's normal are projected into every view with the known cameras, the view features there are
averaged over views and concatenated over depth. Transformer blocks then refine the plane tokens
with cross-attention to all view tokens (as LRM-style encoders do), and a linear head gives the
mean and log-variance. (Learned queries alone, without the projection, learned to ignore the
input: every object encoded to nearly the same latent.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ln3diff_rt.config import ModelConfig
from ln3diff_rt.conventions import PLANE_AXES
from ln3diff_rt.models.layers import Attention, Mlp, triplane_pos_embed


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class DownBlock(nn.Module):
    """Stride-2 conv then a residual 3x3 conv pair."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.body = nn.Sequential(_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.body(x)


class LiftBlock(nn.Module):
    """Plane tokens: cross-attention to view tokens, self-attention among planes, MLP (pre-norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = Attention(dim, heads)
        self.norm_self, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_mlp, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4.0)

    def forward(self, planes: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        planes = planes + self.cross(self.norm_q(planes), self.norm_kv(views))
        planes = planes + self.self_attn(self.norm_self(planes))
        return planes + self.mlp(self.norm_mlp(planes))


def plane_sample_points(size: int, depths: int) -> torch.Tensor:
    """World points [3, size, size, depths, 3]: for each plane token (row, col), `depths` points along the normal.

    Token (row, col) of plane (u, v) sits at u = col centre, v = row centre, as `triplane_sample` reads it.
    """
    centres = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    normal = (2 * torch.arange(depths, dtype=torch.float32) + 1) / depths - 1
    rows, cols, ws = torch.meshgrid(centres, centres, normal, indexing="ij")
    points = torch.zeros(3, size, size, depths, 3)
    for i, (u, v) in enumerate(PLANE_AXES):
        w = 3 - u - v
        points[i, ..., u], points[i, ..., v], points[i, ..., w] = cols, rows, ws
    return points


def project_to_views(feats: torch.Tensor, points: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor,
                     image_hw: tuple[int, int]) -> torch.Tensor:
    """Mean over views of the features [B, V, D, h, w] seen at world points [P, 3] -> [B, P, D].

    OpenGL cameras: a point at camera coordinates (X, Y, Z), Z < 0, lands on pixel
    (cx + fx X / -Z, cy - fy Y / -Z); points behind a camera or outside its image add nothing.
    """
    b, v, d = feats.shape[:3]
    rot, trans = c2w[..., :3, :3], c2w[..., :3, 3]
    cam = torch.einsum("bvij,bvpi->bvpj", rot, points[None, None] - trans[:, :, None])  # (p - t) R
    depth = (-cam[..., 2]).clamp(min=1e-6)
    fx, fy, cx, cy = (intrinsics[..., i, None] for i in range(4))
    px = cx + fx * cam[..., 0] / depth
    py = cy - fy * cam[..., 1] / depth
    height, width = image_hw
    grid = torch.stack([2 * px / width - 1, 2 * py / height - 1], dim=-1)  # [B, V, P, 2]
    sampled = F.grid_sample(feats.flatten(0, 1), grid.flatten(0, 1)[:, None].to(feats.dtype), align_corners=False)
    visible = (cam[..., 2] < 0).to(feats.dtype)  # [B, V, P]
    sampled = sampled[:, :, 0].reshape(b, v, d, -1) * visible[:, :, None]
    return (sampled.sum(1) / visible.sum(1).clamp(min=1)[:, None]).transpose(1, 2)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        enc = cfg.encoder
        self.latent_channels = cfg.latent_channels
        self.size = cfg.latent_size
        chans = (enc.channels[0],) + tuple(enc.channels)
        self.stem = nn.Conv2d(enc.in_channels, chans[0], 3, padding=1)
        self.trunk = nn.Sequential(*(DownBlock(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        self.to_tokens = nn.Sequential(_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], enc.width, 1))
        if not 1 <= enc.lift_levels <= len(enc.channels):
            raise ValueError(f"encoder.lift_levels {enc.lift_levels}: expected 1 to {len(enc.channels)} (trunk levels)")
        # Finer trunk levels the lift also samples (none by default), each to the token width.
        self.to_fine = nn.ModuleList(nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, enc.width, 1))
                                     for c in enc.channels[len(enc.channels) - enc.lift_levels:-1])
        self.view_pos = nn.Parameter(torch.zeros(1, self.size * self.size, enc.width))
        self.depths = min(self.size, 8)
        self.register_buffer("lift_points", plane_sample_points(self.size, self.depths).reshape(-1, 3),
                             persistent=False)
        lifted = self.depths * enc.width * enc.lift_levels
        self.lift = nn.Sequential(nn.LayerNorm(lifted), nn.Linear(lifted, enc.width))
        self.register_buffer("plane_pos", triplane_pos_embed(enc.width, self.size)[None], persistent=False)
        self.blocks = nn.ModuleList(LiftBlock(enc.width, enc.lift_heads) for _ in range(enc.lift_depth))
        self.head = nn.Sequential(nn.LayerNorm(enc.width), nn.Linear(enc.width, 2 * cfg.latent_channels))
        # Start from a confident posterior (sigma ~0.14): from sigma = 1 Adam needs thousands of steps to
        # shrink the noise, and meanwhile the decoder learns to ignore all but the coarsest latent content.
        nn.init.constant_(self.head[-1].bias[cfg.latent_channels:], -4.0)

    def forward(self, views: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """views [B, V, Cin, H, W], cameras c2w [B, V, 4, 4], intrinsics [B, V, 4] -> mean, logvar [B, 3, c, h, w]."""
        b, v = views.shape[:2]
        x, levels = self.stem(views.flatten(0, 1)), []
        for i, block in enumerate(self.trunk):
            x = block(x)
            fine = i - (len(self.trunk) - 1 - len(self.to_fine))
            if 0 <= fine < len(self.to_fine):
                levels.append(self.to_fine[fine](x))
        feats = self.to_tokens(x)  # [B*V, D, h, w]
        levels.append(feats)
        lifted = torch.cat([project_to_views(f.reshape(b, v, *f.shape[1:]), self.lift_points, c2w, intrinsics,
                                             views.shape[-2:]) for f in levels], dim=-1)  # [B, 3*h*w*K, D*levels]
        planes = self.lift(lifted.reshape(b, 3 * self.size * self.size, -1)) + self.plane_pos
        tokens = feats.flatten(2).transpose(1, 2) + self.view_pos  # [B*V, h*w, D]
        tokens = tokens.reshape(b, v * tokens.shape[1], -1)
        for block in self.blocks:
            planes = block(planes, tokens)
        out = self.head(planes)  # [B, 3*h*w, 2c]
        out = out.reshape(b, 3, self.size, self.size, 2 * self.latent_channels).permute(0, 1, 4, 2, 3)
        mean, logvar = out.chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)
