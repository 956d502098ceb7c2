"""The CPU tri-plane sampling path (`kernels/triplane_cpu.py`) vs `triplane_sample_ref`, and when dispatch takes it."""

import pytest
import torch

import kernels
from kernels import dispatch
from kernels.triplane_cpu import triplane_sample_cpu
from kernels.triplane_ref import triplane_sample_ref

SHAPES = [(2, 5, 7, 37), (1, 32, 9, 19), (1, 3, 1, 5), (3, 32, 32, 1001)]  # B, C, R, N: odd sizes, R = 1


def _inputs(b, c, r, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(b, 3, c, r, r, generator=gen)
    points = torch.rand(b, n, 3, generator=gen) * 2.4 - 1.2  # ~10% outside [-1, 1]: zero padding
    return planes, points


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape):
    planes, points = _inputs(*shape)
    out = triplane_sample_cpu(planes, points)
    assert out.shape == (shape[0], shape[3], shape[1]) and out.dtype == torch.float32
    torch.testing.assert_close(out, triplane_sample_ref(planes, points), atol=1e-5, rtol=1e-5)


def test_edges_centres_and_far_points():
    """Points exactly at -1, 1 (outer pixel edges), 0, pixel centres, just past the border and far outside."""
    planes, _ = _inputs(2, 4, 5, 1)
    centres = (torch.arange(5) + 0.5) / 5 * 2 - 1
    values = torch.cat([torch.tensor([-1.0, 1.0, 0.0, -1.1, 1.1, -1.7, 3.0, -1e6, 1e6]), centres])
    points = torch.cartesian_prod(values, values, values[:5]).reshape(2, -1, 3)
    torch.testing.assert_close(triplane_sample_cpu(planes, points), triplane_sample_ref(planes, points),
                               atol=1e-5, rtol=1e-5)


def test_strided_inputs():
    planes, points = _inputs(2, 6, 8, 23)
    planes_t = planes.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    points_t = points.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(triplane_sample_cpu(planes_t, points_t), triplane_sample_ref(planes, points),
                               atol=1e-5, rtol=1e-5)


def test_dispatch_takes_it_only_without_gradients_in_auto_mode(monkeypatch):
    planes, points = _inputs(2, 5, 7, 37)
    calls = []
    monkeypatch.setattr(dispatch, "triplane_sample_cpu", lambda *a: calls.append(1) or triplane_sample_cpu(*a))
    monkeypatch.delenv("LN3DIFF_KERNELS", raising=False)
    with torch.no_grad():
        torch.testing.assert_close(kernels.triplane_sample(planes, points), triplane_sample_ref(planes, points),
                                   atol=1e-5, rtol=1e-5)
    assert calls == [1]
    trained = planes.clone().requires_grad_()  # training: the reference and its gradients
    out = kernels.triplane_sample(trained, points)
    assert torch.equal(out, triplane_sample_ref(planes, points)) and out.requires_grad and calls == [1]
    monkeypatch.setenv("LN3DIFF_KERNELS", "reference")
    with torch.no_grad():
        assert torch.equal(kernels.triplane_sample(planes, points), triplane_sample_ref(planes, points))
    assert calls == [1]


def test_exported_graphs_keep_the_reference(monkeypatch):
    """torch.export (AOTInductor, the dynamo ONNX exporter) traces the reference: grid_sample, not embedding_bag."""
    monkeypatch.delenv("LN3DIFF_KERNELS", raising=False)

    class Sample(torch.nn.Module):
        def forward(self, planes, points):
            return kernels.triplane_sample(planes, points)

    with torch.no_grad():
        program = torch.export.export(Sample(), _inputs(1, 4, 5, 9))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("grid_sampler" in op for op in ops) and not any("embedding_bag" in op for op in ops), ops
