"""Triton tri-plane sampling vs `triplane_sample_ref`, under TRITON_INTERPRET=1 (tests/conftest.py)."""

import os

import pytest
import torch

from kernels.triplane import triplane_sample, triplane_sample_backward
from kernels.triplane_ref import triplane_sample_ref

# Forward tolerances vs the fp32 reference on the same (rounded) planes: the kernel computes in
# fp32 and rounds once on store, so the error is one rounding of an output of magnitude ~3.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = [(2, 5, 7, 37), (1, 32, 9, 19), (1, 3, 1, 5)]  # B, C, R, N: odd C, R = 1, N not a multiple of 16


def _inputs(b, c, r, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(b, 3, c, r, r, generator=gen).to(dtype)
    points = torch.rand(b, n, 3, generator=gen) * 2.4 - 1.2  # ~10% outside [-1, 1]: zero padding
    return planes, points


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, dtype):
    planes, points = _inputs(*shape, dtype=dtype)
    out = triplane_sample(planes, points)
    ref = triplane_sample_ref(planes.float(), points)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_forward_on_edges_and_centres():
    """Points exactly at -1, 1 (outer pixel edges), 0 and pixel centres, and far outside."""
    planes, _ = _inputs(1, 4, 5, 1)
    centres = (torch.arange(5) + 0.5) / 5 * 2 - 1
    values = torch.cat([torch.tensor([-1.0, 1.0, 0.0, -1.7, 3.0, -1e6]), centres])
    points = torch.cartesian_prod(values, values, values[:4]).unsqueeze(0)
    torch.testing.assert_close(triplane_sample(planes, points), triplane_sample_ref(planes, points),
                               atol=1e-5, rtol=1e-5)


def test_strided_planes_and_points():
    """Channels-last planes (no copy in the op) and non-contiguous points give the same answer."""
    planes, points = _inputs(2, 5, 7, 37)
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    points_t = points.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(triplane_sample(planes_cl, points_t), triplane_sample_ref(planes, points),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_grads_match_reference_autograd(shape):
    planes, points = _inputs(*shape)
    grad = torch.randn(shape[0], shape[3], shape[1], generator=torch.Generator().manual_seed(1))
    planes.requires_grad_(True)
    points.requires_grad_(True)
    got = torch.autograd.grad(triplane_sample(planes, points), (planes, points), grad)
    want = torch.autograd.grad(triplane_sample_ref(planes, points), (planes, points), grad)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    # d/dpoints scales values by R/2 and sums over channels: a looser absolute tolerance.
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_planes_grad_low_precision(dtype):
    """Grads accumulate in fp32 and are rounded once to the planes' dtype."""
    planes, points = _inputs(2, 5, 7, 37, dtype=dtype)
    grad = torch.randn(2, 37, 5, generator=torch.Generator().manual_seed(1))
    planes.requires_grad_(True)
    got, = torch.autograd.grad(triplane_sample(planes, points), planes, grad.to(dtype))
    ref_planes = planes.detach().float().requires_grad_(True)
    want, = torch.autograd.grad(triplane_sample_ref(ref_planes, points), ref_planes, grad.to(dtype).float())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_points_grad_skipped_when_not_needed():
    """Only planes require grad (the VAE case): the kernel skips the point reduction."""
    planes, points = _inputs(2, 5, 7, 37)
    grad = torch.randn(2, 37, 5)
    grad_planes, grad_points = triplane_sample_backward(grad, planes, points, False)
    assert torch.count_nonzero(grad_points) == 0
    planes.requires_grad_(True)
    want, = torch.autograd.grad(triplane_sample_ref(planes, points), planes, grad)
    torch.testing.assert_close(grad_planes, want, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise():
    planes, points = _inputs(2, 5, 7, 37)
    with pytest.raises(ValueError, match="planes"):
        triplane_sample(planes[:, :2], points)
    with pytest.raises(ValueError, match="points"):
        triplane_sample(planes, points[..., :2])
    with pytest.raises(ValueError, match="points"):
        triplane_sample(planes, points[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)")
def test_paper_shape_on_gpu():
    planes, points = _inputs(1, 32, 256, 4096 * 16)
    planes, points = planes.cuda().requires_grad_(True), points.cuda().requires_grad_(True)
    out = triplane_sample(planes, points)
    ref = triplane_sample_ref(planes, points)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):  # the engines' half-precision tri-planes, fp32 points
        low = triplane_sample(planes.detach().to(dtype), points.detach())
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), ref.detach(), atol=TOL[dtype], rtol=TOL[dtype])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (planes, points), grad)
    want = torch.autograd.grad(ref, (planes, points), grad)
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[1], want[1], atol=1e-2, rtol=1e-3)
