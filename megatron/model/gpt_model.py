"""GPT: a causal TransformerLanguageModel with the output head tied to the word
embeddings (logits = h E^T) and the vocabulary-parallel cross entropy. With
--untie-embeddings-and-output-weights the logits are h W^T with the last stage's own
`language_model.output_layer.weight` W, and nothing is tied across pipeline stages.

The LLaMA family is this model with options (see TransformerConfig): RoPE
(use_rotary_position_embeddings, no learned positions), SwiGLU MLP, RMSNorm,
grouped-query attention (num_key_value_heads), untied output weights and no linear
biases (add_bias_linear False).

Checkpoint layout (state_dict_for_save_checkpoint): {'language_model': {...}} as in
language_model.py, plus {'word_embeddings_for_head': {'weight'}} on a last pipeline
stage that is not also the first (its copy of the tied embeddings), as Megatron writes.
In the flat state_dict() that copy is `word_embeddings.weight`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType
from .language_model import get_language_model, load_model_state_dict, parallel_lm_logits
from .module import MegatronModule
from .utils import init_methods


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss -log softmax(logits)[label]; logits [s, b, v/p], labels [s, b].

    With one tensor-parallel rank this is torch's cross entropy on the logits as they
    are (no transposed or extra [s, b, v] copies); otherwise the vocab-parallel one.
    """
    if mpu.get_tensor_model_parallel_world_size() == 1:
        vocab = logits.size(-1)
        loss = F.cross_entropy(logits.view(-1, vocab), labels.reshape(-1), reduction="none")
        return loss.view(labels.shape)
    return mpu.vocab_parallel_cross_entropy(logits, labels)


def post_language_model_processing(
    lm_output: torch.Tensor,
    labels: torch.Tensor | None,
    logit_weights: torch.Tensor,
    parallel_output: bool,
    fp16_lm_cross_entropy: bool,
    config: mpu.ParallelConfig,
) -> torch.Tensor:
    """lm_output [s, b, h] -> logits [b, s, v/p] (labels None) or loss [b, s] (fp32)."""
    output = parallel_lm_logits(lm_output, logit_weights, parallel_output, config)  # [s, b, v/p]
    if labels is None:
        return output.transpose(0, 1).contiguous()  # [b, s, v/p]
    labels_sb = labels.transpose(0, 1).contiguous()  # [s, b]
    if fp16_lm_cross_entropy:
        if output.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("--fp16-lm-cross-entropy needs half-precision logits")
        loss = lm_cross_entropy(output, labels_sb)
    else:
        loss = lm_cross_entropy(output.float(), labels_sb)
    return loss.float().transpose(0, 1).contiguous()  # [b, s]


class GPTModel(MegatronModule):
    """GPT language model.

    forward(input_ids [b, s], position_ids [b, s], attention_mask [1 or b, 1, s, s]
    (True = masked), labels [b, s] or None) -> loss [b, s] (fp32, per token) when labels
    are given, else logits [b, s, v/p] (or [b, s, v] without parallel output). On a
    pipeline stage without post_process it returns the hidden states [s, b, h].
    """

    def __init__(
        self,
        config: TransformerConfig,
        num_tokentypes: int = 0,
        parallel_output: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(share_word_embeddings=not config.untie_embeddings_and_output_weights)
        self.config = config
        self.parallel_output = parallel_output
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = config.fp16_lm_cross_entropy
        init_method, scaled_init_method = init_methods(config)
        self.language_model, self._language_model_key = get_language_model(
            config,
            num_tokentypes=num_tokentypes,
            add_pooler=False,
            encoder_attn_mask_type=AttnMaskType.causal,
            init_method=init_method,
            scaled_init_method=scaled_init_method,
            pre_process=self.pre_process,
            post_process=self.post_process,
        )
        self._word_embeddings_for_head_key = "word_embeddings_for_head"
        if self.share_word_embeddings:
            self.initialize_word_embeddings(config)

    def output_weight(self) -> torch.Tensor:
        """The weight of the logits h W^T [v/p, h]: the untied output layer's, or the
        (tied) word embeddings."""
        if self.share_word_embeddings:
            return self.word_embeddings_weight()
        return self.language_model.output_layer.weight

    def set_input_tensor(self, input_tensor) -> None:
        """Input from the previous pipeline stage."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        tokentype_ids: torch.Tensor | None = None,
        layer_past=None,
        get_key_value: bool = False,
        forward_method_parallel_output: bool | None = None,
        curriculum_seqlen: int | None = None,
    ):
        if curriculum_seqlen is not None:
            # DeepSpeed curriculum learning: train on the first curriculum_seqlen tokens
            input_ids, position_ids, labels, tokentype_ids = (
                None if t is None else t[:, :curriculum_seqlen].contiguous()
                for t in (input_ids, position_ids, labels, tokentype_ids)
            )
            if attention_mask is not None:
                attention_mask = attention_mask[
                    :, :, :curriculum_seqlen, :curriculum_seqlen
                ].contiguous()

        lm_output = self.language_model(
            input_ids,
            position_ids,
            attention_mask,
            tokentype_ids=tokentype_ids,
            layer_past=layer_past,
            get_key_value=get_key_value,
        )
        if not self.post_process:
            return lm_output
        if get_key_value:
            lm_output, presents = lm_output
        parallel_output = self.parallel_output
        if forward_method_parallel_output is not None:
            parallel_output = forward_method_parallel_output
        output = post_language_model_processing(
            lm_output,
            labels,
            self.output_weight(),
            parallel_output,
            self.fp16_lm_cross_entropy,
            self.config.parallel_config,
        )
        if get_key_value:
            output = [output, presents]
        elif max(self.config.num_experts or [1]) > 1:
            from .moe import moe_aux_loss  # DeepSpeed MoE: (output, summed aux loss)

            return output, moe_aux_loss(self)
        return output

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """{'language_model': nested, 'word_embeddings_for_head': {'weight'} (last stage
        with PP > 1)}."""
        state_dict_ = {
            self._language_model_key: self.language_model.state_dict_for_save_checkpoint(
                keep_vars=keep_vars
            )
        }
        if self.post_process and not self.pre_process and self.share_word_embeddings:
            state_dict_[self._word_embeddings_for_head_key] = self.word_embeddings.state_dict(
                keep_vars=keep_vars
            )
        return state_dict_

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load the nested checkpoint layout or the flat state_dict()."""
        return load_model_state_dict(self, state_dict, strict=strict)
