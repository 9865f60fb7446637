"""Megatron's local data-parallel wrapper (``--DDP-impl local``).

Each data-parallel rank runs backward on its own micro-batches; gradients are then averaged:

    g = (1 / DP) * sum over data-parallel ranks of g_rank

With contiguous buffers (``use_contiguous_buffers``) every param gets ``param.main_grad``,
a view into one flat buffer per gradient dtype (fp32 with
``accumulate_allreduce_grads_in_fp32``, else the param dtype). A hook run after autograd
accumulates ``param.grad`` adds it into ``main_grad`` and frees ``param.grad``, so gradient
accumulation over micro-batches happens in the buffer and the all-reduce is one call per
buffer. With gradient-accumulation fusion (the default; ``--no-gradient-accumulation-fusion``
turns it off) the linear layers' backward adds their weight gradient into ``main_grad``
itself (mpu.layers.weight_grad), so those weights get no ``param.grad`` at all. Without
contiguous buffers the grads are flattened per dtype at reduction time.

Expert params (``allreduce=False``, Mixture-of-Experts) differ between expert-parallel ranks,
so they are averaged over their expert-data-parallel group (DeepSpeed's group named by
``param.group_name``) instead of the data-parallel group.

Under the distributed optimizer (``use_distributed_optimizer``) each buffer is padded to a
multiple of ``BUFFER_ALIGNMENT * DP`` elements, so that it splits into DP equal shards, and
the gradients are reduce-scattered by the optimizer (megatron/optimizer/distrib_optimizer.py)
instead of all-reduced here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Tuple

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron import mpu
from megatron.accelerator import current_device

from .module import MegatronModule

# Buffers are keyed by (grad dtype, expert group name or None for dense params).
BufferKey = Tuple[torch.dtype, str | None]

# Distributed-optimizer shards start on a multiple of this many elements.
BUFFER_ALIGNMENT = 128


def padded_buffer_numel(numel: int, data_parallel_size: int) -> int:
    """``numel`` rounded up to a multiple of BUFFER_ALIGNMENT * data_parallel_size."""
    multiple = BUFFER_ALIGNMENT * data_parallel_size
    return -(-numel // multiple) * multiple


class MemoryBuffer:
    """A flat zero-initialised tensor handing out views of given shapes."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device | None = None):
        self.numel = numel
        self.dtype = dtype
        self.data = torch.zeros(
            numel, dtype=dtype, device=device or current_device(), requires_grad=False
        )

    def zero(self) -> None:
        self.data.zero_()

    def get(self, shape: torch.Size, start_index: int) -> torch.Tensor:
        """The view ``data[start_index : start_index + prod(shape)]`` reshaped to ``shape``."""
        end_index = start_index + shape.numel()
        if end_index > self.numel:
            raise ValueError(
                f"distributed.py: requested view [{start_index}, {end_index}) is out of the "
                f"buffer of {self.numel} elements"
            )
        return self.data[start_index:end_index].view(shape)


class DistributedDataParallelBase(MegatronModule, ABC):
    """Wraps a module; checkpoints hold the inner module's keys (no ``module.`` prefix)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    @abstractmethod
    def allreduce_gradients(self) -> None: ...

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        inner = getattr(self.module, "state_dict_for_save_checkpoint", None)
        if inner is None:
            return self.module.state_dict(prefix=prefix, keep_vars=keep_vars)
        return inner(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def _expert_group_name(param: torch.Tensor) -> str | None:
    """None for a dense param; the expert-parallel group name for an expert param."""
    if getattr(param, "allreduce", True) is not False:
        return None
    return getattr(param, "group_name", "")


def _reduction_group(group_name: str | None) -> Tuple[Any, int]:
    """(process group to sum over, count to divide by) for grads of params with this group
    name: dense grads are summed over the sequence-data group (the data group without
    DeepSpeed-Ulysses) and divided by the data-parallel size (megatron/model/ulysses.py)."""
    if group_name is None:
        return mpu.get_sequence_data_parallel_group(), mpu.get_data_parallel_world_size()
    try:
        from deepspeed.utils import groups as ds_groups

        group = ds_groups._get_expert_data_parallel_group(group_name)
    except (ImportError, AssertionError, KeyError) as err:
        raise RuntimeError(
            f"distributed.py: expert params (allreduce=False, group_name={group_name!r}) need "
            "DeepSpeed's expert-data-parallel groups; train MoE models with --deepspeed"
        ) from err
    return group, torch.distributed.get_world_size(group=group)


class DistributedDataParallel(DistributedDataParallelBase):
    """Local DDP: grads accumulate into ``main_grad`` buffers, averaged by allreduce_gradients.

    Args:
        module: the model chunk to wrap.
        accumulate_allreduce_grads_in_fp32: keep ``main_grad`` (and reduce) in fp32 for
            fp16/bf16 params.
        use_contiguous_buffers: one flat buffer per dtype (``main_grad`` views); otherwise
            ``main_grad`` is set to ``param.grad`` when the grads are reduced.
        use_distributed_optimizer: pad the buffers into DP equal shards; the optimizer
            reduce-scatters them (allreduce_gradients is then refused).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        accumulate_allreduce_grads_in_fp32: bool,
        use_contiguous_buffers: bool,
        gradient_accumulation_fusion: bool = True,
        use_distributed_optimizer: bool = False,
    ):
        super().__init__(module)
        self.use_distributed_optimizer = use_distributed_optimizer
        if use_distributed_optimizer and not use_contiguous_buffers:
            raise ValueError(
                "distributed.py: --use-distributed-optimizer needs contiguous gradient buffers "
                "(drop --no-contiguous-buffers-in-local-ddp)"
            )
        self.accumulate_allreduce_grads_in_fp32 = accumulate_allreduce_grads_in_fp32
        self.use_contiguous_buffers = use_contiguous_buffers
        self.gradient_accumulation_fusion = gradient_accumulation_fusion and use_contiguous_buffers
        if self.accumulate_allreduce_grads_in_fp32 and not self.use_contiguous_buffers:
            raise ValueError(
                "distributed.py: --accumulate-allreduce-grads-in-fp32 needs contiguous "
                "gradient buffers (drop --no-contiguous-buffers-in-local-ddp)"
            )
        self._grad_buffers: Dict[BufferKey, MemoryBuffer] | None = None
        # per buffer: (param, start, end) of every param's main_grad view in it
        self.grad_buffer_param_ranges: Dict[BufferKey, List[Tuple[torch.Tensor, int, int]]] = {}
        self._hook_handles: List[Any] = []
        if self.use_contiguous_buffers:
            self._allocate_grad_buffers()

    def _grad_dtype(self, param: torch.Tensor) -> torch.dtype:
        return torch.float if self.accumulate_allreduce_grads_in_fp32 else param.dtype

    def _buffer_key(self, param: torch.Tensor) -> BufferKey:
        return self._grad_dtype(param), _expert_group_name(param)

    def _allocate_grad_buffers(self) -> None:
        """Size one buffer per key, hand out views back to front, install the hooks."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        sizes: Dict[BufferKey, int] = {}
        for param in params:
            key = self._buffer_key(param)
            sizes[key] = sizes.get(key, 0) + param.data.nelement()
        device = params[0].device if params else None
        dp = mpu.get_data_parallel_world_size() if self.use_distributed_optimizer else 1
        self._grad_buffers = {
            key: MemoryBuffer(
                padded_buffer_numel(numel, dp) if self.use_distributed_optimizer else numel,
                key[0],
                device=device,
            )
            for key, numel in sizes.items()
        }
        # Backward visits params roughly in reverse order: give the last param the front of
        # the buffer so that the buffer fills in order.
        for param in params:
            key = self._buffer_key(param)
            sizes[key] -= param.data.nelement()
            param.main_grad = self._grad_buffers[key].get(param.data.shape, sizes[key])
            self.grad_buffer_param_ranges.setdefault(key, []).append(
                (param, sizes[key], sizes[key] + param.data.nelement())
            )
            # linear layers add their weight gradient into main_grad themselves
            param.fuse_wgrad_accumulation = self.gradient_accumulation_fusion
            self._hook_handles.append(
                param.register_post_accumulate_grad_hook(self._accumulate_into_main_grad)
            )

    @staticmethod
    def _accumulate_into_main_grad(param: torch.Tensor) -> None:
        """main_grad += grad; grad = None (autograd has just accumulated param.grad)."""
        if param.grad is not None:
            param.main_grad.add_(param.grad.data)
            param.grad = None

    @property
    def grad_buffers(self) -> Dict[BufferKey, MemoryBuffer]:
        """The contiguous gradient buffers by (grad dtype, expert group name)."""
        if self._grad_buffers is None:
            raise RuntimeError("distributed.py: this DDP has no contiguous gradient buffers")
        return self._grad_buffers

    def zero_grad_buffer(self) -> None:
        """Zero every contiguous gradient buffer (call before each iteration's backward)."""
        if self._grad_buffers is None:
            raise RuntimeError(
                "distributed.py: zero_grad_buffer() needs contiguous buffers "
                "(use_contiguous_buffers=True)"
            )
        for buffer in self._grad_buffers.values():
            buffer.zero()

    def allreduce_gradients(self) -> None:
        """Average grads over data-parallel ranks (expert params over expert-DP ranks)."""
        if self.use_distributed_optimizer:
            raise RuntimeError(
                "distributed.py: under --use-distributed-optimizer the optimizer "
                "reduce-scatters the gradients; do not all-reduce them here"
            )
        if self._grad_buffers is not None:
            for (_, group_name), buffer in self._grad_buffers.items():
                group, size = _reduction_group(group_name)
                # one rank: nothing to reduce (a pass over every gradient)
                if torch.distributed.get_world_size(group=group) > 1:
                    if size > 1:
                        buffer.data /= size
                    torch.distributed.all_reduce(buffer.data, group=group)
            return
        buckets: Dict[BufferKey, List[torch.Tensor]] = {}
        for param in self.module.parameters():
            if param.requires_grad and param.grad is not None:
                buckets.setdefault((param.grad.dtype, _expert_group_name(param)), []).append(param)
                param.main_grad = param.grad
        for (_, group_name), bucket in buckets.items():
            group, size = _reduction_group(group_name)
            grads = [param.grad.data for param in bucket]
            coalesced = _flatten_dense_tensors(grads)  # [sum of numels]
            coalesced /= size
            torch.distributed.all_reduce(coalesced, group=group)
            for grad, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
                grad.copy_(synced)
