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
(torch.distributed._symmetric_memory). Two ranks exchange through _TwoRankExchange (one
barrier per GEMM, few host calls); more ranks through torch's
`symm_mem.fused_all_gather_matmul` / `fused_matmul_reduce_scatter`. Anywhere else (gloo on
CPU) the same functions run the collective and the GEMM one after the other, which keeps
`--tp-comm-overlap` runs comparable with plain sequence parallelism in the CPU tests.
Measured on two H200s: docs/benchmarks.md, "Tensor parallelism, third pass".
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Callable, Tuple

import torch
import torch.distributed as dist

from .initialize import get_tensor_model_parallel_group
from .mappings import _gather_along_first_dim, _is_gloo, _reduce_scatter_along_first_dim

__all__ = [
    "symmetric_memory_available",
    "all_gather_matmul",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_start",
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


class _TwoRankExchange:
    """Copy-engine exchange between the two ranks of a tensor-parallel group through one
    symmetric-memory buffer of two slots that the operations take in turn.

    Each operation writes its outgoing piece into this rank's slot and waits at a
    barrier for the peer to have done the same; a side stream then copies the peer's
    slot into local memory (a copy-engine transfer, no SMs) while the GEMMs run on the
    current stream. The barrier is a kernel, so it runs on the current stream before
    the GEMM: queued behind a GEMM that fills every SM it would wait for that GEMM to
    end. One barrier per operation is enough: the current stream waits for the side
    stream before the next operation writes, and the peer cannot pass its next barrier
    before its copy of this rank's slot is done, so a slot is never overwritten while
    the peer reads it.
    """

    def __init__(self, group, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.peer = 1 - self.rank
        self.device = device
        self.side = torch.cuda.Stream(device=device)
        self.issued = torch.cuda.Event()  # current stream -> side stream
        self.copied = torch.cuda.Event()  # side stream -> current stream
        self.slot_bytes = 0
        self.handle = None
        self.buffers = []  # every symmetric buffer made, kept alive with the process
        self.views = {}
        self.count = 0

    def slot(self, shape, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(this rank's, the peer's) views of the next slot as `shape`."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.slot_bytes:
            from torch.distributed import _symmetric_memory as symm_mem

            if self.handle is not None:
                torch.cuda.synchronize(self.device)  # the old buffer may still be read
            self.slot_bytes = -(-nbytes // (1 << 20)) << 20  # whole MiB
            buf = symm_mem.empty(2 * self.slot_bytes, dtype=torch.uint8, device=self.device)
            self.handle = symm_mem.rendezvous(buf, self.group.group_name)
            self.buffers.append(buf)
            self.views.clear()
        index = self.count % 2
        self.count += 1
        key = (index, tuple(shape), dtype)
        views = self.views.get(key)
        if views is None:
            offset = index * self.slot_bytes // dtype.itemsize
            views = tuple(
                self.handle.get_buffer(r, tuple(shape), dtype, offset)
                for r in (self.rank, self.peer)
            )
            self.views[key] = views
        return views

    def all_gather_matmul(self, shard, weight_t):
        shard = shard.contiguous()
        main = torch.cuda.current_stream(self.device)
        gathered = shard.new_empty((2 * shard.size(0),) + tuple(shard.shape[1:]))
        out = shard.new_empty(tuple(gathered.shape[:-1]) + (weight_t.size(1),))
        pieces, out_pieces = gathered.chunk(2), out.chunk(2)
        mine, theirs = self.slot(shard.shape, shard.dtype)
        mine.copy_(shard)
        self.handle.barrier(channel=0)
        self.issued.record(main)
        self.side.wait_event(self.issued)
        with torch.cuda.stream(self.side):
            pieces[self.peer].copy_(theirs)
            pieces[self.rank].copy_(shard)
            self.copied.record(self.side)
        k, n = shard.size(-1), weight_t.size(1)
        torch.mm(shard.view(-1, k), weight_t, out=out_pieces[self.rank].view(-1, n))
        main.wait_event(self.copied)
        torch.mm(pieces[self.peer].view(-1, k), weight_t, out=out_pieces[self.peer].view(-1, n))
        return gathered, out

    def matmul_reduce_scatter_start(self, input_, weight_t):
        input_ = input_.contiguous()
        main = torch.cuda.current_stream(self.device)
        k, n = input_.size(-1), weight_t.size(1)
        parts = input_.chunk(2)
        shape = tuple(parts[0].shape[:-1]) + (n,)
        mine, theirs = self.slot(shape, input_.dtype)
        torch.mm(parts[self.peer].reshape(-1, k), weight_t, out=mine.view(-1, n))
        received = input_.new_empty(shape)
        self.handle.barrier(channel=0)
        self.issued.record(main)
        self.side.wait_event(self.issued)
        with torch.cuda.stream(self.side):
            received.copy_(theirs)
            self.copied.record(self.side)
        out = input_.new_empty(shape)
        torch.mm(parts[self.rank].reshape(-1, k), weight_t, out=out.view(-1, n))

        def finish() -> torch.Tensor:
            main.wait_event(self.copied)
            return out.add_(received)

        return finish


_EXCHANGES: dict = {}


def _two_rank_exchange(group, tensor: torch.Tensor):
    """The copy-engine exchange for a two-rank NCCL group and CUDA tensor, else None."""
    if _symm_mem_group_name(group, tensor) is None or dist.get_world_size(group) != 2:
        return None
    key = (group.group_name, tensor.device)
    exchange = _EXCHANGES.get(key)
    if exchange is None:
        exchange = _EXCHANGES[key] = _TwoRankExchange(group, tensor.device)
    return exchange


def _route(tensor: torch.Tensor):
    """(two-rank exchange or None, symmetric-memory group name or None) for the
    tensor-parallel group: the exchange on two ranks, torch's fused ops on more, neither
    off CUDA / NCCL (then the collectives run unfused)."""
    group = get_tensor_model_parallel_group()
    exchange = _two_rank_exchange(group, tensor)
    name = None if exchange is not None else _symm_mem_group_name(group, tensor)
    return exchange, name


def all_gather_matmul(
    shard: torch.Tensor, weight_t: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """shard [s/p, ..., k], weight_t [k, n] -> (gathered [s, ..., k], gathered @ weight_t)."""
    exchange, name = _route(shard)
    if exchange is not None:
        return exchange.all_gather_matmul(shard, weight_t)
    if name is None:
        gathered = _gather_along_first_dim(shard)
        return gathered, gathered.matmul(weight_t)
    gathered, (out,) = torch.ops.symm_mem.fused_all_gather_matmul(
        shard.contiguous(), [weight_t], 0, name
    )
    return gathered, out


def matmul_reduce_scatter_start(
    input_: torch.Tensor, weight_t: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """Start the reduce-scatter of input_ @ weight_t (see matmul_reduce_scatter); the
    returned function finishes it and returns this rank's chunk. Work queued between the
    two (a weight-gradient GEMM) overlaps the transfer."""
    exchange, name = _route(input_)
    if exchange is not None:
        return exchange.matmul_reduce_scatter_start(input_, weight_t)
    if name is None:
        out = _reduce_scatter_along_first_dim(input_.matmul(weight_t))
    else:
        out = torch.ops.symm_mem.fused_matmul_reduce_scatter(
            input_.contiguous(), weight_t, "sum", 0, name
        )
    return lambda: out


def matmul_reduce_scatter(input_: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """input_ [s, ..., k], weight_t [k, n] -> this rank's [s/p, ..., n] chunk of the sum
    over the group of input_ @ weight_t."""
    return matmul_reduce_scatter_start(input_, weight_t)()


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
        finish = None
        if ctx.needs_input_grad[0]:
            # dX pieces go to their ranks while dW computes
            finish = matmul_reduce_scatter_start(grad_output, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_output, total_input)
        if ctx.use_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.size(-1)).sum(dim=0)
        if finish is not None:
            grad_input = finish()  # [s/p, b, h]
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
