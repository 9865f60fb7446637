"""The tiny GPT used by the model tests: 2 layers, h 64, 4 heads, vocab 128, seq 32."""

from __future__ import annotations

import torch

from megatron.model.config import TransformerConfig

SEQ = 32
VOCAB = 128


def tiny_config(**overrides) -> TransformerConfig:
    values = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        seed=1234,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def causal_mask(s: int = SEQ) -> torch.Tensor:
    """[1, 1, s, s], True above the diagonal (masked), as get_ltor_masks_and_position_ids."""
    return torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]


def reset_mask(b: int, s: int = SEQ, boundary: int = SEQ // 2) -> torch.Tensor:
    """[b, 1, s, s] causal mask that also hides documents before `boundary` from the
    tokens after it (--reset-attention-mask)."""
    mask = causal_mask(s).repeat(b, 1, 1, 1)
    mask[:, :, boundary:, :boundary] = True
    return mask


def batch(b: int = 2, s: int = SEQ, seed: int = 0):
    """tokens [b, s], labels [b, s], position_ids [b, s]."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous(), torch.arange(s).expand(b, s)
