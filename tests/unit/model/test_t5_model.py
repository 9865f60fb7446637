"""Tiny T5 on CPU: shapes and loss, causal decoder, encoder padding mask, tied output
head, checkpoint keys, the T5 flags, and TP=2 on two gloo ranks equal to TP=1."""

import os
import shlex

import pytest
import torch

from megatron import mpu
from megatron.arguments import ArgumentError, build_parser, validate_args
from megatron.model.t5_model import T5Model, t5_extended_attention_mask, t5_position_ids
from tests.dist_utils import run_distributed

from .tiny import VOCAB, tiny_config

B, SE, SD = 2, 16, 8
HIDDEN = 64


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def t5_batch(b: int = B, enc_len=(SE, SE - 5), dec_len=(SD, SD - 3), seed: int = 0):
    """Tokens, labels (-1 on padding), loss mask and bool masks (True = masked) with the
    given number of real encoder / decoder tokens per row, as pretrain_t5.get_batch."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(0, VOCAB, (b, SE), generator=g)
    dec = torch.randint(0, VOCAB, (b, SD), generator=g)
    labels = torch.randint(0, VOCAB, (b, SD), generator=g)
    enc_real = torch.arange(SE)[None] < torch.tensor(enc_len)[:, None]  # [b, se]
    dec_real = torch.arange(SD)[None] < torch.tensor(dec_len)[:, None]  # [b, sd]
    labels = labels.masked_fill(~dec_real, -1)
    causal = torch.ones(SD, SD, dtype=torch.bool).tril()
    enc_mask = ~(enc_real[:, :, None] & enc_real[:, None, :])  # [b, se, se]
    dec_mask = ~(dec_real[:, :, None] & dec_real[:, None, :] & causal)  # [b, sd, sd]
    enc_dec_mask = ~(dec_real[:, :, None] & enc_real[:, None, :])  # [b, sd, se]
    return enc, dec, labels, dec_real.float(), enc_mask, dec_mask, enc_dec_mask


def _forward(model, data, **kwargs):
    enc, dec, _, _, enc_mask, dec_mask, enc_dec_mask = data
    return model(enc, dec, enc_mask, dec_mask, enc_dec_mask, **kwargs)


def test_helpers():
    masks = t5_extended_attention_mask([torch.zeros(2, 3, 5), torch.zeros(2, 3, 3)])
    assert [m.shape for m in masks] == [(2, 1, 3, 5), (2, 1, 3, 3)]
    pos = t5_position_ids(torch.zeros(2, 4, dtype=torch.long))
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_shapes_loss_and_grads():
    model = T5Model(tiny_config())
    data = t5_batch()
    labels, loss_mask = data[2], data[3]
    loss = _forward(model, data, lm_labels=labels)
    assert loss.shape == (B, SD) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()  # padding labels (-1) give finite, masked-out values
    logits = _forward(model, data)
    assert logits.shape == (B, SD, VOCAB)
    real = loss_mask.bool()
    ref = torch.nn.functional.cross_entropy(logits[real], labels[real], reduction="none")
    torch.testing.assert_close(loss[real], ref, atol=1e-5, rtol=1e-5)
    # a fresh model is close to uniform over the vocabulary
    assert abs(ref.mean().item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    (loss * loss_mask).sum().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == {n for n, _ in model.named_parameters()}
    assert model.lm_head.bias.grad.abs().sum() > 0


def test_decoder_is_causal():
    model = T5Model(tiny_config()).eval()
    data = t5_batch(dec_len=(SD, SD))
    k = 4
    changed = list(data)
    changed[1] = data[1].clone()
    changed[1][:, k] = (data[1][:, k] + 1) % VOCAB
    with torch.no_grad():
        before, after = _forward(model, data), _forward(model, changed)
    torch.testing.assert_close(after[:, :k], before[:, :k], atol=0, rtol=0)
    assert (after[:, k:] - before[:, k:]).abs().amax(dim=-1).min() > 1e-6


def test_encoder_padding_is_masked():
    model = T5Model(tiny_config()).eval()
    # every decoder token real: a fully padded query row would attend uniformly to all keys
    data = t5_batch(enc_len=(SE - 4, SE - 4), dec_len=(SD, SD))
    padded, real = list(data), list(data)
    padded[0] = data[0].clone()
    padded[0][:, SE - 4 :] = (data[0][:, SE - 4 :] + 7) % VOCAB  # only padded positions
    real[0] = data[0].clone()
    real[0][:, 0] = (data[0][:, 0] + 7) % VOCAB  # a real encoder token
    with torch.no_grad():
        base = _forward(model, data)
        torch.testing.assert_close(_forward(model, padded), base, atol=0, rtol=0)
        assert (_forward(model, real) - base).abs().max() > 1e-6


def test_output_head_is_tied_to_the_word_embeddings():
    model = T5Model(tiny_config()).eval()
    embedding = model.language_model.embedding.word_embeddings.weight
    assert model.word_embeddings_weight() is embedding
    assert model.lm_head.bias.shape == (VOCAB,) and model.lm_head.bias.tensor_model_parallel
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.linspace(-1, 1, VOCAB))
    data = t5_batch()
    enc, dec, _, _, enc_mask, dec_mask, enc_dec_mask = data
    masks = t5_extended_attention_mask([enc_mask, dec_mask, enc_dec_mask])
    with torch.no_grad():
        hidden, _ = model.language_model(
            enc, t5_position_ids(enc), masks[0], dec, t5_position_ids(dec), masks[1], masks[2]
        )  # [sd, b, h]
        expected = hidden.transpose(0, 1) @ embedding.t() + model.lm_head.bias
        torch.testing.assert_close(_forward(model, data), expected, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in model.lm_head.named_parameters()] == ["bias"]


DECODER_LAYER_KEYS = {
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "inter_attention.query.weight", "inter_attention.query.bias",
    "inter_attention.key_value.weight", "inter_attention.key_value.bias",
    "inter_attention.dense.weight", "inter_attention.dense.bias",
    "post_inter_attention_layernorm.weight", "post_inter_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
}  # fmt: skip


def test_checkpoint_keys_and_round_trip():
    model = T5Model(tiny_config()).eval()
    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "lm_head"}
    assert set(nested["lm_head"]) == {"bias"}
    lm = nested["language_model"]
    assert set(lm) == {"embedding", "encoder", "decoder"}
    assert set(lm["embedding"]) == {"word_embeddings", "position_embeddings"}
    assert {k.split(".", 2)[2] for k in lm["decoder"] if k.startswith("layers.0.")} == (
        DECODER_LAYER_KEYS
    )
    assert "final_layernorm.weight" in lm["decoder"] and "final_layernorm.weight" in lm["encoder"]
    assert not any("inter_attention" in k for k in lm["encoder"])
    assert lm["decoder"]["layers.0.inter_attention.key_value.weight"].shape == (2 * HIDDEN, HIDDEN)

    torch.manual_seed(99)
    mpu.model_parallel_cuda_manual_seed(99)
    other = T5Model(tiny_config(seed=99)).eval()
    data = t5_batch()
    with torch.no_grad():
        assert not torch.equal(_forward(other, data), _forward(model, data))
        other.load_state_dict(nested)
        torch.testing.assert_close(_forward(other, data), _forward(model, data), atol=0, rtol=0)
    # the flat state dict loads too
    assert not other.load_state_dict(model.state_dict()).missing_keys


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "pretrain_t5.sh")


def _example_flags() -> str:
    """The flags of examples/pretrain_t5.sh's `python pretrain_t5.py ...` command, with
    its variables given placeholder values."""
    with open(EXAMPLE) as f:
        text = f.read()
    command = text[text.index("python pretrain_t5.py") :].replace("\\\n", " ")
    flags = shlex.split(command)[2:]
    values = {"$CHECKPOINT_PATH": "ckpt", "$DATA_PATH": "my-t5", "$VOCAB_FILE": "vocab.txt"}
    return shlex.join(values.get(f, f) for f in flags if f != "$@")


def _validate(flags: str, world_size: int = 1):
    args = build_parser().parse_args(shlex.split(flags))
    return validate_args(
        args, {"tokenizer_type": "BertWordPieceLowerCase"}, world_size=world_size, rank=0
    )


def test_t5_example_flags(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    example = _example_flags()
    args = _validate(example)
    assert (args.seq_length, args.encoder_seq_length, args.decoder_seq_length) == (512, 512, 128)
    assert args.vocab_extra_ids == 100 and args.tokenizer_type == "BertWordPieceLowerCase"
    with pytest.raises(ArgumentError, match="--pipeline-model-parallel-size"):
        _validate(example + " --pipeline-model-parallel-size 2", world_size=2)


def test_pipeline_stage_is_refused():
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size"):
        T5Model(tiny_config(), pre_process=True, post_process=False)


# ------------------------------------------------------------ TP=2 equals TP=1


def _loss_and_grads(model, data):
    loss = _forward(model, data, lm_labels=data[2])
    (loss * data[3]).sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def _full_grad(param, grad, world_size):
    if not getattr(param, "tensor_model_parallel", False):
        return grad
    parts = [torch.empty_like(grad) for _ in range(world_size)]
    torch.distributed.all_gather(
        parts, grad.contiguous(), group=mpu.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=param.partition_dim)


def _check_tensor_parallel(rank, world_size):
    torch.set_num_threads(1)
    data = t5_batch()
    mpu.initialize_model_parallel(world_size)
    mpu.set_tensor_model_parallel_world_size(1)  # TP=1 reference in this process
    mpu.set_tensor_model_parallel_rank(0)
    try:
        mpu.model_parallel_cuda_manual_seed(1234)
        ref_loss, ref_grads, _ = _loss_and_grads(T5Model(tiny_config()), data)
    finally:
        mpu.clear_model_parallel_overrides()
    mpu.model_parallel_cuda_manual_seed(1234)
    loss, grads, model = _loss_and_grads(T5Model(tiny_config()), data)
    assert model.lm_head.bias.shape == (VOCAB // world_size,)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    params = dict(model.named_parameters())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        full = _full_grad(params[name], grad, world_size)
        torch.testing.assert_close(full, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    mpu.destroy_model_parallel()
    return True


def test_tensor_parallel_equals_serial():
    assert run_distributed(_check_tensor_parallel, world_size=2, timeout=120) == [True, True]
