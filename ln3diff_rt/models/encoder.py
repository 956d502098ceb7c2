"""VAE encoder: multi-view RGB + Plücker images -> posterior over the tri-plane latent.

A shared convolutional trunk downsamples each view by f; learned tri-plane queries then
cross-attend to the tokens of all views (the lift from image space to the three world-aligned
planes, as in LRM-style encoders), and a linear head gives the mean and log-variance.
"""

from __future__ import annotations

import torch
from torch import nn

from ln3diff_rt.config import ModelConfig
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
        self.view_pos = nn.Parameter(torch.zeros(1, self.size * self.size, enc.width))
        self.plane_queries = nn.Parameter(torch.randn(1, 3 * self.size * self.size, enc.width) * 0.02)
        self.register_buffer("plane_pos", triplane_pos_embed(enc.width, self.size)[None], persistent=False)
        self.blocks = nn.ModuleList(LiftBlock(enc.width, enc.lift_heads) for _ in range(enc.lift_depth))
        self.head = nn.Sequential(nn.LayerNorm(enc.width), nn.Linear(enc.width, 2 * cfg.latent_channels))
        # Start from a confident posterior (sigma ~0.14): from sigma = 1 Adam needs thousands of steps to
        # shrink the noise, and meanwhile the decoder learns to ignore all but the coarsest latent content.
        nn.init.constant_(self.head[-1].bias[cfg.latent_channels:], -4.0)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """views [B, V, Cin, H, W] -> mean, logvar [B, 3, c, h, w]."""
        b, v = views.shape[:2]
        feats = self.to_tokens(self.trunk(self.stem(views.flatten(0, 1))))  # [B*V, D, h, w]
        tokens = feats.flatten(2).transpose(1, 2) + self.view_pos  # [B*V, h*w, D]
        tokens = tokens.reshape(b, v * tokens.shape[1], -1)
        planes = (self.plane_queries + self.plane_pos).expand(b, -1, -1)
        for block in self.blocks:
            planes = block(planes, tokens)
        out = self.head(planes)  # [B, 3*h*w, 2c]
        out = out.reshape(b, 3, self.size, self.size, 2 * self.latent_channels).permute(0, 1, 4, 2, 3)
        mean, logvar = out.chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)
