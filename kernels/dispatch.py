"""The one place that chooses between Triton kernels and PyTorch references.

LN3DIFF_KERNELS=auto (default) uses Triton for CUDA tensors (when triton is installed) except for attention,
which takes torch's SDPA on every device (on an H200 it beat the Triton kernel at every model shape), and for
tri-plane sampling on the CPU without gradients a fused gather (`triplane_cpu.py`), the reference elsewhere;
`triton` or `reference` forces either (forcing Triton on CPU tensors needs
TRITON_INTERPRET=1). The Triton modules are imported only on first use, so `import kernels`
works where triton is missing or cannot compile; importing them registers the `ln3diff::` ops.
(The flash-attention module is not named `attention`: importing a submodule sets the package
attribute of that name, which would shadow the `kernels.attention` function.)
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from kernels.composite_ref import composite_rays_ref
from kernels.triplane_cpu import triplane_sample_cpu
from kernels.triplane_ref import triplane_sample_ref

_MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("LN3DIFF_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"LN3DIFF_KERNELS={mode!r}; expected one of {_MODES}")
    return mode


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on `t` runs the Triton kernel; raises when Triton is forced but cannot run."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("LN3DIFF_KERNELS=triton but triton is not installed; unset it or install triton")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"LN3DIFF_KERNELS=triton on {t.device} tensors needs TRITON_INTERPRET=1 set "
                           "before triton is imported (or CUDA tensors)")
    return True


def use_cpu_sampling(planes: torch.Tensor, points: torch.Tensor) -> bool:
    """Whether tri-plane sampling takes `triplane_cpu`'s fused gather: CPU tensors in auto mode, no gradient
    wanted, and not being traced (torch.compile, torch.export, the TorchScript ONNX exporter see the reference)."""
    if kernel_mode() != "auto" or planes.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (planes.requires_grad or points.requires_grad):
        return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())


def triplane_sample(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """planes [B, 3, C, R, R], points [B, N, 3] -> summed bilinear features [B, N, C]."""
    if use_triton(planes):
        from kernels.triplane import triplane_sample as triplane_sample_triton

        return triplane_sample_triton(planes, points)
    if use_cpu_sampling(planes, points):
        return triplane_sample_cpu(planes, points)
    return triplane_sample_ref(planes, points)


def composite_rays(sigmas, rgbs, t_vals, deltas):
    """sigmas [N, S], rgbs [N, S, 3], t_vals/deltas [N, S] -> rgb [N, 3], depth [N], opacity [N],
    weights [N, S]."""
    if use_triton(sigmas):
        from kernels.composite import composite_rays as composite_rays_triton

        return composite_rays_triton(sigmas, rgbs, t_vals, deltas)
    return composite_rays_ref(sigmas, rgbs, t_vals, deltas)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]; no mask.

    Auto mode takes torch's SDPA on a GPU too: on an H200 (README, "GPU acceptance suite") the Triton kernel took
    1.18-1.24x SDPA's time at 4096-12288 tokens and 5-9x at 768 tokens and below (the DiT's). LN3DIFF_KERNELS=triton
    still runs it (its GPU tests and benchmark, exports that want the `ln3diff::flash_attention` op)."""
    if kernel_mode() == "triton" and use_triton(q):
        from kernels.flash_attention import flash_attention

        return flash_attention(q, k, v)[0]
    # On the CPU torch's fused SDPA is the reference path: same maths as attention_ref, far faster.
    return F.scaled_dot_product_attention(q, k, v)
