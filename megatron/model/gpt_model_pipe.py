"""GPTModelPipe: GPT as a DeepSpeed PipelineModule (--deepspeed, pipeline size > 1).

The model is the same stack as GPTModel, written as a list of layer specs that DeepSpeed
partitions over the pipeline stages (transformer layers balanced across stages):

    TiedLayerSpec('embed', EmbeddingPipe)     (tokens, position ids, mask) -> (h [s, b, h], mask)
    LayerSpec(ParallelTransformerLayerPipe)   x num_layers: (h, mask) -> (h, mask)
    LayerSpec(FinalLayerNormPipe)             (h, mask) -> LN(h)
    TiedLayerSpec('embed', EmbeddingPipe, forward_fn=lm_logits)   h -> logits [s, b, v/p]
    loss_fn                                   masked mean of the per-token cross entropy

The two 'embed' specs share the word embeddings E (logits = h E^T): DeepSpeed builds the
module on the first and on the last stage, broadcasts E from the first, and sums the two
gradients before each step. With --untie-embeddings-and-output-weights the first spec is a
plain LayerSpec(EmbeddingPipe) and the head is LayerSpec(OutputLayerPipe) with its own
weight `output_layer.weight` (logits = h W^T); with --normalization rmsnorm the final norm
is FinalRMSNormPipe. RoPE, SwiGLU, GQA and --disable-bias-linear live inside the
transformer layers. Each component is built under the same init seed as in
GPTModel (model/utils.py init_rng), so both models start from the same weights and the
pipeline's losses equal GPTModel's.

Micro-batches come from the data iterator through `_megatron_batch_fn` (set by
pretrain_gpt.py): sample -> ((tokens, position_ids, attention_mask), (labels, loss_mask)).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType
from .fused_layer_norm import MixedFusedLayerNorm as LayerNorm
from .gpt_model import lm_cross_entropy
from .language_model import Embedding, build_output_layer, parallel_lm_logits
from .rmsnorm import RMSNorm
from .transformer import ParallelTransformerLayer
from .utils import (
    INIT_SALT_EMBEDDING,
    INIT_SALT_OUTPUT_LAYER,
    init_methods,
    init_rng,
    layer_init_salt,
)


class EmbeddingPipe(Embedding):
    """The embedding stage: (input_ids [b, s], position_ids [b, s], attention_mask) ->
    (hidden [s, b, h], attention_mask). Also the tied output head (lm_logits)."""

    def __init__(self, config: TransformerConfig, init_method: Callable, num_tokentypes: int = 0):
        with init_rng(config.seed, INIT_SALT_EMBEDDING):
            super().__init__(config, init_method, num_tokentypes)

    @property
    def word_embeddings_weight(self) -> torch.nn.Parameter:
        """E [v/p, h], the weight tied between input embedding and output head."""
        return self.word_embeddings.weight

    def forward(self, inputs):
        input_ids, position_ids, attention_mask = inputs
        return super().forward(input_ids, position_ids), attention_mask


class ParallelTransformerLayerPipe(ParallelTransformerLayer):
    """A transformer layer on (hidden [s, b, h], attention_mask) tuples."""

    def __init__(
        self,
        config: TransformerConfig,
        init_method: Callable,
        output_layer_init_method: Callable,
        layer_number: int,
    ):
        with init_rng(config.seed, layer_init_salt(layer_number)):
            super().__init__(
                config,
                init_method,
                output_layer_init_method,
                layer_number,
                self_attn_mask_type=AttnMaskType.causal,
            )

    def forward(self, inputs):
        hidden_states, attention_mask = inputs
        return super().forward(hidden_states, attention_mask), attention_mask


class FinalLayerNormPipe(LayerNorm):
    """The final layer norm; drops the attention mask: (h, mask) -> LN(h) [s, b, h]."""

    def __init__(self, config: TransformerConfig):
        super().__init__(
            config.hidden_size,
            eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel,
        )

    def forward(self, inputs):
        hidden_states = inputs[0] if isinstance(inputs, tuple) else inputs
        return super().forward(hidden_states)


class FinalRMSNormPipe(RMSNorm):
    """The final RMSNorm (--normalization rmsnorm): (h, mask) -> RMSNorm(h) [s, b, h]."""

    def __init__(self, config: TransformerConfig):
        super().__init__(
            config.hidden_size,
            eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel,
        )

    def forward(self, inputs):
        hidden_states = inputs[0] if isinstance(inputs, tuple) else inputs
        return super().forward(hidden_states)


class OutputLayerPipe(torch.nn.Module):
    """The untied head: hidden [s, b, h] -> logits h W^T [s, b, v/p], W = output_layer."""

    def __init__(self, config: TransformerConfig, init_method: Callable):
        super().__init__()
        with init_rng(config.seed, INIT_SALT_OUTPUT_LAYER):
            self.output_layer = build_output_layer(config, init_method)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return parallel_lm_logits(
            hidden_states, self.output_layer.weight, True, self.output_layer.config
        )


def lm_logits(embedding: EmbeddingPipe, hidden_states: torch.Tensor) -> torch.Tensor:
    """The tied head: hidden [s, b, h] -> logits h E^T [s, b, v/p]."""
    return parallel_lm_logits(
        hidden_states, embedding.word_embeddings_weight, True, embedding.parallel_config
    )


def gpt_pipe_loss(logits: torch.Tensor, labels: Tuple[torch.Tensor, torch.Tensor]):
    """Masked mean cross entropy: logits [s, b, v/p], labels ([b, s], loss mask [b, s])."""
    labels_bs, loss_mask = labels
    losses = lm_cross_entropy(logits.float(), labels_bs.transpose(0, 1).contiguous())  # [s, b]
    losses = losses.transpose(0, 1).contiguous().view(-1)  # [b * s]
    loss_mask = loss_mask.reshape(-1).float()
    return torch.sum(losses * loss_mask) / loss_mask.sum()


def _checkpoint_func(distribute: bool) -> Callable:
    def checkpoint(function, *args):
        return mpu.checkpoint(function, distribute, *args)

    return checkpoint


def _embedding_spec(config, init_method, num_tokentypes: int, untied: bool):
    """The first stage's embedding: tied to the head ('embed') unless untied."""
    if untied:
        return LayerSpec(EmbeddingPipe, config, init_method, num_tokentypes)
    return TiedLayerSpec(
        "embed",
        EmbeddingPipe,
        config,
        init_method,
        num_tokentypes,
        tied_weight_attr="word_embeddings_weight",
    )


class GPTModelPipe(PipelineModule):
    """GPT for DeepSpeed's pipeline engine (see the module docstring)."""

    def __init__(
        self, config: TransformerConfig, num_tokentypes: int = 0, parallel_output: bool = True
    ):
        if not parallel_output:
            raise ValueError("GPTModelPipe: the pipeline loss needs parallel_output=True")
        if max(config.num_experts or [1]) > 1:
            raise ValueError(
                "GPTModelPipe: --num-experts > 1 is not supported with DeepSpeed's "
                "pipeline engine; use --pipeline-model-parallel-size 1"
            )
        init_method, output_init = init_methods(config)
        untied = config.untie_embeddings_and_output_weights
        specs = [_embedding_spec(config, init_method, num_tokentypes, untied)]
        for layer_number in range(1, config.num_layers + 1):
            specs.append(
                LayerSpec(
                    ParallelTransformerLayerPipe, config, init_method, output_init, layer_number
                )
            )
        final_norm = FinalRMSNormPipe if config.normalization == "rmsnorm" else FinalLayerNormPipe
        specs.append(LayerSpec(final_norm, config))
        if untied:
            specs.append(LayerSpec(OutputLayerPipe, config, init_method))
        else:
            specs.append(
                TiedLayerSpec(
                    "embed",
                    EmbeddingPipe,
                    config,
                    init_method,
                    num_tokentypes,
                    forward_fn=lm_logits,
                    tied_weight_attr="word_embeddings_weight",
                )
            )
        topology = PipeModelDataParallelTopology(
            num_pp=mpu.get_pipeline_model_parallel_world_size(),
            num_mp=mpu.get_tensor_model_parallel_world_size(),
            num_dp=mpu.get_data_parallel_world_size(),
        )
        interval = 0
        if config.recompute_granularity == "full":
            if config.recompute_method == "block":
                raise ValueError(
                    "--recompute-method block is not available with DeepSpeed's pipeline "
                    "engine (it recomputes every activation_checkpoint_interval layers): use "
                    "--recompute-method uniform, or --no-pipeline-parallel"
                )
            interval = config.recompute_num_layers
        super().__init__(
            layers=specs,
            loss_fn=gpt_pipe_loss,
            topology=topology,
            partition_method="type:transformer",
            activation_checkpoint_interval=interval,
            activation_checkpoint_func=_checkpoint_func(config.distribute_saved_activations),
            checkpointable_layers=["ParallelTransformerLayerPipe"],
        )
        self.config = config


__all__ = [
    "GPTModelPipe",
    "EmbeddingPipe",
    "ParallelTransformerLayerPipe",
    "FinalLayerNormPipe",
    "FinalRMSNormPipe",
    "OutputLayerPipe",
    "gpt_pipe_loss",
    "lm_logits",
]
