"""Mixture-of-Experts MLPs through DeepSpeed's MoE layer (--num-experts > 1).

A MoE transformer layer replaces its ParallelMLP by `MoEMLP`, a deepspeed.moe.layer.MoE
whose experts are ParallelMLPs (tensor-parallel like the dense MLP; SwiGLU experts
with --swiglu, bias-free ones with --disable-bias-linear). For tokens x:

    gate:    p = softmax(x W_g),  expert e(x) = top-k of p (k = --topk), each expert
             taking at most C = max(min_capacity, capacity_factor * tokens / experts)
             tokens (the rest are dropped unless --disable-moe-token-dropping);
    output:  y = sum over the chosen experts of p_e(x) * expert_e(x);
    PR-MoE (--mlp-type residual): y = c_0(x) * mlp(x) + c_1(x) * y_moe, c = softmax(x W_c);
    aux:     l_aux = experts * sum_e (fraction of tokens routed to e) * (mean gate prob
             of e), the load-balancing loss; the model adds --moe-loss-coeff x the sum of
             l_aux over its MoE layers to the LM loss.

With --moe-expert-parallel-size ep the experts are spread over ep data-parallel ranks
(all-to-all of the routed tokens); the engine creates the expert groups and reduces the
expert gradients over the expert-data-parallel group only. Every --expert-interval-th
layer is a MoE layer; --num-experts gives one count or one per MoE layer (pyramid).
With tensor parallelism (TP = t > 1) the experts are tensor-parallel too (DeepSpeed's
expert tensor parallelism): every TP rank routes the same tokens, DeepSpeed keeps a 1/t
share of each expert's capacity slots per rank for the (expert-parallel) all-to-all and
gathers them back, so the capacity must be a multiple of t. DeepSpeed rounds it up only
when the experts are not tensor-parallel; `_capacity_multiple_of` rounds it up here
after the gate, adding empty slots only, so routing and outputs equal those at TP=1.
DeepSpeed deep-copies the expert module per local expert, and a deep copy of a
parameter loses its `tensor_model_parallel` / `partition_dim` / `partition_stride`
attributes; `_copy_tensor_parallel_attributes` puts them back, or the gradient norm (and
so clipping) would count the split expert weights of TP rank 0 only.
With --sequence-parallel each TP rank holds other tokens ([s/t, b, h]), but the
expert tensor parallelism above needs the same tokens on every TP rank: `MoEMLP`
all-gathers the sequence first (its backward keeps this rank's chunk: the gradient on
the gathered tokens is complete on every rank, not a partial sum) and returns this
rank's chunk of the output (backward: all-gather). The gate then routes the whole
sequence on every rank, as without sequence parallelism, so its weight gradient needs
no sum over the TP group (it is not marked `sequence_parallel`), and the experts are
built without sequence parallelism (their GEMMs see the gathered tokens).
On gloo, DeepSpeed's token all-gather (a [e, c/t, m] input into a flat buffer) is refused
by torch; `_use_gloo_token_gather` gives DeepSpeed an all-gather over a list of
[e, c/t, m] tensors instead (same result, NCCL keeps DeepSpeed's own).
Checkpoint keys are Megatron-DeepSpeed's: `mlp.deepspeed_moe.gate.wg.weight`,
`mlp.deepspeed_moe.experts.deepspeed_experts.{i}.dense_h_to_4h.weight`, ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Tuple

import torch
from deepspeed.moe.layer import MoE

from megatron import mpu
from megatron.mpu.layers import copy_tensor_model_parallel_attributes

from .config import TransformerConfig
from .transformer import ParallelMLP


def num_experts_for_layer(config: TransformerConfig, layer_number: int) -> int:
    """Experts of the layer with global 1-based number `layer_number` (1 = dense).

    Layers expert_interval, 2 * expert_interval, ... are MoE layers; the i-th of them
    has num_experts[i] experts (or num_experts[0] when one value is given).
    """
    experts = list(config.num_experts or [1])
    if max(experts) <= 1 or layer_number % config.expert_interval != 0:
        return 1
    index = layer_number // config.expert_interval - 1
    return experts[0] if len(experts) == 1 else experts[index]


class ExpertMLP(ParallelMLP):
    """A ParallelMLP returning one tensor, gelu(X A + a) B + b, or with config.swiglu
    (silu(X G) * (X U)) B with G and U one fused GEMM split with stride 2 (ParallelMLP),
    as DeepSpeed's experts must (the bias, if any, is added here, not dropped)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, bias = super().forward(hidden_states)
        return output if bias is None else output + bias


class MoEMLP(MoE):
    """deepspeed.moe.layer.MoE used where a ParallelMLP is: forward(h [s, b, h]) ->
    (output [s, b, h], zero bias [h]); the layer's aux loss is kept in `l_aux` for
    moe_aux_loss(). With `sequence_parallel` the input and output are [s/t, b, h] and
    the experts run on the gathered [s, b, h] (see the module docstring)."""

    sequence_parallel = False

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.sequence_parallel:  # [s/t, b, h] -> [s, b, h], the same on every TP rank
            hidden_states = mpu.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        output, l_aux, _ = super().forward(hidden_states)
        if self.sequence_parallel:
            output = mpu.scatter_to_sequence_parallel_region(output)  # [s/t, b, h]
        self.l_aux = l_aux
        return output, self.zero_bias


def _capacity_multiple_of(multiple: int) -> Callable:
    """A forward hook for a DeepSpeed TopKGate: round the capacity C in its output
    (l_aux, C, experts, indices, locations, gates, counts) up to a multiple of `multiple`.

    The routes stay as the gate chose them (dropped ones keep expert index -1 and the
    kept ones their slots below the old C), so the extra slots stay empty.
    """

    def hook(module: torch.nn.Module, inputs: Any, output: Tuple) -> Tuple:
        if not isinstance(output, tuple) or len(output) != 7:
            return output  # the dense (non-sparse-route) gate output has no capacity
        capacity = int(output[1])
        padded = -(-capacity // multiple) * multiple
        return output if padded == capacity else (output[0], padded) + tuple(output[2:])

    return hook


def _copy_tensor_parallel_attributes(expert: torch.nn.Module, layer: MoE) -> None:
    """Give every copy of `expert` in `layer` the split attributes of `expert`'s
    parameters (parameter names match: the copies are deep copies of `expert`)."""
    template = dict(expert.named_parameters())
    for replica in layer.deepspeed_moe.experts.deepspeed_experts:
        for name, param in replica.named_parameters():
            copy_tensor_model_parallel_attributes(param, template[name])


def _gather_tokens_list(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` of `input_` from every tensor-parallel rank, in rank
    order (DeepSpeed's _gather_tokens contract), through a list all-gather gloo accepts."""
    world_size = mpu.get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    parts = [torch.empty_like(input_) for _ in range(world_size)]
    torch.distributed.all_gather(parts, input_, group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _use_gloo_token_gather() -> None:
    """On a gloo tensor-parallel group, route DeepSpeed's MoE token gather (forward of
    gather_tokens, backward of drop_tokens) through `_gather_tokens_list`."""
    from deepspeed.moe import mappings

    group = mpu.get_tensor_model_parallel_group()
    if torch.distributed.get_backend(group) == "gloo":
        mappings._gather_tokens = _gather_tokens_list


def build_moe_mlp(
    config: TransformerConfig,
    init_method: Callable,
    output_layer_init_method: Callable,
    num_experts: int,
) -> MoEMLP:
    """The MoE MLP of one layer: a MoEMLP over `num_experts` ExpertMLPs (SwiGLU ones
    with config.swiglu, without biases with config.add_bias_linear False)."""
    tp = mpu.get_tensor_model_parallel_world_size()
    sequence_parallel = config.sequence_parallel and tp > 1
    expert_config = dataclasses.replace(config, sequence_parallel=False)
    expert = ExpertMLP(expert_config, init_method, output_layer_init_method)
    layer = MoEMLP(
        config.hidden_size,
        expert,
        num_experts=num_experts,
        ep_size=config.moe_expert_parallel_size,
        k=config.topk,
        capacity_factor=config.moe_train_capacity_factor,
        eval_capacity_factor=config.moe_eval_capacity_factor,
        min_capacity=config.moe_min_capacity,
        use_residual=config.mlp_type == "residual",
        drop_tokens=config.moe_token_dropping,
        enable_expert_tensor_parallelism=tp > 1,
    )
    layer.sequence_parallel = sequence_parallel
    _copy_tensor_parallel_attributes(expert, layer)
    if tp > 1:
        layer.deepspeed_moe.gate.register_forward_hook(_capacity_multiple_of(tp))
        _use_gloo_token_gather()
    layer.register_buffer(
        "zero_bias", torch.zeros(config.hidden_size, dtype=config.params_dtype), persistent=False
    )
    layer.l_aux = None
    return layer


def moe_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The MoE MLPs of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """Sum of the aux losses of the last forward over the MoE layers (None without any)."""
    cached = getattr(model, "_moe_layers", None)
    if cached is None:
        cached = moe_layers(model)
        model._moe_layers = cached
    losses = [m.l_aux for m in cached if m.l_aux is not None]
    if not losses:
        return None
    return torch.stack([loss.float().reshape(()) for loss in losses]).sum()
