"""Tiny GPT on CPU: shapes, loss, checkpoint keys and layouts, recompute, curriculum."""

import argparse
import math

import pytest
import torch

from megatron import mpu
from megatron.model import Float16Module, GPTModel
from megatron.model.config import config_from_args

from .tiny import SEQ, VOCAB, batch, causal_mask, tiny_config

MEGATRON_LAYER_KEYS = [
    "input_layernorm.bias",
    "input_layernorm.weight",
    "mlp.dense_4h_to_h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_h_to_4h.weight",
    "post_attention_layernorm.bias",
    "post_attention_layernorm.weight",
    "self_attention.dense.bias",
    "self_attention.dense.weight",
    "self_attention.query_key_value.bias",
    "self_attention.query_key_value.weight",
]


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_forward_backward_shapes_and_loss():
    model = GPTModel(tiny_config())
    tokens, labels, position_ids = batch(b=3)
    loss = model(tokens, position_ids, causal_mask(), labels=labels)
    assert loss.shape == (3, SEQ) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    # a fresh model is close to uniform over the vocabulary
    assert abs(loss.mean().item() - math.log(VOCAB)) < 0.5
    loss.mean().backward()
    grads = _grads(model)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    logits = model(tokens, position_ids, causal_mask())
    assert logits.shape == (3, SEQ, VOCAB)
    # per-token loss is the cross entropy of the returned logits
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none"
    ).view(3, SEQ)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_are_megatrons():
    model = GPTModel(tiny_config())
    expected = {
        "language_model.embedding.word_embeddings.weight",
        "language_model.embedding.position_embeddings.weight",
        "language_model.transformer.final_layernorm.weight",
        "language_model.transformer.final_layernorm.bias",
    }
    for layer in range(2):
        expected |= {f"language_model.transformer.layers.{layer}.{k}" for k in MEGATRON_LAYER_KEYS}
    assert set(model.state_dict()) == expected
    qkv = model.state_dict()[
        "language_model.transformer.layers.0.self_attention.query_key_value.weight"
    ]
    assert qkv.shape == (3 * 64, 64)

    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model"}
    assert set(nested["language_model"]) == {"embedding", "transformer"}
    assert set(nested["language_model"]["embedding"]) == {"word_embeddings", "position_embeddings"}
    assert set(nested["language_model"]["embedding"]["word_embeddings"]) == {"weight"}
    assert "layers.1.self_attention.dense.weight" in nested["language_model"]["transformer"]


def test_nested_and_encoder_named_checkpoints_load():
    tokens, labels, position_ids = batch()
    source = GPTModel(tiny_config(seed=1))
    target = GPTModel(tiny_config(seed=2))
    expect = source(tokens, position_ids, causal_mask(), labels=labels)
    assert not torch.allclose(target(tokens, position_ids, causal_mask(), labels=labels), expect)
    nested = source.state_dict_for_save_checkpoint()
    target.load_state_dict(nested)
    torch.testing.assert_close(target(tokens, position_ids, causal_mask(), labels=labels), expect)
    # newer Megatron names the stack 'encoder'
    renamed = {"language_model": dict(nested["language_model"])}
    renamed["language_model"]["encoder"] = renamed["language_model"].pop("transformer")
    third = GPTModel(tiny_config(seed=3))
    third.load_state_dict(renamed)
    torch.testing.assert_close(third(tokens, position_ids, causal_mask(), labels=labels), expect)


def test_activation_checkpointing_matches_with_dropout():
    tokens, labels, position_ids = batch()
    results = []
    for recompute in (False, True):
        mpu.model_parallel_cuda_manual_seed(77)
        torch.manual_seed(77)
        config = tiny_config(
            num_layers=3,
            hidden_dropout=0.2,
            attention_dropout=0.2,
            recompute_granularity="full" if recompute else None,
            recompute_num_layers=2,
        )
        model = GPTModel(config)
        model.train()
        loss = model(tokens, position_ids, causal_mask(), labels=labels)
        loss.mean().backward()
        results.append((loss.detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def test_dropout_is_active_in_training_only():
    tokens, labels, position_ids = batch()
    model = GPTModel(tiny_config(hidden_dropout=0.3, attention_dropout=0.3))
    model.train()
    a = model(tokens, position_ids, causal_mask(), labels=labels)
    b = model(tokens, position_ids, causal_mask(), labels=labels)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        c = model(tokens, position_ids, causal_mask(), labels=labels)
        d = model(tokens, position_ids, causal_mask(), labels=labels)
    assert torch.equal(c, d)


def test_curriculum_seqlen_truncates():
    model = GPTModel(tiny_config())
    tokens, labels, position_ids = batch()
    short = model(tokens, position_ids, causal_mask(), labels=labels, curriculum_seqlen=8)
    assert short.shape == (2, 8)
    full = model(tokens, position_ids, causal_mask(), labels=labels)
    # causal: the first 8 positions do not see the rest
    torch.testing.assert_close(short, full[:, :8], atol=1e-5, rtol=1e-5)


def test_incremental_decoding_matches_full_forward():
    model = GPTModel(tiny_config())
    model.eval()
    tokens, _, position_ids = batch(b=1)
    mask = causal_mask()
    with torch.no_grad():
        full = model(tokens, position_ids, mask)
        logits, past = model(tokens[:, :20], position_ids[:, :20], mask, get_key_value=True)
        torch.testing.assert_close(logits, full[:, :20], atol=1e-5, rtol=1e-5)
        for t in range(20, 24):
            step, past = model(
                tokens[:, t : t + 1],
                position_ids[:, t : t + 1],
                mask,
                layer_past=past,
                get_key_value=True,
            )
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_float16_module_bf16_returns_fp32_loss():
    config = tiny_config(bf16=True)
    model = Float16Module(GPTModel(config), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens, labels, position_ids = batch()
    loss = model(tokens, position_ids, causal_mask(), labels=labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    reference = GPTModel(tiny_config())(tokens, position_ids, causal_mask(), labels=labels)
    torch.testing.assert_close(loss.mean(), reference.mean(), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="torch.float16 or torch.bfloat16"):
        Float16Module(GPTModel(tiny_config()), torch.float32)


def test_fp32_residual_connection_keeps_residual_stream_float():
    config = tiny_config(bf16=True, fp32_residual_connection=True)
    model = Float16Module(GPTModel(config), torch.bfloat16)
    seen = []
    layer = model.module.language_model.transformer.layers[0]
    layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    tokens, labels, position_ids = batch()
    loss = model(tokens, position_ids, causal_mask(), labels=labels)
    assert seen == [torch.float32] and torch.isfinite(loss).all()


def test_parallel_config_reaches_every_tensor_parallel_layer():
    """The parallel flags (--sequence-parallel, --tp-comm-overlap, ...) reach each
    tensor-parallel layer and the logits GEMM in one ParallelConfig built from args."""
    args = argparse.Namespace(
        num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
        max_position_embeddings=32, bf16=True, use_cpu_initialization=True,
        sequence_parallel=True, tp_comm_overlap=True, tp_comm_overlap_chunks=2,
        async_tensor_model_parallel_allreduce=False,
    )  # fmt: skip
    config = config_from_args(args)
    want = mpu.ParallelConfig(
        params_dtype=torch.bfloat16, use_cpu_initialization=True, sequence_parallel=True,
        async_tensor_model_parallel_allreduce=False, tp_comm_overlap=True,
        tp_comm_overlap_chunks=2,
    )  # fmt: skip
    assert config.parallel_config == want
    with torch.device("meta"):
        model = GPTModel(config)
    layers = [
        m for m in model.modules()
        if isinstance(m, (mpu.ColumnParallelLinear, mpu.RowParallelLinear))
    ]  # fmt: skip
    assert len(layers) == 2 * 4  # QKV, dense, h->4h, 4h->h per layer
    assert all(layer.config == want for layer in layers)
    assert model.language_model.embedding.parallel_config == want  # the tied logits GEMM
    with pytest.raises(TypeError):
        mpu.ColumnParallelLinear(4, 4, sequence_parallel=True)  # flags travel in the config
