"""The one place that chooses between Triton kernels and PyTorch references.

LN3DIFF_KERNELS=auto (default) uses Triton for CUDA tensors and the reference elsewhere;
`triton` or `reference` forces either (forcing Triton on CPU tensors needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.composite_ref import composite_rays_ref
from kernels.triplane_ref import triplane_sample_ref

_MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("LN3DIFF_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"LN3DIFF_KERNELS={mode!r}; expected one of {_MODES}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = kernel_mode()
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def triplane_sample(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """planes [B, 3, C, R, R], points [B, N, 3] -> summed bilinear features [B, N, C]."""
    return triplane_sample_ref(planes, points)


def composite_rays(sigmas, rgbs, t_vals, deltas):
    """sigmas [N, S], rgbs [N, S, 3], t_vals/deltas [N, S] -> rgb [N, 3], depth [N], opacity [N], weights [N, S]."""
    return composite_rays_ref(sigmas, rgbs, t_vals, deltas)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]; no mask."""
    # On the CPU torch's fused SDPA is the reference path: same maths as attention_ref, far faster.
    return F.scaled_dot_product_attention(q, k, v)
