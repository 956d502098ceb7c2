"""Triton tri-plane sampling: gather + bilinear from the three planes + sum, in one pass.

Op `ln3diff::triplane_sample(planes [B, 3, C, R, R], points [B, N, 3]) -> [B, N, C]`, the maths of
`triplane_ref.triplane_sample_ref` (align_corners=False, zero padding, planes xy, xz, yz, the first
coordinate indexing the width axis). Each program owns BLOCK_N points and all C channels; the
three planes' 12 corner gathers are summed in registers, so no [N, 3, C] tensor exists.

The op reads a channels-last copy of the planes ([B, 3, R, R, C], made once per call and free when
the planes already have that layout) so that one corner gather is one contiguous run of C values.
Backward (`ln3diff::triplane_sample_backward`) scatters grad into the planes with fp32 atomic adds
and, only when the points need it, reduces the grad w.r.t. the points over channels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs each program in numpy: small tiles keep tests fast; on a GPU autotune picks.
_FWD_CONFIGS = (
    [triton.Config({"BLOCK_N": 16})]
    if _INTERPRET
    else [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (64, 128, 256) for w in (4, 8)]
)
_BWD_BLOCK_N = 16 if _INTERPRET else 64  # fixed: autotuning would replay the atomic adds


@triton.jit
def _plane_coords(u, v, R):
    """Pixel-space corner (x0, y0) and weights (wx, wy) of normalised (u, v); u indexes the width."""
    rf = R * 1.0
    # align_corners=False: -1 and 1 are the outer edges of the edge pixels. Clamping far-outside
    # points keeps the int cast in range; every corner there is padding, so the sample is unchanged.
    x = tl.minimum(tl.maximum(((u + 1.0) * rf - 1.0) * 0.5, -2.0), rf + 1.0)
    y = tl.minimum(tl.maximum(((v + 1.0) * rf - 1.0) * 0.5, -2.0), rf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _corner_offsets(x0, y0, R, stride_y, stride_x):
    """Offsets [BLOCK_N] and in-bounds masks of the four corners (y0,x0), (y0,x1), (y1,x0), (y1,x1)."""
    x1 = x0 + 1
    y1 = y0 + 1
    in_x0 = (x0 >= 0) & (x0 < R)
    in_x1 = (x1 >= 0) & (x1 < R)
    in_y0 = (y0 >= 0) & (y0 < R)
    in_y1 = (y1 >= 0) & (y1 < R)
    o00 = y0 * stride_y + x0 * stride_x
    o01 = y0 * stride_y + x1 * stride_x
    o10 = y1 * stride_y + x0 * stride_x
    o11 = y1 * stride_y + x1 * stride_x
    return o00, o01, o10, o11, in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1


@triton.jit
def _load_corners(plane, offs_c, mask_c, o00, o01, o10, o11, m00, m01, m10, m11):
    """The four corners' features, each [BLOCK_N, BLOCK_C] fp32, zero outside the plane."""
    c = offs_c[None, :]
    mc = mask_c[None, :]
    v00 = tl.load(plane + o00[:, None] + c, mask=m00[:, None] & mc, other=0.0).to(tl.float32)
    v01 = tl.load(plane + o01[:, None] + c, mask=m01[:, None] & mc, other=0.0).to(tl.float32)
    v10 = tl.load(plane + o10[:, None] + c, mask=m10[:, None] & mc, other=0.0).to(tl.float32)
    v11 = tl.load(plane + o11[:, None] + c, mask=m11[:, None] & mc, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _bilinear(plane, u, v, offs_c, mask_n, mask_c, R, stride_y, stride_x):
    x0, y0, wx, wy = _plane_coords(u, v, R)
    o00, o01, o10, o11, m00, m01, m10, m11 = _corner_offsets(x0, y0, R, stride_y, stride_x)
    v00, v01, v10, v11 = _load_corners(plane, offs_c, mask_c, o00, o01, o10, o11,
                                       m00 & mask_n, m01 & mask_n, m10 & mask_n, m11 & mask_n)
    wx = wx[:, None]
    wy = wy[:, None]
    return (v00 * (1.0 - wx) + v01 * wx) * (1.0 - wy) + (v10 * (1.0 - wx) + v11 * wx) * wy


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "C"])
@triton.jit
def _triplane_fwd_kernel(
    planes_ptr, points_ptr, out_ptr, N, C, R,
    stride_pb, stride_pp, stride_py, stride_px,  # channels-last planes [B, 3, R, R, C], channel stride 1
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    pts = points_ptr + pid_b * N * 3 + offs_n * 3  # points contiguous [B, N, 3]
    px = tl.load(pts + 0, mask=mask_n, other=0.0).to(tl.float32)
    py = tl.load(pts + 1, mask=mask_n, other=0.0).to(tl.float32)
    pz = tl.load(pts + 2, mask=mask_n, other=0.0).to(tl.float32)
    base = planes_ptr + pid_b * stride_pb
    acc = _bilinear(base, px, py, offs_c, mask_n, mask_c, R, stride_py, stride_px)
    acc += _bilinear(base + stride_pp, px, pz, offs_c, mask_n, mask_c, R, stride_py, stride_px)
    acc += _bilinear(base + 2 * stride_pp, py, pz, offs_c, mask_n, mask_c, R, stride_py, stride_px)
    out = out_ptr + pid_b * N * C + offs_n[:, None] * C + offs_c[None, :]  # out contiguous [B, N, C]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _plane_backward(plane, grad_plane, g, u, v, offs_c, mask_n, mask_c, R, stride_y, stride_x,
                    NEED_POINTS_GRAD: tl.constexpr):
    """Scatter g [BLOCK_N, BLOCK_C] into one plane's grad; return d loss / d(u, v) [BLOCK_N] each."""
    x0, y0, wx, wy = _plane_coords(u, v, R)
    o00, o01, o10, o11, m00, m01, m10, m11 = _corner_offsets(x0, y0, R, stride_y, stride_x)
    m00 = m00 & mask_n
    m01 = m01 & mask_n
    m10 = m10 & mask_n
    m11 = m11 & mask_n
    c = offs_c[None, :]
    mc = mask_c[None, :]
    wx2 = wx[:, None]
    wy2 = wy[:, None]
    tl.atomic_add(grad_plane + o00[:, None] + c, g * ((1.0 - wx2) * (1.0 - wy2)), mask=m00[:, None] & mc)
    tl.atomic_add(grad_plane + o01[:, None] + c, g * (wx2 * (1.0 - wy2)), mask=m01[:, None] & mc)
    tl.atomic_add(grad_plane + o10[:, None] + c, g * ((1.0 - wx2) * wy2), mask=m10[:, None] & mc)
    tl.atomic_add(grad_plane + o11[:, None] + c, g * (wx2 * wy2), mask=m11[:, None] & mc)
    if NEED_POINTS_GRAD:
        v00, v01, v10, v11 = _load_corners(plane, offs_c, mask_c, o00, o01, o10, o11, m00, m01, m10, m11)
        half_r = R * 0.5  # d(pixel x) / d(normalised u), align_corners=False
        d_wx = (v01 - v00) * (1.0 - wy2) + (v11 - v10) * wy2
        d_wy = (v10 - v00) * (1.0 - wx2) + (v11 - v01) * wx2
        return tl.sum(g * d_wx, axis=1) * half_r, tl.sum(g * d_wy, axis=1) * half_r
    else:
        return tl.zeros_like(wx), tl.zeros_like(wy)


@triton.jit
def _triplane_bwd_kernel(
    planes_ptr, points_ptr, grad_out_ptr, grad_planes_ptr, grad_points_ptr, N, C, R,
    stride_pb, stride_pp, stride_py, stride_px,  # planes and grad_planes share the channels-last layout
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NEED_POINTS_GRAD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    pts = points_ptr + pid_b * N * 3 + offs_n * 3
    px = tl.load(pts + 0, mask=mask_n, other=0.0).to(tl.float32)
    py = tl.load(pts + 1, mask=mask_n, other=0.0).to(tl.float32)
    pz = tl.load(pts + 2, mask=mask_n, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + pid_b * N * C + offs_n[:, None] * C + offs_c[None, :],
                mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    base = planes_ptr + pid_b * stride_pb
    gbase = grad_planes_ptr + pid_b * stride_pb
    gx_xy, gy_xy = _plane_backward(base, gbase, g, px, py, offs_c, mask_n, mask_c, R, stride_py, stride_px,
                                   NEED_POINTS_GRAD)
    gx_xz, gz_xz = _plane_backward(base + stride_pp, gbase + stride_pp, g, px, pz, offs_c, mask_n, mask_c,
                                   R, stride_py, stride_px, NEED_POINTS_GRAD)
    gy_yz, gz_yz = _plane_backward(base + 2 * stride_pp, gbase + 2 * stride_pp, g, py, pz, offs_c, mask_n,
                                   mask_c, R, stride_py, stride_px, NEED_POINTS_GRAD)
    if NEED_POINTS_GRAD:
        gpts = grad_points_ptr + pid_b * N * 3 + offs_n * 3
        tl.store(gpts + 0, gx_xy + gx_xz, mask=mask_n)
        tl.store(gpts + 1, gy_xy + gy_yz, mask=mask_n)
        tl.store(gpts + 2, gz_xz + gz_yz, mask=mask_n)


def _check(planes: torch.Tensor, points: torch.Tensor) -> None:
    if planes.dim() != 5 or planes.shape[1] != 3 or planes.shape[3] != planes.shape[4]:
        raise ValueError(f"planes: expected [B, 3, C, R, R], got {list(planes.shape)}")
    if points.dim() != 3 or points.shape[2] != 3 or points.shape[0] != planes.shape[0]:
        raise ValueError(f"points: expected [B={planes.shape[0]}, N, 3], got {list(points.shape)}")
    if planes.device != points.device:
        raise ValueError(f"planes on {planes.device} but points on {points.device}")


def _channels_last(planes: torch.Tensor) -> torch.Tensor:
    return planes.permute(0, 1, 3, 4, 2).contiguous()  # [B, 3, R, R, C]


@triton_op("ln3diff::triplane_sample", mutates_args={})
def triplane_sample(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """planes [B, 3, C, R, R], points [B, N, 3] -> summed bilinear features [B, N, C] (planes' dtype)."""
    _check(planes, points)
    b, _, c, r, _ = planes.shape
    n = points.shape[1]
    planes_cl = _channels_last(planes)
    points = points.contiguous()
    out = torch.empty(b, n, c, dtype=planes.dtype, device=planes.device)
    if n == 0:
        return out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b)  # noqa: E731
    wrap_triton(_triplane_fwd_kernel)[grid](
        planes_cl, points, out, n, c, r,
        planes_cl.stride(0), planes_cl.stride(1), planes_cl.stride(2), planes_cl.stride(3),
        BLOCK_C=triton.next_power_of_2(c),
    )
    return out


@triplane_sample.register_fake
def _(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return planes.new_empty(planes.shape[0], points.shape[1], planes.shape[2])


@triton_op("ln3diff::triplane_sample_backward", mutates_args={})
def triplane_sample_backward(
    grad_out: torch.Tensor, planes: torch.Tensor, points: torch.Tensor, need_points_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [B, N, C] -> (grad_planes [B, 3, C, R, R], grad_points [B, N, 3]; zeros unless asked)."""
    b, _, c, r, _ = planes.shape
    n = points.shape[1]
    planes_cl = _channels_last(planes)
    points = points.contiguous()
    grad_out = grad_out.contiguous()
    grad_planes_cl = torch.zeros(planes_cl.shape, dtype=torch.float32, device=planes.device)
    grad_points = torch.zeros(b, n, 3, dtype=torch.float32, device=points.device)
    if n > 0:
        wrap_triton(_triplane_bwd_kernel)[(triton.cdiv(n, _BWD_BLOCK_N), b)](
            planes_cl, points, grad_out, grad_planes_cl, grad_points, n, c, r,
            planes_cl.stride(0), planes_cl.stride(1), planes_cl.stride(2), planes_cl.stride(3),
            BLOCK_N=_BWD_BLOCK_N, BLOCK_C=triton.next_power_of_2(c), NEED_POINTS_GRAD=need_points_grad,
        )
    grad_planes = grad_planes_cl.permute(0, 1, 4, 2, 3).to(planes.dtype,
                                                            memory_format=torch.contiguous_format)
    return grad_planes, grad_points.to(points.dtype)


@triplane_sample_backward.register_fake
def _(grad_out, planes, points, need_points_grad):
    return torch.empty_like(planes, memory_format=torch.contiguous_format), torch.empty_like(
        points, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    planes, points = inputs
    ctx.save_for_backward(planes, points)


def _backward(ctx, grad_out):
    planes, points = ctx.saved_tensors
    grad_planes, grad_points = triplane_sample_backward(grad_out, planes, points, ctx.needs_input_grad[1])
    return (grad_planes if ctx.needs_input_grad[0] else None,
            grad_points if ctx.needs_input_grad[1] else None)


triplane_sample.register_autograd(_backward, setup_context=_setup_context)
