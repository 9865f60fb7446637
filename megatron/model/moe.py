"""Mixture-of-Experts MLPs through DeepSpeed's MoE layer (--num-experts > 1).

A MoE transformer layer replaces its ParallelMLP by `MoEMLP`, a deepspeed.moe.layer.MoE
whose experts are ParallelMLPs (tensor-parallel like the dense MLP). For tokens x:

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
Checkpoint keys are Megatron-DeepSpeed's: `mlp.deepspeed_moe.gate.wg.weight`,
`mlp.deepspeed_moe.experts.deepspeed_experts.{i}.dense_h_to_4h.weight`, ...
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from deepspeed.moe.layer import MoE

from megatron import mpu

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
    """A ParallelMLP returning one tensor, gelu(X A + a) B + b, as DeepSpeed's experts
    must (the bias is added here, not dropped)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, bias = super().forward(hidden_states)
        return output + bias


class MoEMLP(MoE):
    """deepspeed.moe.layer.MoE used where a ParallelMLP is: forward(h [s, b, h]) ->
    (output [s, b, h], zero bias [h]); the layer's aux loss is kept in `l_aux` for
    moe_aux_loss()."""

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output, l_aux, _ = super().forward(hidden_states)
        self.l_aux = l_aux
        return output, self.zero_bias


def build_moe_mlp(
    config: TransformerConfig,
    init_method: Callable,
    output_layer_init_method: Callable,
    num_experts: int,
) -> MoEMLP:
    """The MoE MLP of one layer: a MoEMLP over `num_experts` ExpertMLPs."""
    expert = ExpertMLP(config, init_method, output_layer_init_method)
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
        enable_expert_tensor_parallelism=mpu.get_tensor_model_parallel_world_size() > 1,
    )
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
