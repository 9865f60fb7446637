"""The model a layout is planned for: its shape from the training flags, and the
parameters one GPU holds, counted on the meta device or by the closed form.

Closed form, one tensor-parallel rank of t (d = kv_channels, a heads, g key/value heads,
f = ffn hidden size, k = 2 with SwiGLU (gate and up in one GEMM) else 1, V the padded
vocabulary):

    layer    = h(a + 2g)d/t  [QKV]  + a d h/t  [dense]  + k h f/t  [h -> f]  + f h/t  [f -> h]
               + biases (a + 2g)d/t + h + k f/t + h     (unless --disable-bias-linear)
               + two norms, 2h each (LayerNorm weight and bias) or h each (RMSNorm)
    stage 0  += V h/t [word embeddings] + max_positions h [learned positions]
    last     += final norm; V h/t [head] when untied, or the tied copy when pp > 1

A MoE layer (every --expert-interval-th) replaces its MLP by E experts of that MLP and a
gate h E; one GPU holds E/ep of the experts (ep = --moe-expert-parallel-size).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field

from megatron.tokenizer.tokenizer import vocab_size_with_padding


@dataclass(frozen=True)
class ModelShape:
    """A GPT or LLaMA-style model as pretrain_gpt.py's flags describe it."""

    num_layers: int
    """Transformer layers L."""
    hidden: int
    """Hidden size h."""
    heads: int
    """Attention heads a."""
    seq: int
    """Sequence length s."""
    vocab: int
    """Tokenizer vocabulary before padding."""
    kv_heads: int | None = None
    """Key/value heads g (grouped-query attention); a when None."""
    kv_channels: int | None = None
    """Per-head width d; h / a when None."""
    ffn: int | None = None
    """MLP inner width f; 4h (GPT) when None."""
    swiglu: bool = False
    """Gated MLP: the h -> f GEMM is 2f wide."""
    untied: bool = False
    """--untie-embeddings-and-output-weights: the head has its own V x h weight."""
    learned_positions: bool = True
    """Learned absolute position embeddings (off with RoPE / --no-position-embedding)."""
    max_positions: int = 0
    """--max-position-embeddings (rows of the position table)."""
    rmsnorm: bool = False
    """RMSNorm (weight only) instead of LayerNorm (weight and bias)."""
    linear_bias: bool = True
    """Biases in the attention and MLP linear layers."""
    divisible_by: int = 128
    """--make-vocab-size-divisible-by."""
    num_experts: tuple = (1,)
    """--num-experts: one count or one per MoE layer."""
    expert_interval: int = 2
    """Every expert_interval-th layer is a MoE layer."""
    topk: int = 1
    """Experts each token is routed to."""
    extra: dict = field(default_factory=dict, compare=False)
    """Free-form notes (where the vocabulary came from)."""

    @property
    def g(self) -> int:
        return self.kv_heads or self.heads

    @property
    def d(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def f(self) -> int:
        return self.ffn or 4 * self.hidden

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary the model is built with at tensor-parallel size tp."""
        return vocab_size_with_padding(self.vocab, self.divisible_by, tp, log=False)

    def experts_of_layer(self, layer_number: int) -> int:
        """Experts of the 1-based layer `layer_number` (1: a dense MLP)."""
        experts = list(self.num_experts)
        if max(experts) <= 1 or layer_number % self.expert_interval != 0:
            return 1
        index = layer_number // self.expert_interval - 1
        return experts[0] if len(experts) == 1 else experts[index]

    @property
    def has_moe(self) -> bool:
        return max(self.num_experts) > 1


def shape_from_args(args: argparse.Namespace, vocab: int) -> ModelShape:
    """The ModelShape of validated arguments; `vocab` is the tokenizer's size."""
    return ModelShape(
        num_layers=args.num_layers,
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        seq=args.seq_length,
        vocab=vocab,
        kv_heads=args.num_key_value_heads,
        kv_channels=args.kv_channels,
        ffn=args.ffn_hidden_size,
        swiglu=bool(args.swiglu),
        untied=bool(args.untie_embeddings_and_output_weights),
        learned_positions=bool(getattr(args, "add_position_embedding", True))
        and not args.use_rotary_position_embeddings,
        max_positions=args.max_position_embeddings,
        rmsnorm=args.normalization == "rmsnorm",
        linear_bias=bool(getattr(args, "add_bias_linear", True)),
        divisible_by=args.make_vocab_size_divisible_by,
        num_experts=tuple(args.num_experts or [1]),
        expert_interval=args.expert_interval,
        topk=getattr(args, "topk", 1) or 1,
    )


def mlp_params(m: ModelShape, tp: int) -> int:
    """One (dense or expert) MLP on one tensor-parallel rank."""
    k = 2 if m.swiglu else 1
    weights = k * m.hidden * m.f // tp + m.f * m.hidden // tp
    biases = (k * m.f // tp + m.hidden) if m.linear_bias else 0
    return weights + biases


def attention_params(m: ModelShape, tp: int) -> int:
    """Self-attention (QKV and dense) on one tensor-parallel rank."""
    qkv = (m.heads + 2 * m.g) * m.d
    weights = m.hidden * qkv // tp + m.heads * m.d * m.hidden // tp
    biases = (qkv // tp + m.hidden) if m.linear_bias else 0
    return weights + biases


def norm_params(m: ModelShape) -> int:
    return m.hidden if m.rmsnorm else 2 * m.hidden


def layer_params(m: ModelShape, tp: int, layer_number: int = 1, ep: int = 1) -> int:
    """Transformer layer `layer_number` (1-based) on one GPU of tp x ep."""
    experts = m.experts_of_layer(layer_number)
    if experts > 1:
        mlp = (experts // ep) * mlp_params(m, tp) + m.hidden * experts  # experts + gate
    else:
        mlp = mlp_params(m, tp)
    return attention_params(m, tp) + mlp + 2 * norm_params(m)


def stage_layers(m: ModelShape, pp: int, rank: int) -> range:
    """1-based layer numbers of pipeline stage `rank` (equal stages)."""
    per = m.num_layers // pp
    return range(rank * per + 1, (rank + 1) * per + 1)


def closed_form_params(
    m: ModelShape, tp: int = 1, pp: int = 1, rank: int = 0, ep: int = 1
) -> int:
    """Parameters on one GPU of pipeline stage `rank` (module docstring)."""
    v = m.padded_vocab(tp)
    total = sum(layer_params(m, tp, n, ep) for n in stage_layers(m, pp, rank))
    if rank == 0:
        total += v * m.hidden // tp
        if m.learned_positions:
            total += m.max_positions * m.hidden
    if rank == pp - 1:
        total += norm_params(m)
        if m.untied or pp > 1:
            total += v * m.hidden // tp
    return total


def expert_params(m: ModelShape, tp: int = 1, pp: int = 1, rank: int = 0, ep: int = 1) -> int:
    """The expert weights among closed_form_params (reduced over DP / ep only)."""
    return sum(
        (m.experts_of_layer(n) // ep) * mlp_params(m, tp)
        for n in stage_layers(m, pp, rank)
        if m.experts_of_layer(n) > 1
    )


def meta_params(
    args: argparse.Namespace, m: ModelShape, tp: int = 1, pp: int = 1, rank: int = 0, ep: int = 1
) -> int:
    """Parameters on one GPU counted by building the model on the meta device.

    The dense model is built (megatron.model.utils.count_parameters_on_meta); DeepSpeed's
    MoE layer needs its expert process groups to be built, so a MoE model's experts are
    added by the closed form (mlp_params per local expert, the gate h x E)."""
    from megatron.model.utils import count_parameters_on_meta

    dense = copy.copy(args)
    dense.num_experts = [1]
    dense.padded_vocab_size = m.padded_vocab(tp)
    dense.tensor_model_parallel_size = tp
    dense.pipeline_model_parallel_size = pp
    dense.sequence_parallel = False
    dense.num_key_value_heads = m.g
    count = count_parameters_on_meta(
        dense,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_rank=rank,
    )
    for n in stage_layers(m, pp, rank):
        experts = m.experts_of_layer(n)
        if experts > 1:
            count += (experts // ep - 1) * mlp_params(m, tp) + m.hidden * experts
    return count


def dense_equivalent(m: ModelShape) -> ModelShape:
    """The same model with every MoE layer dense (its FLOPs with top-1 routing)."""
    return dataclasses.replace(m, num_experts=(1,))
