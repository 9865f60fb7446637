"""Attention paths, layer scaling, bias-dropout-add and stage-independent layer init."""

import pytest
import torch

from megatron import mpu
from megatron.model import GPTModel
from megatron.model.enums import AttnMaskType
from megatron.model.transformer import (
    ParallelAttention,
    ParallelTransformer,
    _layers_on_this_stage,
    bias_dropout_add_fused_inference,
    bias_dropout_add_fused_train,
    get_bias_dropout_add,
    is_plain_causal_mask,
)
from megatron.model.utils import init_method_normal, scaled_init_method_normal

from .tiny import SEQ, causal_mask, reset_mask, tiny_config


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def _attention(layer_number=3, mask_type=AttnMaskType.causal, **overrides):
    config = tiny_config(**overrides)
    torch.manual_seed(5)  # same weights for every variant
    return ParallelAttention(
        config,
        init_method_normal(0.02),
        scaled_init_method_normal(0.02, 2),
        layer_number=layer_number,
        attn_mask_type=mask_type,
    )


def _run(attention, hidden, mask):
    x = hidden.clone().requires_grad_(True)
    out, bias = attention(x, mask)
    (out + bias).square().sum().backward()
    grads = [p.grad.clone() for p in attention.parameters()]
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("mask_kind", ["causal", "reset", "padding"])
def test_flash_path_equals_baddbmm_path(mask_kind):
    hidden = torch.randn(SEQ, 3, 64)
    if mask_kind == "causal":
        mask, mask_type = causal_mask(), AttnMaskType.causal
    elif mask_kind == "reset":
        mask, mask_type = reset_mask(3), AttnMaskType.causal
    else:
        mask, mask_type = torch.rand(3, 1, SEQ, SEQ) < 0.3, AttnMaskType.padding
        mask[..., 0] = False
    plain = _run(_attention(mask_type=mask_type), hidden, mask)
    flash = _run(_attention(mask_type=mask_type, use_flash_attn=True), hidden, mask)
    torch.testing.assert_close(flash[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flash[1], plain[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(flash[2], plain[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_mask_is_not_treated_as_causal():
    assert is_plain_causal_mask(None)
    assert is_plain_causal_mask(causal_mask())
    assert is_plain_causal_mask(causal_mask().repeat(2, 1, 1, 1))
    assert not is_plain_causal_mask(reset_mask(2))
    # and the reset mask changes the result (it is really applied)
    hidden = torch.randn(SEQ, 2, 64)
    attention = _attention(use_flash_attn=True)
    a = attention(hidden, causal_mask())[0]
    b = attention(hidden, reset_mask(2))[0]
    assert torch.allclose(a[: SEQ // 2], b[: SEQ // 2], atol=1e-6)
    assert not torch.allclose(a[SEQ // 2 :], b[SEQ // 2 :], atol=1e-4)


def test_query_key_layer_scaling_is_exact_in_fp32():
    hidden = torch.randn(SEQ, 2, 64)
    scaled = _run(
        _attention(layer_number=7, apply_query_key_layer_scaling=True), hidden, causal_mask()
    )
    plain = _run(
        _attention(layer_number=7, apply_query_key_layer_scaling=False), hidden, causal_mask()
    )
    torch.testing.assert_close(scaled[0], plain[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scaled[1], plain[1], atol=1e-6, rtol=1e-5)


def test_qkv_layout_is_interleaved_per_head():
    """query_key_value rows are [head0 q, head0 k, head0 v, head1 q, ...] (hn each)."""
    attention = _attention(use_flash_attn=True)
    hidden = torch.randn(SEQ, 1, 64)
    weight = attention.query_key_value.weight.detach()
    bias = attention.query_key_value.bias.detach()
    np_, hn = 4, 16
    per_head = weight.view(np_, 3, hn, 64)
    per_head_bias = bias.view(np_, 3, hn)
    q = torch.einsum("sbh,nkh->sbnk", hidden, per_head[:, 0]) + per_head_bias[:, 0]
    k = torch.einsum("sbh,nkh->sbnk", hidden, per_head[:, 1]) + per_head_bias[:, 1]
    v = torch.einsum("sbh,nkh->sbnk", hidden, per_head[:, 2]) + per_head_bias[:, 2]
    scores = torch.einsum("qbnk,sbnk->bnqs", q, k) / hn**0.5
    scores = scores.masked_fill(causal_mask(), float("-inf"))
    context = torch.einsum("bnqs,sbnk->qbnk", scores.softmax(-1), v).reshape(SEQ, 1, 64)
    expect = context @ attention.dense.weight.detach().t()
    out, _ = attention(hidden, causal_mask())
    torch.testing.assert_close(out.detach(), expect, atol=1e-5, rtol=1e-5)


def test_bias_dropout_add_variants():
    x, bias, residual = torch.randn(8, 2, 16), torch.randn(16), torch.randn(8, 2, 16)
    expect = residual + x + bias
    torch.testing.assert_close(bias_dropout_add_fused_inference(x, bias, residual, 0.5), expect)
    torch.testing.assert_close(get_bias_dropout_add(False)(x, bias, residual, 0.5), expect)
    torch.manual_seed(3)
    fused = bias_dropout_add_fused_train(x, bias, residual, 0.5)
    torch.manual_seed(3)
    plain = get_bias_dropout_add(True)(x, bias, residual, 0.5)
    torch.testing.assert_close(fused, plain)
    dropped = (fused - residual) == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    kept = ~dropped
    torch.testing.assert_close((fused - residual)[kept], 2 * (x + bias)[kept])


def _stage_transformer(config, pp_size, pp_rank, vpp=None):
    mpu.set_pipeline_model_parallel_world_size(pp_size)
    mpu.set_pipeline_model_parallel_rank(pp_rank)
    try:
        if vpp is not None:
            mpu.initialize.set_virtual_pipeline_model_parallel_world_size(vpp[0])
            mpu.initialize.set_virtual_pipeline_model_parallel_rank(vpp[1])
        torch.manual_seed(pp_rank * 101 + 7)  # the default generator differs per stage
        return ParallelTransformer(
            config,
            init_method_normal(0.02),
            scaled_init_method_normal(0.02, config.num_layers),
            self_attn_mask_type=AttnMaskType.causal,
            pre_process=pp_rank == 0,
            post_process=pp_rank == pp_size - 1,
        )
    finally:
        mpu.initialize.set_virtual_pipeline_model_parallel_world_size(None)
        mpu.initialize.set_virtual_pipeline_model_parallel_rank(None)
        mpu.clear_model_parallel_overrides()


def test_layer_init_does_not_depend_on_pipeline_stage():
    config = tiny_config(num_layers=4)
    full = _stage_transformer(config, 1, 0)
    last = _stage_transformer(config, 2, 1)  # global layers 3 and 4
    assert len(last.layers) == 2 and [layer.layer_number for layer in last.layers] == [3, 4]
    full_state = full.state_dict()
    for name, value in last.state_dict().items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            assert torch.equal(value, full_state[f"layers.{int(index) + 2}.{rest}"]), name
    # virtual chunks: stage 1, chunk 1 of 2 holds the last quarter of 8 layers
    interleaved = _stage_transformer(tiny_config(num_layers=8), 2, 1, vpp=(2, 1))
    assert [layer.layer_number for layer in interleaved.layers] == [7, 8]
    full8 = _stage_transformer(tiny_config(num_layers=8), 1, 0).state_dict()
    for name, value in interleaved.state_dict().items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            assert torch.equal(value, full8[f"layers.{int(index) + 6}.{rest}"]), name


def test_embedding_init_is_seeded_on_its_own():
    a = GPTModel(tiny_config(num_layers=2))
    b = GPTModel(tiny_config(num_layers=4))  # more layers built before nothing changes
    torch.manual_seed(999)
    c = GPTModel(tiny_config(num_layers=2))
    emb = "language_model.embedding.word_embeddings.weight"
    assert torch.equal(a.state_dict()[emb], b.state_dict()[emb])
    assert torch.equal(a.state_dict()[emb], c.state_dict()[emb])
    d = GPTModel(tiny_config(seed=4321))
    assert not torch.equal(a.state_dict()[emb], d.state_dict()[emb])


@pytest.mark.parametrize(
    "pp, rank, vpp, expect",
    [
        (1, 0, None, (8, 0)),
        (2, 1, None, (4, 4)),
        (4, 3, None, (2, 6)),
        (2, 0, (2, 1), (2, 4)),
        (2, 1, (2, 0), (2, 2)),
        (2, 1, (4, 3), (1, 7)),
    ],
)
def test_layers_on_this_stage(pp, rank, vpp, expect):
    mpu.set_pipeline_model_parallel_world_size(pp)
    mpu.set_pipeline_model_parallel_rank(rank)
    try:
        if vpp is not None:
            mpu.initialize.set_virtual_pipeline_model_parallel_world_size(vpp[0])
            mpu.initialize.set_virtual_pipeline_model_parallel_rank(vpp[1])
        assert _layers_on_this_stage(tiny_config(num_layers=8)) == expect
    finally:
        mpu.initialize.set_virtual_pipeline_model_parallel_world_size(None)
        mpu.initialize.set_virtual_pipeline_model_parallel_rank(None)
        mpu.clear_model_parallel_overrides()


def test_num_layers_must_divide_by_pipeline_size():
    mpu.set_pipeline_model_parallel_world_size(3)
    try:
        with pytest.raises(ValueError, match="--num-layers"):
            _layers_on_this_stage(tiny_config(num_layers=4))
    finally:
        mpu.clear_model_parallel_overrides()
