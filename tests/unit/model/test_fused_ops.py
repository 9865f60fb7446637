"""The fused ops' torch paths against plain references (the CUDA kernels: tests/gpu)."""

import pytest
import torch

from megatron import fused_kernels
from megatron.model.enums import AttnMaskType
from megatron.model.fused_bias_gelu import bias_gelu_impl, bias_gelu_reference
from megatron.model.fused_layer_norm import MixedFusedLayerNorm
from megatron.model.fused_softmax import FusedScaleMaskSoftmax
from megatron.model.utils import attention_mask_func, erf_gelu, openai_gelu


def _softmax(dtype, mask_type=AttnMaskType.padding, scale=None, fusion=True):
    return FusedScaleMaskSoftmax(
        input_in_fp16=dtype == torch.float16,
        input_in_bf16=dtype == torch.bfloat16,
        attn_mask_type=mask_type,
        scaled_masked_softmax_fusion=fusion,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=scale,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_type", [AttnMaskType.padding, AttnMaskType.causal])
@pytest.mark.parametrize("scale", [None, 0.25])
def test_softmax_torch_path_matches_reference(dtype, mask_type, scale):
    torch.manual_seed(0)
    scores = torch.randn(2, 4, 32, 32) * 3
    if mask_type == AttnMaskType.causal:
        mask = torch.ones(32, 32, dtype=torch.bool).triu(1)[None, None]
    else:
        mask = torch.rand(2, 1, 32, 32) < 0.4
    x = scores.to(dtype).requires_grad_(True)
    probs = _softmax(dtype, mask_type, scale)(x.clone(), mask)  # masks in place, as Megatron
    assert probs.dtype == dtype
    reference_in = scores.to(dtype).float() * (scale or 1.0)
    reference = torch.softmax(reference_in.masked_fill(mask, -10000.0), dim=-1)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=2e-2)
    torch.testing.assert_close(probs.float(), reference, **tol)
    # masked keys get (numerically) zero probability, and no gradient
    assert probs.float()[mask.expand_as(probs)].abs().max() < 1e-6
    probs.float().sum(-1).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_softmax_fully_masked_row_is_uniform():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 3, :] = True
    probs = _softmax(torch.float32)(torch.randn(1, 4, 32, 32), mask)
    torch.testing.assert_close(probs[:, :, 3], torch.full((1, 4, 32), 1 / 32))


def test_fused_kernels_are_not_chosen_without_cuda():
    assert not fused_kernels.load(rank=0)
    assert not fused_kernels.is_loaded()
    module = _softmax(torch.bfloat16, AttnMaskType.causal)
    assert not module.is_kernel_available(None, 2, 4, 32, 32)
    with pytest.raises(RuntimeError, match="not loaded"):
        fused_kernels.get_module("scaled_masked_softmax_cuda")


def test_softmax_scale_needs_fp32():
    with pytest.raises(ValueError, match="softmax_in_fp32"):
        FusedScaleMaskSoftmax(
            True, False, AttnMaskType.causal, True, attention_mask_func, False, 2.0
        )


def test_bias_gelu_matches_reference_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    out = bias_gelu_impl(x, bias)
    torch.testing.assert_close(out, bias_gelu_reference(x, bias), atol=1e-7, rtol=1e-6)
    grad = torch.randn_like(out)
    dx, db = torch.autograd.grad(out, (x, bias), grad)
    rx, rb = torch.autograd.grad(bias_gelu_reference(x, bias), (x, bias), grad)
    torch.testing.assert_close(dx, rx, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(db, rb, atol=1e-6, rtol=1e-6)
    assert torch.autograd.gradcheck(bias_gelu_impl, (x[:2, :1, :5], bias[:5]))


def test_gelu_variants():
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(openai_gelu(x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(erf_gelu(x), torch.nn.functional.gelu(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_matches_torch_and_mixes_precision():
    torch.manual_seed(0)
    norm = MixedFusedLayerNorm(24, eps=1e-5, sequence_parallel=True)
    assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]
    assert norm.weight.sequence_parallel and norm.bias.sequence_parallel
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 2, 24)
    expect = torch.nn.functional.layer_norm(x, (24,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), expect)
    # fp32 residual stream with bf16 weights: fp32 statistics, bf16 output
    norm_bf16 = norm.to(torch.bfloat16)
    out = norm_bf16(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expect, atol=3e-2, rtol=2e-2)
