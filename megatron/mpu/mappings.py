"""Communication across the tensor-parallel group, as autograd functions.

Each function's forward and backward are conjugate: what one does to activations, the
other does to gradients. With p tensor-parallel ranks:

    name                                      forward                backward
    copy_to_tensor_model_parallel_region      identity               all-reduce
    reduce_from_tensor_model_parallel_region  all-reduce             identity
      (_inplace: the same, overwriting its input)
    scatter_to_tensor_model_parallel_region   keep last-dim chunk    all-gather last dim
    gather_from_tensor_model_parallel_region  all-gather last dim    keep last-dim chunk
    scatter_to_sequence_parallel_region       keep first-dim chunk   all-gather first dim
    gather_from_sequence_parallel_region      all-gather first dim   reduce-scatter first dim
                                                                     (or keep chunk)
    reduce_scatter_to_sequence_parallel_region reduce-scatter first  all-gather first dim

All of them are the identity when the tensor-parallel world size is 1. They run on
NCCL (device tensors) and on gloo (CPU tensors); where gloo lacks a collective on some
torch versions the gloo path is built from ones it has.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from .utils import divide, split_tensor_along_last_dim

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region_inplace",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]

# torch >= 2.13 renames the single-tensor collectives; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


# --------------------------------------------------------------------------------------
# Plain collectives on the tensor-parallel group (no autograd)
# --------------------------------------------------------------------------------------


def _reduce(input_: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group. Out of place: the input may still be in use
    (a residual branch, or a gradient autograd hands to several consumers)."""
    if get_tensor_model_parallel_world_size() == 1:
        return input_
    output = input_.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(output, group=get_tensor_model_parallel_group())
    return output


def _split_along_last_dim(input_: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    chunks = split_tensor_along_last_dim(input_, world_size)
    return chunks[get_tensor_model_parallel_rank()].contiguous()


def _split_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the first dimension."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    local = divide(input_.size(0), world_size)
    start = get_tensor_model_parallel_rank() * local
    return input_[start : start + local].contiguous()


def _gather_list(input_: torch.Tensor, group) -> list:
    world_size = dist.get_world_size(group=group)
    tensors = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(tensors, input_, group=group)
    return tensors


def _gather_along_last_dim(input_: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dimension, in rank order."""
    if get_tensor_model_parallel_world_size() == 1:
        return input_
    tensors = _gather_list(input_.contiguous(), get_tensor_model_parallel_group())
    return torch.cat(tensors, dim=-1).contiguous()


def _gather_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along the first dimension, in rank order."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    group = get_tensor_model_parallel_group()
    input_ = input_.contiguous()
    if _is_gloo(group):
        # gloo has no all_gather_into_tensor on older torch: gather a list and concatenate.
        return torch.cat(_gather_list(input_, group), dim=0)
    output = torch.empty(
        (world_size * input_.size(0),) + tuple(input_.shape[1:]),
        dtype=input_.dtype,
        device=input_.device,
    )
    _all_gather_single(output, input_, group=group)
    return output


def _reduce_scatter_along_first_dim(input_: torch.Tensor) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk of the first dimension."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return input_
    group = get_tensor_model_parallel_group()
    local = divide(input_.size(0), world_size)
    if _is_gloo(group):
        # gloo has no reduce_scatter on older torch: all-reduce the whole tensor and keep
        # the local chunk (p times the traffic, fine for CPU runs and tests).
        return _split_along_first_dim(_reduce(input_))
    input_ = input_.contiguous()
    output = torch.empty(
        (local,) + tuple(input_.shape[1:]), dtype=input_.dtype, device=input_.device
    )
    _reduce_scatter_single(output, input_, group=group)
    return output


# --------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient."""

    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce(grad_output)


class _ReduceFromModelParallelRegionInplace(torch.autograd.Function):
    """Forward: all-reduce in place. Backward: identity.

    For a tensor the caller has just made and nothing else reads (a row-parallel GEMM's
    partial sums, the masked embedding lookup): it saves the copy `_reduce` makes.
    """

    @staticmethod
    def forward(ctx, input_):
        if get_tensor_model_parallel_world_size() == 1:
            return input_
        ctx.mark_dirty(input_)
        dist.all_reduce(input_, group=get_tensor_model_parallel_group())
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-reduce. Backward: identity."""

    @staticmethod
    def forward(ctx, input_):
        return _reduce(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep the local last-dim chunk. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_last_dim(grad_output)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep the local last-dim chunk."""

    @staticmethod
    def forward(ctx, input_):
        return _gather_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep the local first-dim chunk. Backward: all-gather the first dim."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather the first dim.

    Backward: when the gathered tensor feeds a tensor-parallel computation, each rank's
    gradient is a partial sum over its shard, so reduce-scatter; otherwise every rank
    holds the full gradient already and keeps its chunk.
    """

    @staticmethod
    def forward(ctx, input_, tensor_parallel_output_grad=True):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad_output), None
        return _split_along_first_dim(grad_output), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter along the first dim. Backward: all-gather the first dim."""

    @staticmethod
    def forward(ctx, input_):
        return _reduce_scatter_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


# --------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------


def copy_to_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _CopyToModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _ReduceFromModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region_inplace(input_: torch.Tensor) -> torch.Tensor:
    """`reduce_from_tensor_model_parallel_region` that overwrites `input_` (contiguous,
    not a view, read by nothing else) with the sum instead of copying it first."""
    if not input_.is_contiguous() or input_._base is not None:
        return _ReduceFromModelParallelRegion.apply(input_)
    return _ReduceFromModelParallelRegionInplace.apply(input_)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _ScatterToModelParallelRegion.apply(input_)


def gather_from_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _GatherFromModelParallelRegion.apply(input_)


def scatter_to_sequence_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _ScatterToSequenceParallelRegion.apply(input_)


def gather_from_sequence_parallel_region(
    input_: torch.Tensor, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    return _GatherFromSequenceParallelRegion.apply(input_, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSequenceParallelRegion.apply(input_)
