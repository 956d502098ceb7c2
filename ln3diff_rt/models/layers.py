"""Transformer building blocks shared by the VAE and the DiT (attention goes through `kernels`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import attention


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to it."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, *self.keys_values(x if context is None else context))

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, D] -> keys and values [B, H, L, Dh] (apart from `attend`, so that a fixed context's are
        computed once: the DiT's cross-attention while sampling)."""
        b, n, _ = context.shape
        heads, dh = self.heads, self.proj.in_features // self.heads
        k, v = self.to_kv(context).view(b, n, 2, heads, dh).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        out = attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of float positions [N]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def triplane_pos_embed(dim: int, size: int) -> torch.Tensor:
    """Fixed embedding [3 * size * size, dim] for tokens laid out as (plane, row, col).

    2-D sin-cos of the token's position in its plane, plus a sin-cos code of the plane index so
    that cross-plane attention can tell xy, xz and yz apart.
    """
    if dim % 4:
        raise ValueError(f"positional embedding width {dim} must be divisible by 4")
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    plane_2d = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=-1)
    plane_id = sincos_1d(dim, torch.arange(3) * 100.0)  # far from any row/col index
    return (plane_2d[None] + plane_id[:, None]).reshape(3 * size * size, dim)


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> vector, via a sinusoidal code of 1000 t and an MLP (as DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sincos_1d(self.freq_dim, t * 1000.0).to(self.mlp[0].weight.dtype))


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, c, h, w] -> tokens [B, 3 * (h/p) * (w/p), c * p * p] in (plane, row, col) order."""
    b, planes, c, h, w = latent.shape
    x = latent.reshape(b, planes, c, h // p, p, w // p, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, planes * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, 3 * (size/p)^2, channels * p * p] -> [B, 3, channels, size, size]."""
    b = tokens.shape[0]
    g = size // p
    x = tokens.reshape(b, 3, g, g, channels, p, p)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, 3, channels, size, size)
