"""BERT: a bidirectional TransformerLanguageModel with a masked-LM head tied to the word
embeddings and a sentence-order (binary) head on the pooled [CLS] state.

    h = Transformer(Embed(tokens, positions, token types))          [s, b, h]
    lm logits = LayerNorm(gelu(h W_d + b_d)) E^T + b_lm             [s, b, v/p]
    binary logits = tanh(h[0] W_p + b_p) W_b + b_b                  [b, 2]

Checkpoint layout (state_dict_for_save_checkpoint), as Megatron writes it:
{'language_model': {...} (embedding, transformer, pooler), 'lm_head': {'bias',
'dense.weight', 'dense.bias', 'layernorm.weight', 'layernorm.bias'}, 'binary_head':
{'weight', 'bias'}}, plus {'word_embeddings_for_head': {'weight'}} on a last pipeline
stage that is not also the first.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType
from .fused_layer_norm import MixedFusedLayerNorm as LayerNorm
from .language_model import get_language_model, load_model_state_dict, parallel_lm_logits
from .module import MegatronModule
from .utils import (
    INIT_SALT_HEAD,
    erf_gelu,
    get_linear_layer,
    init_methods,
    init_rng,
    openai_gelu,
)


def bert_extended_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [b, s] (1 = real token, 0 = padding) -> [b, 1, s, s] boolean mask,
    True where query i or key j is padding (masked out)."""
    attention_mask_b1s = attention_mask.unsqueeze(1)  # [b, 1, s]
    attention_mask_bs1 = attention_mask.unsqueeze(2)  # [b, s, 1]
    attention_mask_bss = attention_mask_b1s * attention_mask_bs1  # [b, s, s]
    return attention_mask_bss.unsqueeze(1) < 0.5  # [b, 1, s, s]


def bert_position_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 for every sequence: token_ids [b, s] -> [b, s]."""
    seq_length = token_ids.size(1)
    position_ids = torch.arange(seq_length, dtype=torch.long, device=token_ids.device)
    return position_ids.unsqueeze(0).expand_as(token_ids)


class BertLMHead(MegatronModule):
    """Masked-LM head: dense h -> h, GeLU, layer norm, then logits through the tied
    word embeddings E [v/p, h] plus a bias of this rank's v/p vocabulary entries.

    forward(hidden_states [s, b, h], word_embeddings_weight) -> [s, b, v/p] (or [s, b, v]
    gathered when not parallel_output).
    """

    def __init__(
        self,
        mpu_vocab_size: int,
        config: TransformerConfig,
        init_method: Callable,
        parallel_output: bool,
    ) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.bias = torch.nn.Parameter(torch.zeros(mpu_vocab_size, dtype=config.params_dtype))
        mpu.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        self.parallel_output = parallel_output
        self.parallel_config = config.parallel_config
        self.dense = get_linear_layer(hidden_size, hidden_size, init_method)
        # under sequence parallelism each rank sees s/p tokens: partial grads, summed over TP
        self.dense.weight.sequence_parallel = config.sequence_parallel
        self.dense.bias.sequence_parallel = config.sequence_parallel
        self.layernorm = LayerNorm(
            hidden_size, eps=config.layernorm_epsilon, sequence_parallel=config.sequence_parallel
        )
        self.gelu: Callable[[torch.Tensor], torch.Tensor] = F.gelu
        if config.openai_gelu:
            self.gelu = openai_gelu
        elif config.onnx_safe:
            self.gelu = erf_gelu

    def forward(
        self, hidden_states: torch.Tensor, word_embeddings_weight: torch.Tensor
    ) -> torch.Tensor:
        hidden_states = self.dense(hidden_states)  # [s, b, h]
        hidden_states = self.gelu(hidden_states)
        hidden_states = self.layernorm(hidden_states)
        return parallel_lm_logits(
            hidden_states,
            word_embeddings_weight,
            self.parallel_output,
            self.parallel_config,
            bias=self.bias,
        )  # [s, b, v/p]


def post_language_model_processing(
    lm_output: torch.Tensor,
    pooled_output: torch.Tensor | None,
    lm_head: BertLMHead,
    binary_head: torch.nn.Module | None,
    lm_labels: torch.Tensor | None,
    logit_weights: torch.Tensor,
    fp16_lm_cross_entropy: bool,
):
    """lm_output [s, b, h], pooled [b, h] -> (lm logits [b, s, v/p] or per-token loss
    [b, s] (fp32) when lm_labels [b, s] are given, binary logits [b, 2] or None).

    Labels outside the vocabulary (-1 where nothing is predicted) get the loss
    log(sum exp(logits - max logit)); the caller masks them out with loss_mask.
    """
    lm_logits = lm_head(lm_output, logit_weights)  # [s, b, v/p]
    binary_logits = None
    if binary_head is not None:
        binary_logits = binary_head(pooled_output)  # [b, 2]
    if lm_labels is None:
        return lm_logits.transpose(0, 1).contiguous(), binary_logits  # [b, s, v/p]
    lm_labels = lm_labels.transpose(0, 1).contiguous()  # [s, b]
    if fp16_lm_cross_entropy:
        if lm_logits.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("--fp16-lm-cross-entropy needs half-precision logits")
        lm_loss = mpu.vocab_parallel_cross_entropy(lm_logits, lm_labels)
    else:
        lm_loss = mpu.vocab_parallel_cross_entropy(lm_logits.float(), lm_labels)
    return lm_loss.float().transpose(0, 1).contiguous(), binary_logits  # [b, s]


class BertModel(MegatronModule):
    """BERT language model.

    forward(input_ids [b, s], attention_mask [b, s] (1 = token, 0 = padding),
    tokentype_ids [b, s] or None, lm_labels [b, s] or None) returns
    (per-token masked-LM loss [b, s] fp32, binary logits [b, 2] or None) when lm_labels
    are given, else (lm logits [b, s, v/p], binary logits). On a pipeline stage without
    post_process it returns the hidden states [s, b, h].
    """

    def __init__(
        self,
        config: TransformerConfig,
        num_tokentypes: int = 2,
        add_binary_head: bool = True,
        parallel_output: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(share_word_embeddings=True)
        self.config = config
        self.fp16_lm_cross_entropy = config.fp16_lm_cross_entropy
        self.add_binary_head = add_binary_head
        self.parallel_output = parallel_output
        self.pre_process = pre_process
        self.post_process = post_process
        init_method, scaled_init_method = init_methods(config)
        self.language_model, self._language_model_key = get_language_model(
            config,
            num_tokentypes=num_tokentypes,
            add_pooler=self.add_binary_head,
            encoder_attn_mask_type=AttnMaskType.padding,
            init_method=init_method,
            scaled_init_method=scaled_init_method,
            pre_process=self.pre_process,
            post_process=self.post_process,
        )
        self._word_embeddings_for_head_key = "word_embeddings_for_head"
        self.initialize_word_embeddings(config)
        if self.post_process:
            with init_rng(config.seed, INIT_SALT_HEAD):
                self.lm_head = BertLMHead(
                    self.word_embeddings_weight().size(0), config, init_method, parallel_output
                )
                self._lm_head_key = "lm_head"
                self.binary_head = None
                if self.add_binary_head:
                    self.binary_head = get_linear_layer(config.hidden_size, 2, init_method)
                    self._binary_head_key = "binary_head"

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        tokentype_ids: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
    ):
        extended_attention_mask = bert_extended_attention_mask(attention_mask)  # [b, 1, s, s]
        position_ids = None if input_ids is None else bert_position_ids(input_ids)
        lm_output = self.language_model(
            input_ids, position_ids, extended_attention_mask, tokentype_ids=tokentype_ids
        )
        if not self.post_process:
            return lm_output  # [s, b, h]
        pooled_output = None
        if self.add_binary_head:
            lm_output, pooled_output = lm_output
        return post_language_model_processing(
            lm_output,
            pooled_output,
            self.lm_head,
            self.binary_head,
            lm_labels,
            self.word_embeddings_weight(),
            self.fp16_lm_cross_entropy,
        )

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """Megatron's nesting (see the module docstring)."""
        state_dict_: dict = {
            self._language_model_key: self.language_model.state_dict_for_save_checkpoint(
                keep_vars=keep_vars
            )
        }
        if self.post_process:
            state_dict_[self._lm_head_key] = self.lm_head.state_dict_for_save_checkpoint(
                keep_vars=keep_vars
            )
            if self.add_binary_head:
                state_dict_[self._binary_head_key] = self.binary_head.state_dict(
                    keep_vars=keep_vars
                )
        if self.post_process and not self.pre_process:
            state_dict_[self._word_embeddings_for_head_key] = self.word_embeddings.state_dict(
                keep_vars=keep_vars
            )
        return state_dict_

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load the nested checkpoint layout or the flat state_dict()."""
        return load_model_state_dict(self, state_dict, strict=strict)
