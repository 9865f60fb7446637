"""Gradient norm, clipping and zero counting over a model split by tensor/pipeline parallelism.

Each rank of the model-parallel group (TP x PP) holds a part of the gradients of one model
replica. The global p-norm is

    ||g||_p = ( sum over model-parallel ranks of sum_i |g_i|^p )^(1/p)

where every gradient element of the *whole* model must be counted exactly once:

- a tensor-parallel *duplicate* (a param without ``tensor_model_parallel=True``, e.g. layer
  norms and row-parallel biases, identical on every TP rank) counts on TP rank 0 only;
- a *shared* param (``shared=True``, the copy of the tied word embedding on the last pipeline
  stage) is not counted, since the first stage counts the original.

Every gradient is still scaled by the clipping coefficient, duplicates included.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch

from megatron import mpu
from megatron.model.module import param_is_not_shared


def _model_parallel_group(group):
    """The group to reduce over, or None in a single process."""
    if group is not None:
        return group
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return mpu.get_model_parallel_group()


def _split_grads(parameters) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(all grads, grads to count in the norm) of the params that have one."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads, grads_for_norm = [], []
    for param in parameters:
        if param.grad is None:
            continue
        grad = param.grad.detach()
        grads.append(grad)
        if param_is_not_shared(param) and mpu.param_is_not_tensor_parallel_duplicate(param):
            grads_for_norm.append(grad)
    return grads, grads_for_norm


def _local_norm_power(grads: List[torch.Tensor], norm_type: float, device) -> torch.Tensor:
    """sum_i ||g_i||_p^p over this rank's counted grads, as a 1-element fp32 tensor."""
    total = torch.zeros(1, dtype=torch.float, device=device)
    if not grads:
        return total
    norms = torch._foreach_norm([g.float() for g in grads], norm_type)
    return total + torch.stack(norms).pow(norm_type).sum()


def clip_grad_norm_fp32(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float | int | str = 2,
    model_parallel_group: torch.distributed.ProcessGroup | None = None,
) -> float:
    """Clip the grads of ``parameters`` in place so that the global norm is <= ``max_norm``.

    The norm is taken over the model-parallel group (see the module docstring); with
    coefficient c = max_norm / (norm + 1e-6), every grad is multiplied by c when c < 1.
    ``norm_type`` is a positive number or ``inf``. Returns the total norm before clipping.
    """
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"clip_grads.py: norm_type must be > 0 or inf, got {norm_type}")
    grads, grads_for_norm = _split_grads(parameters)
    from megatron.accelerator import current_device

    device = grads[0].device if grads else current_device()
    group = _model_parallel_group(model_parallel_group)

    if math.isinf(norm_type):
        total = torch.zeros(1, dtype=torch.float, device=device)
        if grads_for_norm:
            total = total + torch.stack([g.abs().max().float() for g in grads_for_norm]).max()
        if group is not None:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=group)
        total_norm = total.item()
    else:
        total = _local_norm_power(grads_for_norm, norm_type, device)
        if group is not None:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
        total_norm = total.item() ** (1.0 / norm_type)

    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)
    return total_norm


def count_zeros_fp32(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    model_parallel_group: torch.distributed.ProcessGroup | None = None,
) -> int:
    """Number of exactly-zero gradient elements in the whole model (same counting rules)."""
    grads, grads_for_norm = _split_grads(parameters)
    from megatron.accelerator import current_device

    device = grads[0].device if grads else current_device()
    total = torch.zeros(1, dtype=torch.int64, device=device)  # exact for any model size
    for grad in grads_for_norm:
        total += grad.numel() - torch.count_nonzero(grad)
    group = _model_parallel_group(model_parallel_group)
    if group is not None:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    return int(total.item())
