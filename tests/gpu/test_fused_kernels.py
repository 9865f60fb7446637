"""Fused CUDA ops against their torch references, fp16 and bf16, forward and backward."""

import pytest
import torch

from megatron.model.enums import AttnMaskType
from megatron.model.fused_bias_gelu import bias_gelu_impl, bias_gelu_reference
from megatron.model.fused_softmax import FusedScaleMaskSoftmax
from megatron.model.utils import attention_mask_func

DTYPES = [torch.float16, torch.bfloat16]
# (b, np, sq, sk): several warp-iteration widths, sk not a multiple of 32, the 4096 limit
SHAPES = [(2, 4, 32, 32), (1, 8, 64, 100), (2, 2, 128, 128), (1, 4, 256, 1000), (1, 4, 8, 4096)]


def _tolerance(dtype):
    return dict(atol=2e-3, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-2, rtol=4e-2)


def _softmax_module(dtype, mask_type, fusion, scale):
    return FusedScaleMaskSoftmax(
        input_in_fp16=dtype == torch.float16,
        input_in_bf16=dtype == torch.bfloat16,
        attn_mask_type=mask_type,
        scaled_masked_softmax_fusion=fusion,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=scale,
    )


def _reference(scores, mask, scale):
    """softmax(mask(scale * x)) in fp32, masked positions -10000 (Megatron's convention)."""
    x = scores.float() * scale
    x = x.masked_fill(mask, -10000.0)
    return torch.softmax(x, dim=-1)


def _run(module, scores, mask, grad):
    x = scores.clone().requires_grad_(True)
    probs = module(x, mask)
    probs.backward(grad)
    return probs, x.grad


def _compare(dtype, mask_type, shape, mask):
    torch.manual_seed(0)
    b, np_, sq, sk = shape
    scale = 0.5
    scores = (torch.randn(shape, device="cuda") * 4).to(dtype)
    grad = torch.randn(shape, device="cuda").to(dtype)
    fused = _softmax_module(dtype, mask_type, True, scale)
    assert fused.is_kernel_available(mask, b, np_, sq, sk), "fused kernel was not chosen"
    probs, dx = _run(fused, scores, mask, grad)
    assert probs.dtype == dtype and dx.dtype == dtype

    full_mask = mask if mask is not None else torch.ones(sq, sk, device="cuda").triu(1).bool()
    x = scores.float().requires_grad_(True)
    ref = _reference(x, full_mask, scale)
    ref.backward(grad.float())
    torch.testing.assert_close(probs.float(), ref, **_tolerance(dtype))
    torch.testing.assert_close(dx.float(), x.grad, **_tolerance(dtype))
    # and the module's own torch path agrees with the same reference
    torch_path = _softmax_module(dtype, mask_type, False, scale)
    probs_t, _ = _run(torch_path, scores, full_mask, grad)
    torch.testing.assert_close(probs.float(), probs_t.float(), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] == s[3]] + [(4, 4, 2048, 2048)])
def test_upper_triang_softmax(fused_kernels_loaded, dtype, shape):
    _compare(dtype, AttnMaskType.causal, shape, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_batch", ["one", "per-sample"])
def test_masked_softmax(fused_kernels_loaded, dtype, shape, mask_batch):
    torch.manual_seed(1)
    b, _, sq, sk = shape
    mb = 1 if mask_batch == "one" else b
    mask = torch.rand(mb, 1, sq, sk, device="cuda") < 0.3
    mask[..., 0] = False  # no fully masked rows except the one set below
    if sq > 1:
        mask[0, 0, 1, :] = True  # a fully masked row: uniform probs, zero input grad
    _compare(dtype, AttnMaskType.padding, shape, mask)


def test_fused_softmax_rejects_unsupported_shapes(fused_kernels_loaded):
    module = _softmax_module(torch.float16, AttnMaskType.causal, True, None)
    assert not module.is_kernel_available(None, 2, 4, 32, 64)  # causal needs sq == sk
    assert not module.is_kernel_available(None, 2, 4, 16, 16)  # sk <= 16
    assert not module.is_kernel_available(None, 1, 3, 32, 32)  # b * np % 4 != 0
    assert not module.is_kernel_available(None, 1, 4, 8192, 8192)  # sk > 4096
    assert module.is_kernel_available(None, 1, 4, 32, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 2, 256), (128, 4, 1024), (3, 5, 4096)])
def test_bias_gelu(dtype, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[-1], device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device="cuda", dtype=dtype)
    out = bias_gelu_impl(x, bias)
    out.backward(grad)
    xr = x.detach().float().requires_grad_(True)
    br = bias.detach().float().requires_grad_(True)
    ref = bias_gelu_reference(xr, br)
    ref.backward(grad.float())
    tol = _tolerance(dtype)
    torch.testing.assert_close(out.float(), ref, **tol)
    # the half-precision backward evaluates the closed form in the input dtype
    torch.testing.assert_close(x.grad.float(), xr.grad, atol=4 * tol["atol"], rtol=tol["rtol"])
    # the bias gradient sums over n tokens: rounding errors grow like sqrt(n)
    tokens = shape[0] * shape[1]
    atol = 4 * tol["atol"] * tokens**0.5
    torch.testing.assert_close(bias.grad.float(), br.grad, atol=atol, rtol=tol["rtol"])


def _tiny_gpt_loss(use_flash_attn: bool, fusion: bool, dtype):
    from megatron import mpu
    from megatron.model import Float16Module, GPTModel
    from megatron.model.config import TransformerConfig

    mpu.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        padded_vocab_size=256,
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_flash_attn=use_flash_attn,
        masked_softmax_fusion=fusion,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
    )
    model = Float16Module(GPTModel(config).cuda(), dtype)
    torch.manual_seed(3)
    b, s = 4, 128
    tokens = torch.randint(0, 256, (b, s + 1), device="cuda")
    position_ids = torch.arange(s, device="cuda").expand(b, s)
    mask = torch.ones(s, s, device="cuda").triu(1).bool()[None, None]
    loss = model(tokens[:, :-1], position_ids, mask, labels=tokens[:, 1:])
    loss.mean().backward()
    grad = model.module.language_model.embedding.word_embeddings.weight.grad.float()
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_fused_softmax_and_flash_agree_with_torch_path(fused_kernels_loaded, dtype):
    """The tiny GPT on the GPU: fused-kernel, flash and plain torch softmax paths agree."""
    loss_torch, grad_torch = _tiny_gpt_loss(False, False, dtype)
    loss_fused, grad_fused = _tiny_gpt_loss(False, True, dtype)
    loss_flash, grad_flash = _tiny_gpt_loss(True, False, dtype)
    assert loss_torch.dtype == torch.float32 and torch.isfinite(loss_torch).all()
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_fused, loss_torch, **tol)
    torch.testing.assert_close(loss_flash, loss_torch, **tol)
    scale = grad_torch.abs().max()
    torch.testing.assert_close(grad_fused / scale, grad_torch / scale, atol=2e-2, rtol=0)
    torch.testing.assert_close(grad_flash / scale, grad_torch / scale, atol=2e-2, rtol=0)
