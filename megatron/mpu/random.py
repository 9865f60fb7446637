"""Random-number state for tensor parallelism, and activation checkpointing.

Two streams of random numbers are needed under tensor parallelism:

* the default generator, seeded identically on every tensor-parallel rank, for things
  every rank must agree on (dropout on replicated activations, weight initialisation);
* the tracker's 'model-parallel-rng' stream, seeded with seed + 2718 + tp_rank, for
  things that must differ across ranks (dropout on activations that are split across
  the tensor-parallel group, e.g. attention probabilities of a rank's own heads).

``with get_cuda_rng_tracker().fork():`` swaps the device generator's state for the
tracked one and back. The device generator is the accelerator's (CUDA on a GPU, the CPU
generator on CPU), reached through megatron.accelerator, so the same code runs anywhere.

When DeepSpeed's activation checkpointing is configured
(``deepspeed.checkpointing.configure``), the tracker, the seeding and `checkpoint` are
DeepSpeed's, as in Megatron-DeepSpeed, so that its recompute restores the same states.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Iterator

import torch

from megatron.accelerator import get_accelerator

from .initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from .utils import divide

__all__ = [
    "RNGStatesTracker",
    "CudaRNGStatesTracker",
    "get_cuda_rng_tracker",
    "get_rng_tracker",
    "model_parallel_cuda_manual_seed",
    "model_parallel_manual_seed",
    "checkpoint",
    "split_tensor_into_1d_equal_chunks",
    "gather_split_1d_tensor",
]

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _deepspeed_checkpointing():
    """DeepSpeed's checkpointing module when it has been configured, else None."""
    deepspeed = sys.modules.get("deepspeed")  # never import it just to ask
    checkpointing = getattr(deepspeed, "checkpointing", None)
    if checkpointing is None or not checkpointing.is_configured():
        return None
    return checkpointing


class RNGStatesTracker:
    """Named device-generator states, each entered with `fork(name)`.

    `add(name, seed)` creates a state as if the device generator were seeded with `seed`,
    without disturbing the current one. Inside `fork(name)` random ops draw from that
    state; on exit its advanced state is stored and the previous one restored.
    """

    def __init__(self) -> None:
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_: set = set()

    def reset(self) -> None:
        """Forget every tracked state and seed."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the name -> generator-state dict (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        """Replace the tracked states (as returned by get_states)."""
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Track a new state `name` seeded with `seed` (both must be new)."""
        if seed in self.seeds_:
            raise ValueError(f"megatron/mpu/random.py: rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"megatron/mpu/random.py: rng state {name!r} already exists")
        self.seeds_.add(seed)
        accelerator = get_accelerator()
        orig_state = accelerator.get_rng_state()
        accelerator.manual_seed(seed)
        self.states_[name] = accelerator.get_rng_state()
        accelerator.set_rng_state(orig_state)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Draw from the tracked state `name` inside the block, then switch back."""
        if name not in self.states_:
            raise KeyError(f"megatron/mpu/random.py: rng state {name!r} is not added")
        accelerator = get_accelerator()
        orig_state = accelerator.get_rng_state()
        accelerator.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = accelerator.get_rng_state()
            accelerator.set_rng_state(orig_state)


# Megatron's name for the same class.
CudaRNGStatesTracker = RNGStatesTracker

_RNG_STATE_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker():
    """The process-wide RNG states tracker (Megatron's name; device-neutral)."""
    ds = _deepspeed_checkpointing()
    if ds is not None:
        return ds.get_cuda_rng_tracker()
    return _RNG_STATE_TRACKER


def get_rng_tracker():
    """Same object as get_cuda_rng_tracker()."""
    return get_cuda_rng_tracker()


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the device generator with `seed` (equal on all tensor-parallel ranks) and the
    tracker's 'model-parallel-rng' state with seed + 2718 + tp_rank (distinct per rank).

    Call it after initialize_model_parallel(). The CPU generator is seeded by the caller
    (torch.manual_seed), as Megatron's initialisation does; on CPU the two are one.
    """
    ds = _deepspeed_checkpointing()
    if ds is not None:
        ds.model_parallel_cuda_manual_seed(seed)
        return
    tensor_model_parallel_seed = seed + 2718 + get_tensor_model_parallel_rank()
    _RNG_STATE_TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tensor_model_parallel_seed)


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Megatron's name for model_parallel_manual_seed."""
    model_parallel_manual_seed(seed)


# --------------------------------------------------------------------------------------
# Splitting a saved activation across tensor-parallel ranks
# --------------------------------------------------------------------------------------


def split_tensor_into_1d_equal_chunks(
    tensor: torch.Tensor, new_buffer: bool = False
) -> torch.Tensor:
    """This rank's 1/p of the flattened tensor (p = TP world size); a view unless
    `new_buffer`, which copies it into fresh memory."""
    world_size = get_tensor_model_parallel_world_size()
    partition_size = divide(tensor.numel(), world_size)
    start = partition_size * get_tensor_model_parallel_rank()
    data = tensor.reshape(-1)[start : start + partition_size]
    if new_buffer:
        data = data.detach().clone()
    return data


def gather_split_1d_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of split_tensor_into_1d_equal_chunks: the flat concatenation of every
    tensor-parallel rank's chunk, in rank order."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return tensor
    chunks = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(
        chunks, tensor.contiguous(), group=get_tensor_model_parallel_group()
    )
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------


def _capture_rng() -> tuple:
    return (
        torch.get_rng_state(),
        get_accelerator().get_rng_state(),
        get_cuda_rng_tracker().get_states(),
    )


def _restore_rng(states: tuple) -> None:
    cpu_state, device_state, tracker_states = states
    torch.set_rng_state(cpu_state)
    get_accelerator().set_rng_state(device_state)
    get_cuda_rng_tracker().set_states(tracker_states)


class CheckpointFunction(torch.autograd.Function):
    """Run `run_function` without keeping its activations; recompute them in backward.

    Forward saves the inputs and the CPU, device and tracker RNG states; backward
    restores those states, reruns the function with grad enabled (so dropout draws the
    same masks) and backpropagates through it. With `distribute_saved_activations` the
    first input is kept as this rank's 1/p chunk and all-gathered before the recompute.

    `run_function` may return one tensor or a tuple of them (e.g. the hidden states and
    each MoE layer's auxiliary loss). Backward runs one torch.autograd.backward over every
    recomputed output that requires grad and received a gradient (an output the loss did
    not use gets None): d inputs = sum_i (d out_i / d inputs)^T g_i, in one pass.
    """

    @staticmethod
    def forward(ctx, run_function, distribute_saved_activations, *args):
        ctx.run_function = run_function
        ctx.distribute_saved_activations = distribute_saved_activations
        ctx.rng_states = _capture_rng()
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros
        with torch.no_grad():
            outputs = run_function(*args)

        ctx.is_tensor = [torch.is_tensor(a) for a in args]
        ctx.non_tensor_args = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        tensors = [a for a in args if torch.is_tensor(a)]
        ctx.input_requires_grad = [t.requires_grad for t in tensors]
        if distribute_saved_activations and ctx.is_tensor and ctx.is_tensor[0]:
            ctx.input_0_shape = args[0].shape
            tensors[0] = split_tensor_into_1d_equal_chunks(args[0].detach(), new_buffer=True)
        else:
            ctx.distribute_saved_activations = False
        ctx.save_for_backward(*tensors)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "megatron/mpu/random.py: checkpoint() does not support torch.autograd.grad(); "
                "use .backward()"
            )
        tensors = list(ctx.saved_tensors)
        if all(grad is None for grad in grad_outputs):  # no output reached the loss
            return (None, None) + (None,) * len(ctx.is_tensor)
        if ctx.distribute_saved_activations:
            tensors[0] = gather_split_1d_tensor(tensors[0]).view(ctx.input_0_shape)
        tensor_iter = iter(zip(tensors, ctx.input_requires_grad))
        inputs = []
        for is_tensor, other in zip(ctx.is_tensor, ctx.non_tensor_args):
            if not is_tensor:
                inputs.append(other)
                continue
            saved, requires_grad = next(tensor_iter)
            detached = saved.detach()
            detached.requires_grad_(requires_grad)
            inputs.append(detached)

        # Recompute under the forward pass's RNG states, then put the current ones back.
        current = _capture_rng()
        _restore_rng(ctx.rng_states)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        finally:
            _restore_rng(current)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs)
            if torch.is_tensor(out) and out.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        grads = tuple(inp.grad if torch.is_tensor(inp) else None for inp in inputs)
        return (None, None) + grads


def checkpoint(function, distribute_saved_activations: bool, *args) -> Any:
    """function(*args), with its activations recomputed in the backward pass.

    Dropout inside `function` draws identical masks in the forward pass and in the
    recompute, so gradients equal those of an ordinary (stored) run. `function` may
    return a tuple of tensors; gradients from all of them flow back through the recompute.
    """
    ds = _deepspeed_checkpointing()
    if ds is not None:
        return ds.checkpoint(function, *args)
    return CheckpointFunction.apply(function, distribute_saved_activations, *args)
