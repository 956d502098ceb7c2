"""Triton flash attention (forward and backward), no mask, not causal.

Op `ln3diff::flash_attention(q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, D]) -> (o [B, H, Nq, D],
lse [B, H, Nq])`, the maths of `attention_ref.attention_ref`; lse is the natural-log sum-exp of
each row of scaled scores, kept for the backward. Nq != Nk is allowed (cross-attention to text
tokens); any head dim up to 128 (the tile is the next power of two, masked), fp32, fp16 or bf16
inputs with fp32 accumulation; inputs may be strided (no copies for the model's transposed heads).

The forward is the online softmax of FlashAttention-2 / Triton's fused-attention tutorial: each
program owns BLOCK_M queries of one (batch, head), streams K and V in BLOCK_N tiles and never
holds more than a [BLOCK_M, BLOCK_N] tile of scores. Tails of Nq and Nk are masked. The backward
(`ln3diff::flash_attention_backward`) recomputes the scores tile by tile from lse: one kernel
accumulates dK, dV per K tile over all queries, another dQ per query tile over all keys.
fp32 inputs use Triton's default dot precision (TF32 on Ampere and newer GPUs).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128  # the models use 32..128; wider fp32 tiles would not fit in shared memory


def _configs(candidates: list[tuple[int, int, int, int]]) -> list:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> autotune configs; one small tile under the interpreter."""
    if _INTERPRET:
        candidates = [(16, 16, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in candidates]


_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                         (64, 32, 4, 4)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2)])
_KEY = ["N_Q", "N_K", "HEAD_DIM"]
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is the fast path
# Each kernel casts sm_scale to fp32 first: eager Triton types a Python float fp32, but inside torch.compile or an
# AOTInductor package Inductor types it fp64, which promoted qk and the running max to fp64 and broke the build
# (seen on an H200; `python -m kernels.compile_check` compiles both typings).


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,  # input strides, any layout
    H, N_Q, N_K, HEAD_DIM, sm_scale,  # o and lse are contiguous [B, H, Nq, D] and [B, H, Nq]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor passes Python floats as fp64 (see _LOG2E's note)
    qk_scale = sm_scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        k_t = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                      mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, k_t) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    row = pid_bh * N_Q + offs_m
    tl.store(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) / _LOG2E, mask=mask_m)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,  # do, lse, delta, dk, dv contiguous
    H, N_Q, N_K, HEAD_DIM, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dV = P^T dO and dK = scale * dS^T Q for one tile of BLOCK_N keys, over all queries."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_K
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=mask_nd, other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor passes Python floats as fp64 (see _LOG2E's note)
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N_Q
        q_t = tl.load(q_base + rows[None, :] * sqn + offs_d[:, None] * sqd,
                      mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
        do = tl.load(do_ptr + (pid_bh * N_Q + rows)[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        lse = tl.load(lse_ptr + pid_bh * N_Q + rows, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + pid_bh * N_Q + rows, mask=mask_m, other=0.0)
        p_t = tl.exp2(tl.dot(k, q_t) * qk_scale - lse[None, :] * _LOG2E)  # [BLOCK_N, BLOCK_M]
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t))
    out = (pid_bh * N_K + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    H, N_Q, N_K, HEAD_DIM, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = scale * dS K for one tile of BLOCK_M queries, over all keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_md, other=0.0)
    rows = pid_bh * N_Q + offs_m
    do = tl.load(do_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_md, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor passes Python floats as fp64 (see _LOG2E's note)
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        mask_dn = mask_d[:, None] & mask_n[None, :]
        k_t = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=mask_dn, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * svn + offs_d[:, None] * svd, mask=mask_dn, other=0.0)
        p = tl.exp2(tl.dot(q, k_t) * qk_scale - lse[:, None] * _LOG2E)  # [BLOCK_M, BLOCK_N]
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        ds = p * (tl.dot(do, v_t) - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    tl.store(dq_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=mask_md)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, Nq, D], got {list(q.shape)}")
    b, h, _, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[0] != b or x.shape[1] != h or x.shape[3] != d:
            raise ValueError(f"{name}: expected [B={b}, H={h}, Nk, D={d}], got {list(x.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but v has {v.shape[2]}")
    if k.shape[2] == 0:
        raise ValueError("k and v have no tokens: softmax over an empty set is undefined")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of {_DTYPES}, "
                         "the same for all three")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {d}: expected 1..{_MAX_HEAD_DIM}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on {q.device}, {k.device}, {v.device}: expected one device")


def _launch_args(q, k, v) -> tuple:
    b, h, nq, d = q.shape
    return (*q.stride(), *k.stride(), *v.stride(), h, nq, k.shape[2], d, 1.0 / math.sqrt(d))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs tiles of at least 16


@triton_op("ln3diff::flash_attention", mutates_args={})
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v -> (o [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32)."""
    _check(q, k, v)
    b, h, nq, d = q.shape
    o = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if nq > 0 and b * h > 0:
        grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h)  # noqa: E731
        wrap_triton(_attn_fwd_kernel)[grid](q, k, v, o, lse, *_launch_args(q, k, v), BLOCK_D=_block_d(d))
    return o, lse


@flash_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@triton_op("ln3diff::flash_attention_backward", mutates_args={})
def flash_attention_backward(
    grad_o: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype, contiguous; grad_lse [B, H, Nq] is usually zeros."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if nq == 0 or b * h == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_o = grad_o.contiguous()
    # dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse, since d lse / d s_ij = p_ij.
    delta = ((grad_o.float() * o.float()).sum(-1) - grad_lse.float()).contiguous()  # [B, H, Nq]
    dq = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, h, nk, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, h, nk, d, dtype=v.dtype, device=v.device)
    args = _launch_args(q, k, v)
    grid_kv = lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * h)  # noqa: E731
    wrap_triton(_attn_bwd_dkdv_kernel)[grid_kv](q, k, v, grad_o, lse, delta, dk, dv, *args,
                                                BLOCK_D=_block_d(d))
    grid_q = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h)  # noqa: E731
    wrap_triton(_attn_bwd_dq_kernel)[grid_q](q, k, v, grad_o, lse, delta, dq, *args, BLOCK_D=_block_d(d))
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(grad_o, grad_lse, q, k, v, o, lse):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    return flash_attention_backward(grad_o, grad_lse, q, k, v, o, lse)


flash_attention.register_autograd(_backward, setup_context=_setup_context)
