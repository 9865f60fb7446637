"""Tensor-parallel layers: a vocabulary-split embedding and column / row split linears.

Weights use Megatron's [out, in] layout (F.linear computes Y = X W^T + b, so A = W^T).

Initialisation makes parallel equal serial: every tensor-parallel rank builds the FULL
(master) weight with `init_method`, drawing from the default torch generator of the
device the parameter lives on (the CPU with `use_cpu_initialization`, the accelerator
otherwise), then keeps its own slice. With the same seed, the shards of a TP=p layer are
exactly the slices of the TP=1 layer's weight. Biases start at zero.

Built inside `with torch.device("meta"):` the layers allocate nothing and skip
initialisation (megatron.model.utils.count_parameters_on_meta builds whole models so).

Every weight split across ranks carries `tensor_model_parallel=True`, `partition_dim`
(0 or 1) and `partition_stride`, which checkpoint tools and gradient clipping read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn import init
from torch.nn.parameter import Parameter

from megatron.accelerator import current_device

from .initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from .mappings import (
    _gather_along_first_dim,
    _is_gloo,
    _reduce_scatter_along_first_dim,
    _reduce_scatter_single,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region_inplace,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .overlap import column_parallel_linear_overlap, row_parallel_linear_overlap
from .utils import VocabUtility, divide

__all__ = [
    "ParallelConfig",
    "param_is_not_tensor_parallel_duplicate",
    "set_tensor_model_parallel_attributes",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
    "copy_tensor_model_parallel_attributes",
    "VocabParallelEmbedding",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "linear_with_grad_accumulation_and_async_allreduce",
]


@dataclass(frozen=True)
class ParallelConfig:
    """How the tensor-parallel layers hold, initialise and communicate (one per model,
    from TransformerConfig.parallel_config; the defaults are a plain fp32 layer)."""

    params_dtype: torch.dtype = torch.float32
    """dtype of the weights and biases."""
    use_cpu_initialization: bool = False
    """Create the parameters on the CPU (moved to the accelerator later) instead of on it."""
    perform_initialization: bool = True
    """Run init_method; off when the weights will be loaded anyway."""
    sequence_parallel: bool = False
    """Activations outside the layers are split along the sequence (all-gather in, reduce-
    scatter out) instead of replicated."""
    async_tensor_model_parallel_allreduce: bool = True
    """Overlap the column-parallel input-gradient communication with the dW GEMM."""
    tp_comm_overlap: bool = False
    """With sequence_parallel, overlap each GEMM with its all-gather / reduce-scatter in
    pieces (--tp-comm-overlap, mpu/overlap.py)."""
    tp_comm_overlap_chunks: int = 1
    """Pieces of each row-parallel GEMM whose all-reduces overlap the next piece's GEMM."""


_DEFAULT_CONFIG = ParallelConfig()

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {
    "tensor_model_parallel": False,
    "partition_dim": -1,
    "partition_stride": 1,
}


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True if this rank's copy of `param` must be counted (grad norm, param count): a
    split parameter on every rank, a replicated one only on tensor-parallel rank 0."""
    return getattr(param, "tensor_model_parallel", False) or get_tensor_model_parallel_rank() == 0


def set_tensor_model_parallel_attributes(
    tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int
) -> None:
    """Mark `tensor` as split (or not) along `dim` with `stride`; it must be unmarked."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(tensor, attribute):
            raise AttributeError(
                f"megatron/mpu/layers.py: tensor already has attribute {attribute!r}"
            )
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    """Give a replicated parameter the 'not split' attributes it lacks."""
    for attribute, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, attribute):
            setattr(tensor, attribute, value)


def copy_tensor_model_parallel_attributes(
    destination_tensor: torch.Tensor, source_tensor: torch.Tensor
) -> None:
    """Copy the split attributes (e.g. onto an fp32 main copy of a half parameter)."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(source_tensor, attribute):
            setattr(destination_tensor, attribute, getattr(source_tensor, attribute))


def _param_device(use_cpu_initialization: bool) -> torch.device:
    """Where a new parameter lives: the meta device inside `with torch.device("meta")`
    (shapes only, nothing allocated, for counting parameters and planning), else the CPU
    with `use_cpu_initialization`, else the accelerator."""
    if torch.get_default_device().type == "meta":
        return torch.device("meta")
    return torch.device("cpu") if use_cpu_initialization else current_device()


def _rank_slice(master: torch.Tensor, partition_dim: int, per_partition: int, stride: int):
    """This rank's part of `master` along `partition_dim`.

    With stride s the dimension is cut into p*s blocks of per_partition/s; rank r keeps
    blocks r, r+p, r+2p, ... (e.g. fused [q; k; v] split per head group when s = 3).
    """
    world_size = get_tensor_model_parallel_world_size()
    per_stride = divide(per_partition, stride)
    blocks = torch.split(master, per_stride, dim=partition_dim)
    mine = blocks[get_tensor_model_parallel_rank() :: world_size]
    return torch.cat(mine, dim=partition_dim)


def _initialize_affine_weight(
    weight: torch.Tensor,
    full_shape: Tuple[int, int],
    partition_dim: int,
    init_method: Callable[[torch.Tensor], None],
    stride: int,
    return_master_weight: bool,
) -> torch.Tensor | None:
    """Fill `weight` with this rank's slice of a freshly initialised full weight.

    The full weight is made in fp32 on `weight`'s device from the default generator (the
    same on every tensor-parallel rank), then cast to `weight`'s dtype. A meta weight has
    no values to fill: it is only marked.
    """
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    if weight.is_meta:
        return None
    master = torch.empty(full_shape, dtype=torch.float32, device=weight.device)
    init_method(master)
    master = master.to(weight.dtype)
    shard = _rank_slice(master, partition_dim, weight.size(partition_dim), stride)
    with torch.no_grad():
        weight.copy_(shard)
    return master if return_master_weight else None


def _start_input_grad_reduction(grad_input: torch.Tensor, sequence_parallel: bool, group):
    """Start summing the input gradient over the group: all-reduce in place, or with
    sequence parallelism reduce-scatter along the first dimension. (result, handle|None)."""
    if sequence_parallel:
        if _is_gloo(group):
            return _reduce_scatter_along_first_dim(grad_input), None
        world_size = dist.get_world_size(group=group)
        output = torch.empty(
            (grad_input.size(0) // world_size,) + tuple(grad_input.shape[1:]),
            dtype=grad_input.dtype,
            device=grad_input.device,
        )
        return output, _reduce_scatter_single(output, grad_input, group=group, async_op=True)
    return grad_input, dist.all_reduce(grad_input, group=group, async_op=True)


def weight_grad(weight: torch.Tensor, grad_output_2d: torch.Tensor, input_2d: torch.Tensor):
    """dW = dY^T X for a linear layer's backward, or, with gradient-accumulation fusion
    (the local DDP marks its params `fuse_wgrad_accumulation` and gives them `main_grad`),
    dW added straight into `weight.main_grad` and None returned, so autograd makes no
    separate gradient tensor and the DDP hook has nothing to add. On the GPU the bf16/fp16
    GEMM accumulates into the fp32 buffer itself (one GEMM with beta = 1, out_dtype fp32);
    elsewhere dW is computed and added, the same arithmetic as without the fusion."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not getattr(weight, "fuse_wgrad_accumulation", False):
        return grad_output_2d.t().matmul(input_2d)
    if main_grad.is_cuda and main_grad.dtype != grad_output_2d.dtype:
        torch.addmm(
            main_grad, grad_output_2d.t(), input_2d, out_dtype=main_grad.dtype, out=main_grad
        )
    elif main_grad.is_cuda:
        main_grad.addmm_(grad_output_2d.t(), input_2d)
    else:
        main_grad.add_(grad_output_2d.t().matmul(input_2d))
    return None


class _LinearWithAsyncCommunication(torch.autograd.Function):
    """Y = X W^T + b for a column-parallel GEMM, with its tensor-parallel communication.

    X is replicated over the p tensor-parallel ranks, or with sequence parallelism split
    along the sequence ([s/p, b, h]) and all-gathered here. In backward
        dX = dY W   summed over the group (all-reduce; sequence parallel: reduce-scatter)
        dW = dY^T X,  db = sum dY
    and the dX communication runs while the dW GEMM computes (`async_comm`). The gathered
    X is kept for dW (gathering it again in backward measured slower on two H200s).
    """

    @staticmethod
    def forward(ctx, input_, weight, bias, sequence_parallel, async_comm):
        total_input = _gather_along_first_dim(input_) if sequence_parallel else input_
        ctx.save_for_backward(total_input, weight)
        ctx.use_bias = bias is not None
        ctx.sequence_parallel = sequence_parallel
        ctx.async_comm = async_comm
        return F.linear(total_input, weight, bias)  # [s, b, out/p]

    @staticmethod
    def backward(ctx, grad_output):
        total_input, weight = ctx.saved_tensors
        tp = get_tensor_model_parallel_world_size()
        handle = grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)  # [s, b, in]
            if tp > 1:
                grad_input, handle = _start_input_grad_reduction(
                    grad_input.contiguous(),
                    ctx.sequence_parallel,
                    get_tensor_model_parallel_group(),
                )
                if not ctx.async_comm and handle is not None:
                    handle.wait()
                    handle = None
        grad_output_2d = grad_output.reshape(-1, grad_output.size(-1))  # [s*b, out/p]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(
                weight, grad_output_2d, total_input.reshape(-1, total_input.size(-1))
            )
        if ctx.use_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output_2d.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None


def _backward_without_communication(ctx, grad_output):
    """(dX, dW) of Y = X W^T with (X, W) saved: dX = dY W, dW through `weight_grad`."""
    input_, weight = ctx.saved_tensors
    grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = weight_grad(
            weight,
            grad_output.reshape(-1, grad_output.size(-1)),
            input_.reshape(-1, input_.size(-1)),
        )
    return grad_input, grad_weight


class _RowParallelLinearChunkedAllReduce(torch.autograd.Function):
    """Y = sum over ranks of X_i W_i^T for a row-parallel GEMM, computed in `chunks`
    pieces along the first (sequence) dimension: the all-reduce of piece k runs while
    the GEMM of piece k+1 computes, so only the last piece's all-reduce is exposed.
    Backward (no communication): dX = dY W, dW = dY^T X."""

    @staticmethod
    def forward(ctx, input_, weight, chunks):
        ctx.save_for_backward(input_, weight)
        group = get_tensor_model_parallel_group()
        output = torch.empty(
            tuple(input_.shape[:-1]) + (weight.size(0),), dtype=input_.dtype, device=input_.device
        )  # [s, b, out]
        handles = []
        for piece_in, piece_out in zip(input_.chunk(chunks, 0), output.chunk(chunks, 0)):
            torch.matmul(
                piece_in.reshape(-1, piece_in.size(-1)),
                weight.t(),
                out=piece_out.view(-1, piece_out.size(-1)),
            )
            handles.append(dist.all_reduce(piece_out, group=group, async_op=True))
        for handle in handles:
            handle.wait()
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return (*_backward_without_communication(ctx, grad_output), None)


class _LinearAccumulatingWeightGrad(torch.autograd.Function):
    """Y = X W^T (no bias, no communication) whose backward hands dW to `weight_grad`: the
    row-parallel GEMM's own path when gradient-accumulation fusion is on."""

    @staticmethod
    def forward(ctx, input_, weight):
        ctx.save_for_backward(input_, weight)
        return F.linear(input_, weight)

    @staticmethod
    def backward(ctx, grad_output):
        return _backward_without_communication(ctx, grad_output)


def _overlap_sequence_parallel(sequence_parallel: bool, tp_comm_overlap: bool) -> bool:
    return sequence_parallel and tp_comm_overlap and get_tensor_model_parallel_world_size() > 1


def linear_with_grad_accumulation_and_async_allreduce(
    input_: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sequence_parallel: bool = False,
    async_grad_allreduce: bool = True,
    tp_comm_overlap: bool = False,
) -> torch.Tensor:
    """X W^T + b with X replicated over the tensor-parallel group (or, with
    `sequence_parallel`, split along the first dimension and gathered); see
    `_LinearWithAsyncCommunication` for the backward communication and its overlap.

    Equals `F.linear(copy_to_tensor_model_parallel_region(X), W, b)` (sequence parallel:
    `gather_from_sequence_parallel_region(X)`) in value and gradient. With
    `tp_comm_overlap` (--tp-comm-overlap) the sequence-parallel gather (and the backward
    reduce-scatter) overlap the GEMM in pieces (mpu/overlap.py).
    """
    if _overlap_sequence_parallel(sequence_parallel, tp_comm_overlap):
        return column_parallel_linear_overlap(input_, weight, bias)
    return _LinearWithAsyncCommunication.apply(
        input_, weight, bias, sequence_parallel, async_grad_allreduce
    )


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding whose vocabulary is split into contiguous ranges across TP ranks.

    Rank r holds rows [r V/p, (r+1) V/p) of the [V, h] table. Each rank looks up the
    tokens in its range (others give zero rows) and an all-reduce sums the partial
    results, so every rank gets the full [.., h] embedding. V must divide by p (pad the
    vocabulary). The backward pass needs no communication: each rank's rows only get
    gradient from its own tokens.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        config: ParallelConfig = _DEFAULT_CONFIG,
        init_method: Callable[[torch.Tensor], None] = init.xavier_normal_,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # torch.nn.Embedding options, kept for code that reads them.
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self._weight = None
        self.tensor_model_parallel_size = get_tensor_model_parallel_world_size()
        self.vocab_start_index, self.vocab_end_index = (
            VocabUtility.vocab_range_from_global_vocab_size(
                num_embeddings, get_tensor_model_parallel_rank(), self.tensor_model_parallel_size
            )
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index

        self.weight = Parameter(
            torch.empty(
                self.num_embeddings_per_partition,
                embedding_dim,
                dtype=config.params_dtype,
                device=_param_device(config.use_cpu_initialization),
            )
        )
        if config.perform_initialization:
            _initialize_affine_weight(
                self.weight, (num_embeddings, embedding_dim), 0, init_method, 1, False
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        # input_: [b, s] token ids -> [b, s, h]
        if self.tensor_model_parallel_size > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)
        else:
            masked_input = input_
        output_parallel = F.embedding(
            masked_input,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        if self.tensor_model_parallel_size > 1:
            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region_inplace(output_parallel)


class ColumnParallelLinear(torch.nn.Module):
    """Y = XA + b with A split by columns across the p tensor-parallel ranks.

    A = [A_1, ..., A_p] (so W = A^T is split along its rows, partition_dim 0) and
    b = [b_1, ..., b_p]; rank i computes Y_i = X A_i + b_i. The input X is replicated
    (its gradient is all-reduced in backward), or with `sequence_parallel` arrives
    split along the first (sequence) dimension and is all-gathered (its gradient
    reduce-scattered). `gather_output` all-gathers Y = [Y_1, ..., Y_p]; otherwise each
    rank returns its Y_i, ready for a RowParallelLinear.

    forward returns (output, bias): bias is None unless `skip_bias_add`, in which case
    b_i is not added and is returned for the caller to fuse. `config` gives the dtype,
    the device, whether to initialise, and the communication options (ParallelConfig).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ParallelConfig = _DEFAULT_CONFIG,
        bias: bool = True,
        gather_output: bool = True,
        init_method: Callable[[torch.Tensor], None] = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
    ) -> None:
        super().__init__()
        if config.sequence_parallel and gather_output:
            raise ValueError(
                "megatron/mpu/layers.py: ColumnParallelLinear cannot gather_output "
                "with sequence_parallel"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.config = config
        world_size = get_tensor_model_parallel_world_size()
        self.output_size_per_partition = divide(output_size, world_size)
        device = _param_device(config.use_cpu_initialization)
        dtype = config.params_dtype

        self.weight = Parameter(
            torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=device)
        )
        self.master_weight = None
        if config.perform_initialization:
            self.master_weight = _initialize_affine_weight(
                self.weight,
                (output_size, input_size),
                0,
                init_method,
                stride,
                keep_master_weight_for_test,
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)

        if bias:
            self.bias = Parameter(
                torch.zeros(self.output_size_per_partition, dtype=dtype, device=device)
            )
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
        # input_: [s, b, h] ([s/p, b, h] with sequence_parallel, gathered inside)
        bias = self.bias if not self.skip_bias_add else None
        output_parallel = linear_with_grad_accumulation_and_async_allreduce(
            input_,
            self.weight,
            bias,
            self.config.sequence_parallel,
            self.config.async_tensor_model_parallel_allreduce,
            self.config.tp_comm_overlap,
        )  # [s, b, out/p]
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output_parallel)  # [s, b, out]
        else:
            output = output_parallel
        output_bias = self.bias if self.skip_bias_add else None
        return output, output_bias


class RowParallelLinear(torch.nn.Module):
    """Y = XA + b with A split by rows and X split by columns across p ranks.

        A = [A_1; ...; A_p],  X = [X_1, ..., X_p],  Y = sum_i X_i A_i + b

    (W = A^T is split along its columns, partition_dim 1.) Rank i computes X_i A_i and
    an all-reduce sums them; with `sequence_parallel` a reduce-scatter sums them and
    leaves each rank its chunk of the first (sequence) dimension. The bias is
    replicated and added after the reduction. `input_is_parallel` says X arrives split
    (from a ColumnParallelLinear); otherwise it is split here.

    forward returns (output, bias): bias is None unless `skip_bias_add`. `config` as for
    ColumnParallelLinear.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ParallelConfig = _DEFAULT_CONFIG,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: Callable[[torch.Tensor], None] = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
    ) -> None:
        super().__init__()
        if config.sequence_parallel and not input_is_parallel:
            raise ValueError(
                "megatron/mpu/layers.py: RowParallelLinear with sequence_parallel needs "
                "input_is_parallel=True"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.config = config
        world_size = get_tensor_model_parallel_world_size()
        self.input_size_per_partition = divide(input_size, world_size)
        device = _param_device(config.use_cpu_initialization)
        dtype = config.params_dtype

        self.weight = Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=device)
        )
        self.master_weight = None
        if config.perform_initialization:
            self.master_weight = _initialize_affine_weight(
                self.weight,
                (output_size, input_size),
                1,
                init_method,
                stride,
                keep_master_weight_for_test,
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 1, stride)

        if bias:
            self.bias = Parameter(torch.zeros(output_size, dtype=dtype, device=device))
            # Under sequence parallelism each rank's bias gradient covers only its
            # sequence chunk; the optimizer all-reduces params marked like this.
            self.bias.sequence_parallel = config.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
        # input_: [s, b, in/p] if input_is_parallel else [s, b, in]
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_)  # [s, b, in/p]
        sequence_parallel = self.config.sequence_parallel
        # chunks > 1: GEMM and all-reduce in pieces along the sequence, overlapping the two
        chunks = self.config.tp_comm_overlap_chunks
        if _overlap_sequence_parallel(sequence_parallel, self.config.tp_comm_overlap):
            output_ = row_parallel_linear_overlap(input_parallel, self.weight)  # [s/p, b, o]
        elif (
            chunks > 1
            and not sequence_parallel
            and get_tensor_model_parallel_world_size() > 1
            and input_parallel.size(0) >= chunks
        ):
            output_ = _RowParallelLinearChunkedAllReduce.apply(input_parallel, self.weight, chunks)
        else:
            if getattr(self.weight, "fuse_wgrad_accumulation", False):
                output_parallel = _LinearAccumulatingWeightGrad.apply(input_parallel, self.weight)
            else:
                output_parallel = F.linear(input_parallel, self.weight)  # [s, b, out] partial
            if sequence_parallel:
                output_ = reduce_scatter_to_sequence_parallel_region(output_parallel)  # [s/p,b,o]
            else:
                output_ = reduce_from_tensor_model_parallel_region_inplace(output_parallel)
        if self.skip_bias_add:
            return output_, self.bias
        output = output_ + self.bias if self.bias is not None else output_
        return output, None
