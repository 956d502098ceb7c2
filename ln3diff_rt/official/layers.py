"""Building blocks of the official LN3Diff transformers, with the official attribute (state-dict) names.

Written from `../shared/official-ln3diff/README.md`. Attention goes through `kernels.attention`, so
CUDA tensors take the Triton flash kernel.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from kernels import attention


def sincos_table(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE 1-D table [N, dim] = [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim/2)), in float64."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def triplane_pos_embed(dim: int, grid: int, planes: int = 3) -> torch.Tensor:
    """Frozen table [planes * grid^2, dim]: first half codes the flattened patch index, second half the plane."""
    patch = sincos_table(dim // 2, torch.arange(grid * grid))  # [g^2, D/2]
    plane = sincos_table(dim // 2, torch.arange(planes))  # [3, D/2]
    table = torch.cat([patch[None].expand(planes, -1, -1), plane[:, None].expand(-1, grid * grid, -1)], dim=-1)
    return table.reshape(planes * grid * grid, dim).float()


class TimestepEmbedder(nn.Module):
    """t used as given -> [cos(t f_k), sin(t f_k)] (cosine first, 256 features) -> Linear, SiLU, Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [B, 128]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Each plane of [B, 3, c, h, w] -> p x p patches -> tokens [B, 3 * (h/p)^2, D], plane after plane."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, planes, c, h, w = x.shape
        tokens = self.proj(x.reshape(b * planes, c, h, w)).flatten(2).transpose(1, 2)  # [B*3, g^2, D]
        return tokens.reshape(b, -1, tokens.shape[-1])


class TokenProjection(nn.Module):
    """Condition tokens -> width: Linear, tanh-GELU, Linear (`y_proj.fc1`, `y_proj.fc2`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.y_proj = nn.Sequential(OrderedDict(
            fc1=nn.Linear(in_dim, dim), act=nn.GELU(approximate="tanh"), fc2=nn.Linear(dim, dim)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.y_proj(tokens)


class FeedForward(nn.Module):
    """Linear (no bias), exact GELU, Linear (no bias): the official fused MLP, whose biases are constant zeros."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H * Dh] -> [B, H, N, Dh]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, Dh] -> [B, N, H * Dh]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Self-attention (qkv and proj with bias); i23d adds per-head RMSNorm on q, k and extra key/value tokens."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-5) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D] (, extra [B, T, D] attended to but not output) -> [B, N, D]."""
        d = x.shape[-1]
        q, k, v = self.qkv(x).split(d, dim=-1)
        if extra is not None:  # only the N latent tokens' outputs are kept, so extra tokens need no queries
            k_extra, v_extra = nn.functional.linear(extra, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=-1)
            k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
        q = self.q_norm(split_heads(q, self.heads))
        k = self.k_norm(split_heads(k, self.heads))
        return self.proj(merge_heads(attention(q, k, split_heads(v, self.heads))))


class CrossAttention(nn.Module):
    """Cross-attention with heads of 64 (to_q/k/v without bias, to_out with); i23d adds RMSNorm on q, k."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], context [B, L, Dc] -> [B, N, D]."""
        q = self.q_norm(split_heads(self.to_q(x), self.heads))
        k = self.k_norm(split_heads(self.to_k(context), self.heads))
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] * (1 + scale) + shift, with shift/scale broadcast over tokens ([B, 1, D])."""
    return x * (1 + scale) + shift


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[B, 3 * g^2, p * p * c] with rows ordered (py, px, c) -> [B, 3, c, g * p, g * p]."""
    b, n, _ = tokens.shape
    g = math.isqrt(n // 3)
    x = tokens.reshape(b, 3, g, g, patch, patch, channels)
    return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, 3, channels, g * patch, g * patch)


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
