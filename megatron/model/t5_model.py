"""T5: an encoder-decoder TransformerLanguageModel (padding-masked encoder, causal decoder
with cross-attention) sharing one word embedding, whose transpose is also the output
projection: logits = h_dec E^T + b, with a per-vocabulary bias b split like E.

Checkpoint layout (state_dict_for_save_checkpoint), as Megatron writes it:

    {'language_model': {'embedding': {...}, 'encoder': {...}, 'decoder': {...}},
     'lm_head': {'bias'}}

The flat state_dict() names the encoder stack `language_model.transformer.*`; loading
accepts either name. Pipeline parallelism is not supported (the decoder needs the
encoder output on the same stage); --pipeline-model-parallel-size must be 1.
"""

from __future__ import annotations

from typing import Any, List, Mapping

import torch

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType
from .language_model import get_language_model, load_model_state_dict, parallel_lm_logits
from .module import MegatronModule
from .utils import init_methods


def t5_extended_attention_mask(attention_mask_list: List[torch.Tensor]) -> List[torch.Tensor]:
    """[b, sq, sk] masks -> [b, 1, sq, sk] (one mask broadcast over the heads)."""
    return [attn_mask.unsqueeze(1) for attn_mask in attention_mask_list]


def t5_position_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 for every row of token_ids [b, s] -> [b, s]."""
    seq_length = token_ids.size(1)
    position_ids = torch.arange(seq_length, dtype=torch.long, device=token_ids.device)
    return position_ids.unsqueeze(0).expand_as(token_ids)


class T5LMHead(MegatronModule):
    """Output head: logits = h E^T + b with E the tied word embeddings [v/p, h] and the
    bias b [v/p] this rank's slice of a zero-initialised vocabulary bias.

    hidden_states [s, b, h] -> [s, b, v/p] (or [s, b, v] without parallel_output).
    """

    def __init__(self, mpu_vocab_size: int, parallel_output: bool) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(mpu_vocab_size))
        mpu.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        self.parallel_output = parallel_output

    def forward(
        self,
        hidden_states: torch.Tensor,
        word_embeddings_weight: torch.Tensor,
        config: mpu.ParallelConfig,
    ) -> torch.Tensor:
        return parallel_lm_logits(
            hidden_states, word_embeddings_weight, self.parallel_output, config, bias=self.bias
        )


class T5Model(MegatronModule):
    """T5 encoder-decoder language model.

    forward(encoder_input_ids [b, se], decoder_input_ids [b, sd], encoder_attn_mask
    [b, se, se], decoder_attn_mask [b, sd, sd], encoder_decoder_attn_mask [b, sd, se]
    (masks True = masked; the decoder self-attention is causal on top of its mask),
    lm_labels [b, sd] or None) -> per-token loss [b, sd] (fp32, vocab-parallel cross
    entropy; labels outside the vocabulary such as the padding -1 give a finite loss that
    the loss mask drops) when lm_labels are given, else logits [b, sd, v/p].
    """

    def __init__(
        self,
        config: TransformerConfig,
        num_tokentypes: int = 0,
        parallel_output: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(share_word_embeddings=True)
        if not (pre_process and post_process):
            raise ValueError(
                "T5Model: --pipeline-model-parallel-size must be 1 (the decoder needs the "
                "encoder output and the embeddings on the same stage)"
            )
        self.config = config
        self.parallel_output = parallel_output
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = config.fp16_lm_cross_entropy
        self.language_model, self._language_model_key = get_language_model(
            config,
            num_tokentypes=num_tokentypes,
            add_pooler=False,
            add_decoder=True,
            encoder_attn_mask_type=AttnMaskType.padding,
            decoder_attn_mask_type=AttnMaskType.causal,
            init_method=init_methods(config)[0],
            scaled_init_method=init_methods(config)[1],
            pre_process=pre_process,
            post_process=post_process,
        )
        self.initialize_word_embeddings(config)
        self.lm_head = T5LMHead(self.word_embeddings_weight().size(0), parallel_output)
        self._lm_head_key = "lm_head"

    def set_input_tensor(self, input_tensor) -> None:
        """Input from a previous pipeline stage (never used: PP is 1 for T5)."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        encoder_attn_mask: torch.Tensor,
        decoder_attn_mask: torch.Tensor,
        encoder_decoder_attn_mask: torch.Tensor,
        tokentype_ids: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
        enc_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoder_attn_mask, decoder_attn_mask, encoder_decoder_attn_mask = (
            t5_extended_attention_mask(
                [encoder_attn_mask, decoder_attn_mask, encoder_decoder_attn_mask]
            )
        )  # [b, 1, sq, sk] each
        decoder_output, _ = self.language_model(
            encoder_input_ids,
            t5_position_ids(encoder_input_ids),
            encoder_attn_mask,
            decoder_input_ids,
            t5_position_ids(decoder_input_ids),
            decoder_attn_mask,
            encoder_decoder_attn_mask,
            tokentype_ids=tokentype_ids,
            enc_hidden_states=enc_hidden_states,
        )  # decoder_output [sd, b, h]
        lm_logits = self.lm_head(
            decoder_output,
            self.word_embeddings_weight(),
            self.config.parallel_config,
        )  # [sd, b, v/p]
        if lm_labels is None:
            return lm_logits.transpose(0, 1).contiguous()  # [b, sd, v/p]
        labels = lm_labels.transpose(0, 1).contiguous()  # [sd, b]
        if self.fp16_lm_cross_entropy:
            if lm_logits.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError("--fp16-lm-cross-entropy needs half-precision logits")
            lm_loss = mpu.vocab_parallel_cross_entropy(lm_logits, labels)
        else:
            lm_loss = mpu.vocab_parallel_cross_entropy(lm_logits.float(), labels)
        return lm_loss.float().transpose(0, 1).contiguous()  # [b, sd]

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """{'language_model': {'embedding', 'encoder', 'decoder'}, 'lm_head': {'bias'}}."""
        language_model = self.language_model.state_dict_for_save_checkpoint(keep_vars=keep_vars)
        language_model = {
            ("encoder" if key == "transformer" else key): value
            for key, value in language_model.items()
        }
        return {
            self._language_model_key: language_model,
            self._lm_head_key: self.lm_head.state_dict(keep_vars=keep_vars),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load the nested checkpoint layout or the flat state_dict()."""
        return load_model_state_dict(self, state_dict, strict=strict)
