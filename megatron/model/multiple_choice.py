"""Multiple choice on the BERT stack (RACE): each (question + choice, passage) pair is
one sequence; the pooled state of each gets one logit, and the choices of a question
compete in a softmax over them.

    [b, c, s] -> [b c, s] -> Transformer, pooler, dropout, W [h, 1]  -> [b c, 1] -> [b, c]

Checkpoint layout, as Megatron writes it: {'language_model': {...} (embedding,
transformer, pooler), 'multichoice_head': {'weight', 'bias'}}; a pretrained BERT
checkpoint loads as for Classification.
"""

from __future__ import annotations

import torch

from .classification import PooledHeadModel
from .config import TransformerConfig


class MultipleChoice(PooledHeadModel):
    """BERT scoring each choice with one logit of its pooled state.

    forward(input_ids [b, c, s], attention_mask [b, c, s], tokentype_ids [b, c, s])
    -> logits [b, c].
    """

    head_key = "multichoice_head"

    def __init__(
        self,
        config: TransformerConfig,
        num_tokentypes: int = 2,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config, 1, num_tokentypes, pre_process, post_process)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask.dim() != 3 or input_ids.dim() != 3:
            raise ValueError(
                "MultipleChoice: inputs must be [batch, choices, sequence], got "
                f"input_ids {tuple(input_ids.shape)}, attention_mask "
                f"{tuple(attention_mask.shape)}"
            )
        num_choices = input_ids.size(1)
        seq_length = input_ids.size(-1)
        input_ids = input_ids.reshape(-1, seq_length)  # [b c, s]
        attention_mask = attention_mask.reshape(-1, seq_length)  # [b c, s]
        if tokentype_ids is not None:
            tokentype_ids = tokentype_ids.reshape(-1, seq_length)  # [b c, s]
        logits = self.pooled_logits(input_ids, attention_mask, tokentype_ids)  # [b c, 1]
        if not self.post_process:
            return logits  # hidden states [s, b c, h]
        return logits.view(-1, num_choices)  # [b, c]
