"""Triton ray compositing vs `composite_rays_ref` (TRITON_INTERPRET=1), and the occupancy grid."""

import os

import pytest
import torch

from kernels.composite import T_MIN, composite_rays
from kernels.composite_ref import composite_rays_ref
from kernels.occupancy import build_occupancy_grid, cell_centres, occupied_box, occupied_samples

# Interpreter tiles are 4 rays x 8 samples: N = 11 and S = 13 leave tails in both directions.
N, S = 11, 13


def _inputs(n=N, s=S, sigma_scale=0.5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.rand(n, s, generator=gen) * sigma_scale
    rgbs = torch.rand(n, s, 3, generator=gen)
    t_vals = torch.sort(torch.rand(n, s, generator=gen) * 4.0, dim=-1).values
    deltas = torch.rand(n, s, generator=gen) * 0.3
    return tuple(x.to(dtype) for x in (sigmas, rgbs, t_vals, deltas))


def _grads(fn, inputs, out_grads):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*inputs)
    loss = sum((o * g).sum() for o, g in zip(outs, out_grads, strict=True))
    return torch.autograd.grad(loss, inputs)


def _out_grads(seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 3, generator=gen), torch.randn(N, generator=gen), torch.randn(N, generator=gen),
            torch.randn(N, S, generator=gen)]


def test_forward_without_termination_matches_reference():
    """Thin media (T stays above T_MIN): identical maths, fp32 rounding only."""
    inputs = _inputs()
    out = composite_rays(*inputs)
    ref = composite_rays_ref(*inputs)
    assert ref[2].min() < 1 - T_MIN, "inputs should leave transmittance above the cut"
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_forward_with_early_termination_within_bound():
    """Dense media: weights past T < T_MIN are 0; their total is < T_MIN, which bounds every output."""
    inputs = _inputs(sigma_scale=60.0)
    rgb, depth, opacity, weights = composite_rays(*inputs)
    ref_rgb, ref_depth, ref_opacity, ref_weights = composite_rays_ref(*inputs)
    dropped = (weights == 0) & (ref_weights > 0)
    assert dropped.any(), "inputs should terminate some rays early"
    assert ref_weights[dropped].max() < T_MIN
    t_max = inputs[2].abs().max().item()
    torch.testing.assert_close(opacity, ref_opacity, atol=T_MIN, rtol=0)
    torch.testing.assert_close(rgb, ref_rgb, atol=T_MIN, rtol=0)  # rgb in [0, 1]
    torch.testing.assert_close(depth, ref_depth, atol=T_MIN * t_max, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=T_MIN, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_forward_low_precision(dtype, tol):
    inputs = _inputs(dtype=dtype)
    out = composite_rays(*inputs)
    ref = composite_rays_ref(*(x.float() for x in inputs))
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol * 4, rtol=tol)  # depth reaches t ~ 4


def test_grads_without_termination_match_reference_autograd():
    inputs = _inputs()
    got = _grads(composite_rays, inputs, _out_grads())
    want = _grads(composite_rays_ref, inputs, _out_grads())
    for name, g, w in zip(("sigmas", "rgbs", "t_vals", "deltas"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_grads_with_early_termination_within_bound():
    """The truncated sum's grads differ from the reference's by O(T_MIN) x |upstream grads|, times
    delta (for sigmas) or sigma (for deltas)."""
    inputs = _inputs(sigma_scale=60.0)
    out_grads = _out_grads()
    got = _grads(composite_rays, inputs, out_grads)
    want = _grads(composite_rays_ref, inputs, out_grads)
    # |dL/dw| <= |g_rgb|_1 + |g_depth| t_max + |g_opacity| + |g_w|, and two suffix terms each < T_MIN.
    g_max = (out_grads[0].abs().sum(-1).max() + out_grads[1].abs().max() * 4 + out_grads[2].abs().max()
             + out_grads[3].abs().max()).item()
    bound = 2 * T_MIN * g_max
    torch.testing.assert_close(got[0], want[0], atol=bound * inputs[3].max().item(), rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=bound, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=bound, rtol=0)
    torch.testing.assert_close(got[3], want[3], atol=bound * inputs[0].max().item(), rtol=0)


def test_only_sigma_grad_and_unused_outputs():
    """Grad of rgb alone w.r.t. sigmas (the other outputs' grads arrive as zeros)."""
    sigmas, rgbs, t_vals, deltas = _inputs()
    sigmas.requires_grad_(True)
    got, = torch.autograd.grad(composite_rays(sigmas, rgbs, t_vals, deltas)[0].sum(), sigmas)
    want, = torch.autograd.grad(composite_rays_ref(sigmas, rgbs, t_vals, deltas)[0].sum(), sigmas)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bad_shapes_raise():
    sigmas, rgbs, t_vals, deltas = _inputs()
    with pytest.raises(ValueError, match="rgbs"):
        composite_rays(sigmas, rgbs[..., :2], t_vals, deltas)
    with pytest.raises(ValueError, match="deltas"):
        composite_rays(sigmas, rgbs, t_vals, deltas[:, :-1])


def _cube_density(points):
    """Density 5 inside the cube |x|, |y|, |z| < 0.5 and 0 outside: its faces fall on cell faces for G = 8."""
    return 5.0 * (points.abs() < 0.5).all(dim=-1).float()


def test_occupancy_grid_from_cell_centres():
    grid = build_occupancy_grid(_cube_density, resolution=8, threshold=0.1, chunk=100)  # chunked evaluation
    assert grid.shape == (8, 8, 8) and grid.dtype == torch.bool
    expected = torch.zeros(8, 8, 8, dtype=torch.bool)
    expected[2:6, 2:6, 2:6] = True
    assert torch.equal(grid, expected)
    assert torch.allclose(cell_centres(8)[0, 3, 7], torch.tensor([-0.875, -0.125, 0.875]))


def test_occupied_box_bounds_the_occupied_cells():
    grid = torch.zeros(8, 8, 8, dtype=torch.bool)
    assert occupied_box(grid) is None
    grid[1, 4, 6] = grid[3, 2, 6] = True
    box_min, box_max = occupied_box(grid, bound=2.0)
    assert torch.allclose(box_min, torch.tensor([-1.5, -1.0, 1.0]))  # cells are 0.5 wide from -2
    assert torch.allclose(box_max, torch.tensor([0.0, 0.5, 1.5]))


def test_occupancy_grid_axis_order():
    """Index [ix, iy, iz]: a density that depends on x alone fills slabs along the first axis."""
    grid = build_occupancy_grid(lambda p: (p[:, 0] > 0).float(), resolution=4, threshold=0.5)
    assert grid[2:].all() and not grid[:2].any()


def test_masked_compositing_matches_unmasked_when_empty_cells_are_empty():
    """Skipping samples in empty cells changes nothing when the field is zero there."""
    grid = build_occupancy_grid(_cube_density, resolution=8, threshold=0.1)
    gen = torch.Generator().manual_seed(3)
    n, s = 9, 17
    origins = torch.randn(n, 3, generator=gen)
    origins = 3.0 * origins / origins.norm(dim=-1, keepdim=True)
    dirs = -origins / origins.norm(dim=-1, keepdim=True) + 0.2 * torch.randn(n, 3, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    t_vals = torch.linspace(1.0, 5.0, s).expand(n, s) + 0.01 * torch.rand(n, s, generator=gen)
    mask = occupied_samples(grid, origins, dirs, t_vals)
    points = origins[:, None] + dirs[:, None] * t_vals[..., None]
    sigmas = _cube_density(points)
    assert mask.any() and not mask.all()
    assert torch.equal(mask, sigmas > 0)
    deltas = torch.full((n, s), 4.0 / s)
    rgbs = torch.rand(n, s, 3, generator=gen)
    masked = composite_rays(sigmas * mask, rgbs, t_vals, deltas)
    for got, want in zip(masked, composite_rays_ref(sigmas, rgbs, t_vals, deltas), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_occupied_samples_box_faces_and_outside():
    grid = torch.ones(4, 4, 4, dtype=torch.bool)
    origins = torch.tensor([[-1.0, 0.0, 0.0]])
    dirs = torch.tensor([[1.0, 0.0, 0.0]])
    t_vals = torch.tensor([[-0.5, 0.0, 1.0, 2.0, 2.5]])  # outside, on -x face, centre, on +x face, outside
    assert occupied_samples(grid, origins, dirs, t_vals).tolist() == [[False, True, True, True, False]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)")
def test_paper_shape_on_gpu():
    inputs = [x.cuda() for x in _inputs(n=4096, s=128, sigma_scale=20.0)]
    got = composite_rays(*inputs)
    want = composite_rays_ref(*inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=T_MIN * 4 + 1e-5, rtol=0)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):  # test_forward_low_precision's bounds
        low = composite_rays(*(x.to(dtype) for x in inputs))
        for g, w in zip(low, want, strict=True):
            assert g.dtype == dtype
            torch.testing.assert_close(g.float(), w, atol=tol * 4, rtol=tol)
