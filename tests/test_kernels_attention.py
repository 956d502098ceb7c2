"""Triton flash attention vs `attention_ref` (TRITON_INTERPRET=1): forward, lse and backward."""

import math
import os

import pytest
import torch

from kernels.attention_ref import attention_ref
from kernels.flash_attention import flash_attention

# Interpreter tiles are 16 x 16: Nq = 19 and Nk = 23 leave masked tails in both directions.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def bf16_dot_in_interpreter(monkeypatch):
    """Make the interpreter's tl.dot read bf16 operands as numbers, not bits.

    The Triton 3.9 interpreter stores bf16 as uint16 and its `create_dot` converts only 8-bit
    floats before `np.matmul`, so a bf16 dot multiplies raw bit patterns (errors ~1e10;
    triton-lang/triton#11584, "not supported yet" upstream). bf16 -> fp32 is exact (the bits
    shifted up by 16), which is what the GPU's tensor cores compute from, so this changes only
    the simulator, not the kernel under test. A compiled GPU run needs no patch.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)


def _qkv(b, h, nq, nk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # q laid out [B, Nq, H, D] and transposed, as the model's heads are: strided, not contiguous.
    q = torch.randn(b, nq, h, d, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(b, h, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, nk, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("nq, nk", [(19, 23), (37, 5)])
def test_forward_matches_reference(nq, nk, d, dtype):
    q, k, v = _qkv(1, 2, nq, nk, d, dtype)
    o, lse = flash_attention(q, k, v)
    ref = attention_ref(q.float(), k.float(), v.float())
    assert o.dtype == dtype and o.shape == (1, 2, nq, d)
    torch.testing.assert_close(o.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(d)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-4, rtol=1e-5)


def test_forward_odd_head_dim_and_large_scores():
    """D = 24 pads the tile to 32; scores of magnitude ~100 exercise the running max."""
    q, k, v = _qkv(2, 1, 19, 23, 24, torch.float32)
    q = q * 20
    torch.testing.assert_close(flash_attention(q, k, v)[0], attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_grads_match_reference_autograd(d, dtype):
    q, k, v = _qkv(1, 2, 19, 23, d, dtype)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(1, 2, 19, d, generator=gen)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    got = torch.autograd.grad(flash_attention(*leaves)[0], leaves, grad.to(dtype))
    ref_leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    want = torch.autograd.grad(attention_ref(*ref_leaves), ref_leaves, grad.to(dtype).float())
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=tol, rtol=tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_grad_through_lse():
    """lse is an output too: its grad enters as d lse / d s = softmax."""
    q, k, v = _qkv(1, 2, 19, 23, 32, torch.float32)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o, lse = flash_attention(*leaves)
    got = torch.autograd.grad(o.sum() + (lse * torch.arange(19.0)).sum(), leaves)
    ref_leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    scores = torch.einsum("bhqd,bhkd->bhqk", ref_leaves[0], ref_leaves[1]) / math.sqrt(32)
    ref = attention_ref(*ref_leaves).sum() + (scores.logsumexp(-1) * torch.arange(19.0)).sum()
    want = torch.autograd.grad(ref, ref_leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_bad_inputs_raise():
    q, k, v = _qkv(1, 2, 19, 23, 32, torch.float32)
    with pytest.raises(ValueError, match="k:"):
        flash_attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="tokens"):
        flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="dtypes"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="no tokens"):
        flash_attention(q, k[:, :, :0], v[:, :, :0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("nq, nk, d", [(768, 768, 64), (768, 77, 64), (4096, 4096, 128), (1000, 333, 32)])
def test_model_shapes_on_gpu(nq, nk, d, dtype):
    q, k, v = (x.cuda().requires_grad_(True) for x in _qkv(2, 4, nq, nk, d, dtype))
    o = flash_attention(q, k, v)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    # fp32 inputs: Triton's tl.dot multiplies them as TF32 on sm80+ (10-bit mantissa), about fp16's precision.
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 3e-3}[dtype]
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.float())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=5 * tol, rtol=5 * tol)
