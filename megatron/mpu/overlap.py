"""Tensor-parallel GEMMs overlapped with their sequence-parallel communication
(`--tp-comm-overlap`, with `--sequence-parallel`).

Under sequence parallelism every column-parallel GEMM starts with an all-gather of its
input along the sequence and every row-parallel GEMM ends with a reduce-scatter. Run one
after the other, that communication sits on the critical path and, as NCCL kernels, takes
SMs from the GEMMs it runs beside. Here each GEMM is split along the sequence into one
piece per tensor-parallel rank and the pieces travel between the GPUs' memories by copy
engines (CUDA symmetric memory, peer-to-peer over NVLink) while the other pieces compute:

    all_gather_matmul(X_i, B)      -> (X, X B)        X = [X_0; ...; X_{p-1}]
        the local piece X_i B computes while the peers' pieces are copied in, then
        each X_j B as its piece arrives.
    matmul_reduce_scatter(X, B)    -> sum_ranks (X B)[chunk i]
        the piece for each peer computes first and is copied out while the next one
        computes; the pieces received are summed.

Backward uses the same two operations the other way round: a column-parallel GEMM
reduce-scatters its input gradient (matmul_reduce_scatter), a row-parallel one gathers
its output gradient (all_gather_matmul). The values are those of the plain
sequence-parallel path (megatron/mpu/layers.py); only the order of work changes.

Symmetric memory needs CUDA tensors and an NCCL process group
(torch.distributed._symmetric_memory). Anywhere else (gloo on CPU) the same functions run
the collective and the GEMM one after the other, which keeps `--tp-comm-overlap` runs
comparable with plain sequence parallelism in the CPU tests.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Tuple

import torch
import torch.distributed as dist

from .initialize import get_tensor_model_parallel_group
from .mappings import _gather_along_first_dim, _is_gloo, _reduce_scatter_along_first_dim

__all__ = [
    "symmetric_memory_available",
    "all_gather_matmul",
    "matmul_reduce_scatter",
    "column_parallel_linear_overlap",
    "row_parallel_linear_overlap",
]

_SYMM_MEM_GROUPS: set = set()


def symmetric_memory_available(group=None) -> Tuple[bool, str]:
    """(usable, why not) for overlapping through symmetric memory on `group`."""
    group = group if group is not None else get_tensor_model_parallel_group()
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if _is_gloo(group) or dist.get_backend(group) != "nccl":
        return False, f"the tensor-parallel group uses {dist.get_backend(group)}, not nccl"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")  # torch.ops.symm_mem
    except ImportError as exc:  # pragma: no cover - torch without symmetric memory
        return False, f"torch {torch.__version__} has no symmetric memory ({exc})"
    ops = getattr(torch.ops, "symm_mem", None)
    for name in ("fused_all_gather_matmul", "fused_matmul_reduce_scatter"):
        if ops is None or not hasattr(ops, name):
            return False, f"torch {torch.__version__} has no torch.ops.symm_mem.{name}"
    return True, ""


def _symm_mem_group_name(group, tensor: torch.Tensor) -> str | None:
    """The group's name when the fused symmetric-memory ops apply to `tensor`, else None."""
    if not tensor.is_cuda or _is_gloo(group):
        return None
    name = group.group_name
    if name not in _SYMM_MEM_GROUPS:
        usable, _ = symmetric_memory_available(group)
        if not usable:
            return None
        from torch.distributed import _symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before torch 2.13, a deprecated no-op after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(name)
        _SYMM_MEM_GROUPS.add(name)
    return name


def all_gather_matmul(
    shard: torch.Tensor, weight_t: torch.Tensor, group=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """shard [s/p, ..., k], weight_t [k, n] -> (gathered [s, ..., k], gathered @ weight_t)."""
    group = group if group is not None else get_tensor_model_parallel_group()
    name = _symm_mem_group_name(group, shard)
    if name is None:
        gathered = _gather_along_first_dim(shard)
        return gathered, gathered.matmul(weight_t)
    gathered, (out,) = torch.ops.symm_mem.fused_all_gather_matmul(
        shard.contiguous(), [weight_t], 0, name
    )
    return gathered, out


def matmul_reduce_scatter(input_: torch.Tensor, weight_t: torch.Tensor, group=None) -> torch.Tensor:
    """input_ [s, ..., k], weight_t [k, n] -> this rank's [s/p, ..., n] chunk of the sum
    over the group of input_ @ weight_t."""
    group = group if group is not None else get_tensor_model_parallel_group()
    name = _symm_mem_group_name(group, input_)
    if name is None:
        return _reduce_scatter_along_first_dim(input_.matmul(weight_t))
    return torch.ops.symm_mem.fused_matmul_reduce_scatter(
        input_.contiguous(), weight_t, "sum", 0, name
    )


def _weight_grad(grad_output: torch.Tensor, input_: torch.Tensor) -> torch.Tensor:
    """dW [n, k] = dY^T X over all leading dimensions."""
    return (
        grad_output.reshape(-1, grad_output.size(-1))
        .t()
        .matmul(input_.reshape(-1, input_.size(-1)))
    )


class _ColumnParallelLinearOverlap(torch.autograd.Function):
    """Y = gather(X_i) W^T + b, X_i this rank's [s/p, b, h] piece of the sequence.
    Backward: dX_i = reduce-scatter(dY W), dW = dY^T X, db = sum dY."""

    @staticmethod
    def forward(ctx, input_, weight, bias):
        total_input, output = all_gather_matmul(input_, weight.t())  # [s, b, h], [s, b, out/p]
        if bias is not None:
            output.add_(bias)
        ctx.save_for_backward(total_input, weight)
        ctx.use_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        total_input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = matmul_reduce_scatter(grad_output, weight)  # [s/p, b, h]
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_output, total_input)
        if ctx.use_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.size(-1)).sum(dim=0)
        return grad_input, grad_weight, grad_bias


class _RowParallelLinearOverlap(torch.autograd.Function):
    """Y_i = reduce-scatter(X W^T), X [s, b, in/p] this rank's columns. Backward:
    dY = gather(dY_i), dX = dY W, dW = dY^T X."""

    @staticmethod
    def forward(ctx, input_, weight):
        ctx.save_for_backward(input_, weight)
        return matmul_reduce_scatter(input_, weight.t())  # [s/p, b, out]

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        total_grad, grad_input = all_gather_matmul(grad_output, weight)  # [s,b,out], [s,b,in/p]
        grad_weight = _weight_grad(total_grad, input_) if ctx.needs_input_grad[1] else None
        return (grad_input if ctx.needs_input_grad[0] else None), grad_weight


def column_parallel_linear_overlap(
    input_: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The sequence-parallel column-parallel GEMM ([s/p, b, h] -> [s, b, out/p]) with its
    all-gather (backward: reduce-scatter) overlapped."""
    return _ColumnParallelLinearOverlap.apply(input_, weight, bias)


def row_parallel_linear_overlap(input_: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The sequence-parallel row-parallel GEMM ([s, b, in/p] -> [s/p, b, out], no bias)
    with its reduce-scatter (backward: all-gather) overlapped."""
    return _RowParallelLinearOverlap.apply(input_, weight)
