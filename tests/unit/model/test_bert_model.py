"""Tiny BERT on CPU: shapes, masks, the tied LM head, checkpoint keys, pretrain_bert's loss."""

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model import BertModel
from megatron.model.bert_model import bert_extended_attention_mask, bert_position_ids

from .tiny import SEQ, VOCAB, tiny_config

B = 3
REAL = 20  # tokens before the padding in every sample


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def _batch(seed: int = 0):
    """tokens, token types, labels (-1 except at 5 masked positions), padding mask,
    loss mask; positions >= REAL are padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    types = torch.zeros(B, SEQ, dtype=torch.long)
    types[:, REAL // 2 : REAL] = 1
    padding = torch.zeros(B, SEQ, dtype=torch.long)
    padding[:, :REAL] = 1
    tokens[padding == 0] = 0
    loss_mask = torch.zeros(B, SEQ)
    loss_mask[:, [1, 4, 7, 11, 15]] = 1
    labels = torch.where(loss_mask.bool(), torch.randint(0, VOCAB, (B, SEQ), generator=g), -1)
    return tokens, types, labels, padding, loss_mask


def test_extended_mask_and_position_ids():
    padding = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask = bert_extended_attention_mask(padding)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    # sample 0: query or key at the padded position 2 is masked
    expected0 = torch.tensor([[False, False, True], [False, False, True], [True, True, True]])
    assert torch.equal(mask[0, 0], expected0)
    assert not mask[1].any()
    pos = bert_position_ids(torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(pos, torch.arange(5).expand(2, 5))


def test_forward_shapes_loss_and_logits_agree():
    model = BertModel(tiny_config())
    tokens, types, labels, padding, _ = _batch()
    lm_loss, binary_logits = model(tokens, padding, tokentype_ids=types, lm_labels=labels)
    assert lm_loss.shape == (B, SEQ) and lm_loss.dtype == torch.float32
    assert binary_logits.shape == (B, 2)
    logits, binary_again = model(tokens, padding, tokentype_ids=types)
    assert logits.shape == (B, SEQ, VOCAB)
    torch.testing.assert_close(binary_logits, binary_again)
    # per-token loss is the cross entropy of the logits; a -1 label (no target, masked
    # out by loss_mask) gives logsumexp - max, as the vocab-parallel cross entropy does
    lse = torch.logsumexp(logits, dim=-1)
    target = labels.clamp(min=0)
    ref = lse - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref = torch.where(labels >= 0, ref, lse - logits.max(dim=-1).values)
    torch.testing.assert_close(lm_loss, ref, atol=1e-5, rtol=1e-5)
    (lm_loss.mean() + binary_logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_padding_does_not_affect_real_tokens():
    model = BertModel(tiny_config())
    model.eval()
    tokens, types, labels, padding, _ = _batch()
    loss_a, sop_a = model(tokens, padding, tokentype_ids=types, lm_labels=labels)
    other = tokens.clone()
    other[:, REAL:] = torch.randint(1, VOCAB, (B, SEQ - REAL))
    loss_b, sop_b = model(other, padding, tokentype_ids=types, lm_labels=labels)
    torch.testing.assert_close(loss_a[:, :REAL], loss_b[:, :REAL], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sop_a, sop_b, atol=1e-6, rtol=1e-6)
    # without the padding mask the same change does reach the real tokens
    full = torch.ones_like(padding)
    loss_c, _ = model(tokens, full, tokentype_ids=types, lm_labels=labels)
    loss_d, _ = model(other, full, tokentype_ids=types, lm_labels=labels)
    assert not torch.allclose(loss_c[:, :REAL], loss_d[:, :REAL], atol=1e-4)


def test_lm_head_is_tied_to_word_embeddings():
    model = BertModel(tiny_config())
    tokens, types, _, padding, _ = _batch()
    embedding = model.language_model.embedding.word_embeddings.weight
    assert model.word_embeddings_weight() is embedding
    head_params = {n for n, _ in model.lm_head.named_parameters()}
    assert head_params == {
        "bias",
        "dense.weight",
        "dense.bias",
        "layernorm.weight",
        "layernorm.bias",
    }
    assert model.lm_head.bias.shape == (VOCAB,)
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.randn(VOCAB))
    logits, _ = model(tokens, padding, tokentype_ids=types)
    # logits = LayerNorm(gelu(h W + b)) E^T + bias, from the language model's output
    hidden, _ = model.language_model(
        tokens, bert_position_ids(tokens), bert_extended_attention_mask(padding),
        tokentype_ids=types,
    )  # fmt: skip
    head = model.lm_head
    x = head.layernorm(F.gelu(head.dense(hidden)))  # [s, b, h]
    ref = (x @ embedding.t() + head.bias).transpose(0, 1)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    # the head's gradient reaches the embedding rows of the predicted tokens
    logits[0, 0, 5].backward()
    assert embedding.grad[5].abs().sum() > 0


def test_checkpoint_keys_and_round_trip():
    model = BertModel(tiny_config())
    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "lm_head", "binary_head"}
    assert set(nested["language_model"]) == {"embedding", "transformer", "pooler"}
    assert set(nested["language_model"]["embedding"]) == {
        "word_embeddings",
        "position_embeddings",
        "tokentype_embeddings",
    }
    assert nested["language_model"]["embedding"]["tokentype_embeddings"]["weight"].shape == (2, 64)
    assert set(nested["lm_head"]) == {
        "bias",
        "dense.weight",
        "dense.bias",
        "layernorm.weight",
        "layernorm.bias",
    }
    assert set(nested["binary_head"]) == {"weight", "bias"}
    assert nested["binary_head"]["weight"].shape == (2, 64)

    other = BertModel(tiny_config(seed=99))
    tokens, types, labels, padding, _ = _batch()
    before = other(tokens, padding, tokentype_ids=types, lm_labels=labels)[0]
    other.load_state_dict(nested)
    expected = model(tokens, padding, tokentype_ids=types, lm_labels=labels)
    got = other(tokens, padding, tokentype_ids=types, lm_labels=labels)
    assert not torch.allclose(before, expected[0])
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_without_binary_head():
    model = BertModel(tiny_config(), num_tokentypes=0, add_binary_head=False)
    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "lm_head"}
    assert set(nested["language_model"]) == {"embedding", "transformer"}
    assert "tokentype_embeddings" not in nested["language_model"]["embedding"]
    tokens, _, labels, padding, _ = _batch()
    lm_loss, binary_logits = model(tokens, padding, lm_labels=labels)
    assert lm_loss.shape == (B, SEQ) and binary_logits is None


def test_pretrain_bert_loss_func(monkeypatch):
    """Masked mean over loss_mask plus the sentence-order cross entropy."""
    import pretrain_bert

    monkeypatch.setattr(
        pretrain_bert, "average_losses_across_data_parallel_group", lambda ls: torch.stack(ls)
    )
    model = BertModel(tiny_config())
    tokens, types, labels, padding, loss_mask = _batch()
    order = torch.tensor([0, 1, 1])
    output = model(tokens, padding, tokentype_ids=types, lm_labels=labels)
    loss, logged = pretrain_bert.loss_func(loss_mask, order, output)
    lm_ref = output[0][loss_mask.bool()].mean()
    sop_ref = F.cross_entropy(output[1], order)
    torch.testing.assert_close(logged["lm loss"], lm_ref)
    torch.testing.assert_close(logged["sop loss"], sop_ref)
    torch.testing.assert_close(loss, lm_ref + sop_ref)
    # positions outside loss_mask do not count, whatever their label
    changed = labels.clone()
    changed[loss_mask == 0] = 7
    output2 = model(tokens, padding, tokentype_ids=types, lm_labels=changed)
    _, logged2 = pretrain_bert.loss_func(loss_mask, order, output2)
    torch.testing.assert_close(logged2["lm loss"], lm_ref)
    # no binary head: only the lm loss
    loss3, logged3 = pretrain_bert.loss_func(loss_mask, order, (output[0], None))
    assert set(logged3) == {"lm loss"}
    torch.testing.assert_close(loss3, lm_ref)
