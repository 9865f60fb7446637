"""The CUDA fast paths of the LLaMA-family ops (torch.compile of RMSNorm, rotary and
SwiGLU) against their plain torch references, fp16 and bf16, forward and backward."""

import pytest
import torch

from megatron.model.rmsnorm import rms_norm, rms_norm_reference
from megatron.model.rotary_pos_embedding import (
    RotaryEmbedding,
    _apply_rotary_pos_emb,
    apply_rotary_pos_emb,
)
from megatron.model.transformer import _swiglu, swiglu

DTYPES = [torch.float16, torch.bfloat16]


def _tolerance(dtype):
    return dict(atol=2e-3, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-2, rtol=4e-2)


def _forward_backward(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out.detach(), [t.grad for t in leaves]


def _max_error(a, truth):
    return (a.float() - truth).abs().max().item()


def _compare(fast, reference, inputs, dtype):
    """The fast path against the half-precision reference and, where they differ, both
    against the reference in fp32: the fast path (which keeps fp32 inside the fused
    kernel, e.g. when summing a weight gradient over many rows) must be no less accurate."""
    out, grads = _forward_backward(fast, *inputs)
    ref_out, ref_grads = _forward_backward(reference, *inputs)
    truth_out, truth_grads = _forward_backward(reference, *[t.float() for t in inputs])
    for got, ref, truth in zip([out, *grads], [ref_out, *ref_grads],
                               [truth_out, *truth_grads]):
        if torch.allclose(got, ref, **_tolerance(dtype)):
            continue
        fast_error, ref_error = _max_error(got, truth), _max_error(ref, truth)
        assert fast_error <= 1.5 * ref_error + 1e-3, (fast_error, ref_error)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 4, 1024), (2048, 2, 2048), (7, 3, 4096)])
def test_rmsnorm_fast_path(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    _compare(lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: rms_norm_reference(a, b, 1e-5),
             (x, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rotary_fast_path(dtype, percent):
    torch.manual_seed(0)
    s, b, n, hn = 256, 2, 8, 128
    t = torch.randn(s, b, n, hn, device="cuda", dtype=dtype)
    cos, sin = RotaryEmbedding(int(hn * percent))(s, offset=5, device=t.device, dtype=dtype)
    _compare(lambda x: apply_rotary_pos_emb(x, cos, sin),
             lambda x: _apply_rotary_pos_emb(x, cos, sin), (t,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_fast_path(dtype):
    torch.manual_seed(0)
    x = torch.randn(512, 4, 2 * 2816, device="cuda", dtype=dtype)
    _compare(swiglu, _swiglu, (x,), dtype)
