"""Condition-image encoder of the project's image-conditioned DiT: a small conv net, trained from scratch with it.

A centred object image [B, 3, S, S] in [0, 1] (`ln3diff_rt.images.centre_object`) goes through one
stride-2 conv 3x3 per entry of `channels` and one more conv 3x3 at the last resolution (GroupNorm +
SiLU after each; receptive field 31 pixels for three stages); every cell of the last feature map
[B, C, S / 2^n, S / 2^n] becomes one token, projected to `width`, plus a learned positional embedding.
The DiT attends to these tokens and adds their mean to its pooled text vector. Small on purpose: it
trains on one CPU core beside the DiT (a second conv per stage doubled its time per step).
"""

from __future__ import annotations

import torch
from torch import nn

from ln3diff_rt.config import ImageEncoderConfig


def _conv_norm_act(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU()]


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 3
        for c in cfg.channels:
            layers += _conv_norm_act(c_in, c, 2)
            c_in = c
        self.stages = nn.Sequential(*layers, *_conv_norm_act(c_in, c_in, 1))
        self.to_tokens = nn.Linear(c_in, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.width))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] -> tokens [B, cfg.tokens, cfg.width], one per cell of the last feature map."""
        feats = self.stages(images * 2.0 - 1.0)  # [B, C, s / 2^n, s / 2^n]
        return self.to_tokens(feats.flatten(2).transpose(1, 2)) + self.pos
