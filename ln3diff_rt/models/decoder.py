"""VAE decoder: latent [B, 3, c, h, w] -> tri-plane features [B, 3, C, R, R].

Transformer blocks over latent patches alternate self-plane attention (tokens attend within
their own plane) and cross-plane attention (all three planes as one sequence), as in LN3Diff;
a convolutional upsampler then lifts each plane to the tri-plane resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ln3diff_rt.config import ModelConfig
from ln3diff_rt.models.layers import Attention, Mlp, patchify, triplane_pos_embed, unpatchify


class PlaneBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_plane: bool):
        super().__init__()
        self.cross_plane = cross_plane
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # n = 3 * tokens per plane, plane-major
        h = self.norm1(x)
        if self.cross_plane:
            h = self.attn(h)
        else:
            h = self.attn(h.reshape(b * 3, n // 3, d)).reshape(b, n, d)
        x = x + h
        return x + self.mlp(self.norm2(x))


class Upsampler(nn.Module):
    """One nearest x2 + conv stage per entry of `channels`, then a 3x3 conv to the tri-plane channels."""

    def __init__(self, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        stages = []
        for cin, cout in zip(channels, channels[1:] + channels[-1:], strict=True):
            stages += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                       nn.GroupNorm(min(32, cout // 4), cout), nn.SiLU()]
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dec = cfg.decoder
        self.p = dec.patch_size
        self.size = cfg.latent_size
        self.up_channels = dec.upsample_channels[0]
        self.embed = nn.Linear(cfg.latent_channels * self.p * self.p, dec.width)
        self.register_buffer("pos", triplane_pos_embed(dec.width, self.size // self.p)[None], persistent=False)
        self.blocks = nn.ModuleList(PlaneBlock(dec.width, dec.heads, dec.mlp_ratio, cross_plane=i % 2 == 1)
                                    for i in range(dec.depth))
        self.norm = nn.LayerNorm(dec.width)
        self.to_features = nn.Linear(dec.width, self.up_channels * self.p * self.p)
        self.upsampler = Upsampler(dec.upsample_channels, dec.triplane_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 3, c, h, w] -> tri-planes [B, 3, C, R, R]."""
        b = z.shape[0]
        x = self.embed(patchify(z, self.p)) + self.pos
        for block in self.blocks:
            x = block(x)
        feats = unpatchify(self.to_features(self.norm(x)), self.p, self.up_channels, self.size)
        planes = self.upsampler(feats.flatten(0, 1))  # [B*3, C, R, R]
        return planes.reshape(b, 3, *planes.shape[1:])
