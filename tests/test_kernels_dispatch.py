"""The dispatch point: reference on CPU by default (tri-plane sampling without gradients: the CPU gather),
LN3DIFF_KERNELS forces either way, and the
registered `ln3diff::` ops survive torch.export and torch.compile (Dynamo) as single graph nodes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
import kernels.composite
import kernels.flash_attention
import kernels.triplane
from kernels import dispatch
from kernels.composite_ref import composite_rays_ref
from kernels.triplane_ref import triplane_sample_ref


def _inputs():
    gen = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 5, 7, 7, generator=gen)
    points = torch.rand(2, 37, 3, generator=gen) * 2 - 1
    sigmas = torch.rand(11, 13, generator=gen)
    rgbs = torch.rand(11, 13, 3, generator=gen)
    t_vals = torch.sort(torch.rand(11, 13, generator=gen) * 4, dim=-1).values
    deltas = torch.rand(11, 13, generator=gen) * 0.3
    q = torch.randn(1, 2, 19, 32, generator=gen)
    k = torch.randn(1, 2, 23, 32, generator=gen)
    v = torch.randn(1, 2, 23, 32, generator=gen)
    return (planes, points), (sigmas, rgbs, t_vals, deltas), (q, k, v)


def _forbid_triton(monkeypatch):
    def boom(*args):
        raise AssertionError("the Triton op ran")

    monkeypatch.setattr(kernels.triplane, "triplane_sample", boom)
    monkeypatch.setattr(kernels.composite, "composite_rays", boom)
    monkeypatch.setattr(kernels.flash_attention, "flash_attention", boom)


@pytest.mark.parametrize("mode", [None, "auto", "reference", "REFERENCE"])
def test_cpu_uses_reference(monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("LN3DIFF_KERNELS", raising=False)
    else:
        monkeypatch.setenv("LN3DIFF_KERNELS", mode)
    _forbid_triton(monkeypatch)
    tri, comp, att = _inputs()
    assert not dispatch.use_triton(tri[0])
    # Without gradients, auto mode samples tri-planes with the CPU gather (tests/test_kernels_triplane_cpu.py).
    torch.testing.assert_close(kernels.triplane_sample(*tri), triplane_sample_ref(*tri), atol=1e-5, rtol=1e-5)
    for got, want in zip(kernels.composite_rays(*comp), composite_rays_ref(*comp), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(kernels.attention(*att), F.scaled_dot_product_attention(*att))


def test_forced_triton_runs_the_kernels(monkeypatch):
    monkeypatch.setenv("LN3DIFF_KERNELS", "triton")
    tri, comp, att = _inputs()
    assert dispatch.use_triton(tri[0])
    torch.testing.assert_close(kernels.triplane_sample(*tri), triplane_sample_ref(*tri), atol=1e-5, rtol=1e-5)
    for got, want in zip(kernels.composite_rays(*comp), composite_rays_ref(*comp), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.attention(*att), F.scaled_dot_product_attention(*att), atol=1e-5,
                               rtol=1e-5)
    _forbid_triton(monkeypatch)
    with pytest.raises(AssertionError, match="Triton op ran"):
        kernels.triplane_sample(*tri)


def test_auto_mode_on_a_gpu_takes_sdpa_for_attention_and_triton_for_the_rest(monkeypatch):
    """On CUDA tensors (simulated: use_triton says yes, as it does there) auto mode leaves attention to SDPA,
    which beat the Triton kernel at every shape on the H200, and runs the other two kernels."""
    monkeypatch.delenv("LN3DIFF_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    _forbid_triton(monkeypatch)
    tri, comp, att = _inputs()
    assert torch.equal(kernels.attention(*att), F.scaled_dot_product_attention(*att))
    with pytest.raises(AssertionError, match="Triton op ran"):
        kernels.triplane_sample(*tri)
    with pytest.raises(AssertionError, match="Triton op ran"):
        kernels.composite_rays(*comp)


def test_bad_mode_raises(monkeypatch):
    monkeypatch.setenv("LN3DIFF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LN3DIFF_KERNELS='cuda'.*auto"):
        kernels.triplane_sample(*_inputs()[0])


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("LN3DIFF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(*_inputs()[2])


def test_import_does_not_import_triton():
    code = "import sys, kernels\nassert 'triton' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_without_triton():
    """`import kernels` and the CPU path work where triton is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "from kernels import dispatch\n"
            "assert not dispatch.triton_available()\n"
            "x = torch.randn(1, 1, 3, 8)\n"
            "assert kernels.attention(x, x, x).shape == x.shape\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _Tiny(torch.nn.Module):
    def forward(self, planes, points, sigmas, rgbs, t_vals, deltas, q, k, v):
        feats = kernels.triplane_sample(planes, points)
        rgb, depth, opacity, weights = kernels.composite_rays(sigmas, rgbs, t_vals, deltas)
        return feats.sum() + rgb.sum() + depth.sum() + kernels.attention(q, k, v).sum()


OPS = ("ln3diff.triplane_sample.default", "ln3diff.composite_rays.default", "ln3diff.flash_attention.default")


def test_export_keeps_ops(monkeypatch):
    monkeypatch.setenv("LN3DIFF_KERNELS", "triton")
    args = tuple(x for group in _inputs() for x in group)
    graph = str(torch.export.export(_Tiny(), args).graph)
    for op in OPS:
        assert op in graph


def test_dynamo_keeps_ops_without_graph_breaks(monkeypatch):
    """torch.compile's frontend puts each op in the graph as one node (fullgraph: no breaks).

    Only Dynamo runs here: AOTAutograd/Inductor would trace into the Triton kernels, which the
    CPU interpreter cannot do; that path needs a GPU."""
    monkeypatch.setenv("LN3DIFF_KERNELS", "triton")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    args = tuple(x for group in _inputs() for x in group)
    torch._dynamo.reset()
    out = torch.compile(_Tiny(), backend=capture, fullgraph=True)(*args)
    torch.testing.assert_close(out, _Tiny()(*args))
    code = graphs[0].code
    for op in OPS:
        assert op.rsplit(".", 1)[0] in code


def test_bench_runs_on_cpu(tmp_path, capsys):
    """The benchmark prints reference timings and marks Triton n/a without CUDA (never the interpreter)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench times the compiled kernels; this checks the CPU path")
    from kernels import bench

    rows = bench.main(["--kernel", "attention", "--json", str(tmp_path / "bench.json")])
    assert rows and all(r.ref_ms > 0 and r.sdpa_ms > 0 and r.triton_ms is None for r in rows)
    assert "n/a (no CUDA)" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["kernel"] == "attention"


@pytest.mark.slow  # ~18 s: Triton's real compiler, 16 kernels
def test_kernels_compile_for_sm90():
    """The interpreter does not compile; this runs Triton's real compiler for an H100 target (no GPU
    needed) on one config per kernel, in a subprocess because the kernels here are interpreted."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok  sm_90") == 16
