"""Sequence classification on the BERT stack: the pooled [CLS] state, dropout, a linear
head of `num_classes` logits.

    h = Transformer(Embed(tokens, positions, token types))          [s, b, h]
    logits = Dropout(tanh(h[0] W_p + b_p)) W_c + b_c                  [b, num_classes]

Checkpoint layout, as Megatron writes it: {'language_model': {...} (embedding,
transformer, pooler), 'classification_head': {'weight', 'bias'}}. A pretrained BERT
checkpoint ({'language_model', 'lm_head', 'binary_head'}) loads into the language model;
its heads are ignored and the classification head keeps its initial weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron import print_rank_last

from .bert_model import bert_extended_attention_mask, bert_position_ids
from .config import TransformerConfig
from .enums import AttnMaskType
from .language_model import flatten_state_dict, get_language_model
from .module import MegatronModule
from .utils import INIT_SALT_HEAD, get_linear_layer, init_methods, init_rng

# Language-model weights a pretrained checkpoint may lack (BERT pretrained with
# --bert-no-binary-head has neither token types nor pooler): they start from their
# initial values, with a warning.
OPTIONAL_PRETRAINED_PREFIXES = ("pooler.", "embedding.tokentype_embeddings.")
# Top-level keys of the checkpoints of BERT-stack models: pretraining, and the task heads.
BERT_CHECKPOINT_HEADS = ("lm_head", "binary_head", "classification_head", "multichoice_head")


class PooledHeadModel(MegatronModule):
    """BERT's language model with its pooler and a linear head of `num_outputs` on the
    dropped-out pooled state; the base of Classification and MultipleChoice.

    forward(input_ids [b, s], attention_mask [b, s] (1 = token, 0 = padding),
    tokentype_ids [b, s] or None) -> head outputs [b, num_outputs]; on a pipeline stage
    without post_process the hidden states [s, b, h].
    """

    head_key = "head"

    def __init__(
        self,
        config: TransformerConfig,
        num_outputs: int,
        num_tokentypes: int = 2,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(share_word_embeddings=False)
        self.pre_process = pre_process
        self.post_process = post_process
        init_method, scaled_init_method = init_methods(config)
        self.language_model, self._language_model_key = get_language_model(
            config,
            num_tokentypes=num_tokentypes,
            add_pooler=True,
            encoder_attn_mask_type=AttnMaskType.padding,
            init_method=init_method,
            scaled_init_method=scaled_init_method,
            pre_process=pre_process,
            post_process=post_process,
        )
        if self.post_process:
            self.head_dropout = torch.nn.Dropout(config.hidden_dropout)
            # replicated on every tensor-parallel rank: drawn from its own seeded generator
            # so that each rank (and a TP=1 run) starts from the same head
            with init_rng(config.seed, INIT_SALT_HEAD):
                head = get_linear_layer(config.hidden_size, num_outputs, init_method)
            setattr(self, self.head_key, head)

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage."""
        self.language_model.set_input_tensor(input_tensor)

    def pooled_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokentype_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """[b, s] inputs -> head outputs [b, num_outputs] (hidden states [s, b, h] on a
        stage without post_process)."""
        extended_attention_mask = bert_extended_attention_mask(attention_mask)  # [b, 1, s, s]
        position_ids = bert_position_ids(input_ids)  # [b, s]
        lm_output = self.language_model(
            input_ids, position_ids, extended_attention_mask, tokentype_ids=tokentype_ids
        )
        if not self.post_process:
            return lm_output  # [s, b, h]
        _, pooled_output = lm_output  # [s, b, h], [b, h]
        return getattr(self, self.head_key)(self.head_dropout(pooled_output))  # [b, n]

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """Megatron's nesting (see the module docstring)."""
        state_dict_: dict = {
            self._language_model_key: self.language_model.state_dict_for_save_checkpoint(
                keep_vars=keep_vars
            )
        }
        if self.post_process:
            state_dict_[self.head_key] = getattr(self, self.head_key).state_dict(
                keep_vars=keep_vars
            )
        return state_dict_

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load Megatron's nested layout: a checkpoint of this model, or a pretrained BERT
        checkpoint (the language model only; its lm_head and binary_head are not used).
        A missing head (pretrained checkpoint) keeps its initial weights with a warning,
        as do a missing pooler and token-type embeddings; any other missing or
        unexpected language-model key is an error (ValueError) when `strict`, and so is a
        checkpoint of another model (GPT: no BERT head; T5: a decoder)."""
        if self._language_model_key not in state_dict or not isinstance(
            state_dict[self._language_model_key], Mapping
        ):
            # the flat state_dict() of this model
            return torch.nn.Module.load_state_dict(self, state_dict, strict=strict)
        lm_state = state_dict[self._language_model_key]
        if not any(k in state_dict for k in BERT_CHECKPOINT_HEADS) or "decoder" in lm_state:
            # a GPT checkpoint has no head of its own, T5 has a decoder
            raise ValueError(
                f"{type(self).__name__}: the checkpoint is not a BERT model (no "
                f"{' / '.join(BERT_CHECKPOINT_HEADS)} and no decoder expected; it has "
                f"{sorted(state_dict)}): only BERT checkpoints can be fine-tuned on "
                "the classification and multiple-choice tasks"
            )
        result = self.language_model.load_state_dict(lm_state, strict=False)
        missing = list(result.missing_keys)
        optional = [k for k in missing if k.startswith(OPTIONAL_PRETRAINED_PREFIXES)]
        required = [k for k in missing if k not in optional]
        if strict and (required or result.unexpected_keys):
            saved = sorted(flatten_state_dict(lm_state))[:6]
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's language model does not match "
                f"this model: missing {required[:6]}, unexpected "
                f"{result.unexpected_keys[:6]} (checkpoint keys: {saved} ...)"
            )
        if optional:
            print_rank_last(
                f"WARNING: {', '.join(sorted(optional))} not in the checkpoint: "
                "initialized to random"
            )
        if self.post_process:
            head = getattr(self, self.head_key)
            if self.head_key in state_dict:
                head.load_state_dict(state_dict[self.head_key], strict=strict)
            else:
                print_rank_last(
                    f"WARNING: could not find {self.head_key} in the checkpoint, "
                    "initializing to random"
                )
        return result


class Classification(PooledHeadModel):
    """BERT with a classification head of `num_classes` logits on the pooled state.

    forward(input_ids [b, s], attention_mask [b, s], tokentype_ids [b, s] or None)
    -> logits [b, num_classes].
    """

    head_key = "classification_head"

    def __init__(
        self,
        config: TransformerConfig,
        num_classes: int,
        num_tokentypes: int = 2,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"Classification: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        super().__init__(config, num_classes, num_tokentypes, pre_process, post_process)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.pooled_logits(input_ids, attention_mask, tokentype_ids)  # [b, classes]
