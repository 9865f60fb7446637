"""Classification and MultipleChoice on CPU: shapes, a pretrained BERT checkpoint loaded
into them (heads left to their initial weights), their own checkpoint keys, and GPT
checkpoints refused."""

import pytest
import torch

from megatron import mpu
from megatron.model import BertModel, GPTModel
from megatron.model.classification import Classification
from megatron.model.multiple_choice import MultipleChoice

from .tiny import SEQ, VOCAB, tiny_config

B, CHOICES, REAL = 3, 4, 20


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def _pairs(shape):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, shape + (SEQ,), generator=g)
    types = torch.zeros_like(tokens)
    types[..., REAL // 2: REAL] = 1
    padding = torch.zeros_like(tokens)
    padding[..., :REAL] = 1
    return tokens * padding, types, padding


def test_classification_from_a_pretrained_bert(capsys):
    bert = BertModel(tiny_config(seed=7))
    model = Classification(tiny_config(), num_classes=3)
    head = model.classification_head.weight.detach().clone()
    model.load_state_dict(bert.state_dict_for_save_checkpoint())
    assert "could not find classification_head" in capsys.readouterr().out
    torch.testing.assert_close(model.classification_head.weight, head, rtol=0, atol=0)
    for name, param in bert.language_model.state_dict().items():
        torch.testing.assert_close(model.language_model.state_dict()[name], param,
                                   rtol=0, atol=0)
    tokens, types, padding = _pairs((B,))
    logits = model(tokens, padding, tokentype_ids=types)
    assert logits.shape == (B, 3)
    # the logits read the pooled [CLS] state: the padded tail does not change them
    tail = tokens.clone()
    tail[:, REAL:] = 5
    torch.testing.assert_close(model(tail, padding, tokentype_ids=types), logits)

    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "classification_head"}
    other = Classification(tiny_config(seed=99), num_classes=3)
    other.load_state_dict(nested)
    torch.testing.assert_close(other(tokens, padding, tokentype_ids=types), logits,
                               rtol=0, atol=0)


def test_multiple_choice_scores_each_choice_alone():
    model = MultipleChoice(tiny_config())
    tokens, types, padding = _pairs((B, CHOICES))
    logits = model(tokens, padding, tokentype_ids=types)
    assert logits.shape == (B, CHOICES)
    one = model(tokens[:, 2:3], padding[:, 2:3], tokentype_ids=types[:, 2:3])  # [B, 1]
    torch.testing.assert_close(one[:, 0], logits[:, 2], rtol=1e-5, atol=1e-6)
    assert set(model.state_dict_for_save_checkpoint()) == {"language_model",
                                                          "multichoice_head"}
    with pytest.raises(ValueError, match="batch, choices, sequence"):
        model(tokens[:, 0], padding[:, 0], tokentype_ids=types[:, 0])


def test_bert_without_binary_head_loads_with_a_warning(capsys):
    bert = BertModel(tiny_config(), num_tokentypes=0, add_binary_head=False)
    model = Classification(tiny_config(), num_classes=2)
    model.load_state_dict(bert.state_dict_for_save_checkpoint())
    out = capsys.readouterr().out
    assert "pooler.dense.weight" in out and "tokentype_embeddings.weight" in out


def test_gpt_checkpoint_is_refused():
    gpt = GPTModel(tiny_config())
    with pytest.raises(ValueError, match="not a BERT model"):
        Classification(tiny_config(), num_classes=2).load_state_dict(
            gpt.state_dict_for_save_checkpoint())
