"""The training backend: Megatron's own step, or DeepSpeed's engine, behind one interface.

`training.setup_model_and_optimizer` chooses the backend once; the loop, evaluation and
checkpoint saves then only call its methods:

    train_step(forward_step_func, data_iterator, state) -> StepResult
    eval_step(forward_step_func, data_iterator) -> per-micro-batch loss dicts
    save(state) / load(state) -> the checkpoint of state.iteration / the iteration loaded
    loss_scale() -> float;  extra_log_columns(state) -> {column: text} or None
    begin_iteration(state) -> sets state.curriculum_seqlen for the coming step

MegatronBackend is defined here; DeepSpeedBackend in megatron/deepspeed_engine.py (the
one module that imports deepspeed for training).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple

import torch

from . import get_args, get_num_microbatches, get_timers, mpu
from .accelerator import current_device
from .checkpointing import load_checkpoint, save_checkpoint
from .errors import NonFiniteLossError
from .schedules import get_forward_backward_func
from .train_state import TrainState
from .utils import calc_params_l2_norm, unwrap_model


class StepResult(NamedTuple):
    """What one training iteration reports to the log line."""

    losses: dict  # {name: value} averaged over the micro-batches ({} off the last stage)
    skipped: int  # 1 when the optimizer step was skipped (fp16 overflow)
    grad_norm: float | None
    num_zeros: float | None  # zeros in the gradient (--log-num-zeros-in-grad)
    got_nan: bool  # the skipped step's loss was NaN or inf


def empty_unused_memory(args, level: int) -> None:
    """--empty-unused-memory-level: give the accelerator's cached, unused blocks back
    (level 1 after each forward-backward, in training and evaluation; level 2 also after
    each optimizer step) to reduce fragmentation."""
    if args.empty_unused_memory_level >= level:
        from .accelerator import get_accelerator

        get_accelerator().empty_cache()


def bind_train_state(forward_step_func: Callable, state: TrainState) -> Callable:
    """forward_step_func with `train_state=state` when it takes that keyword (pretrain_gpt's
    forward step reads the curriculum length from it); otherwise unchanged."""
    try:
        params = inspect.signature(forward_step_func).parameters
    except (TypeError, ValueError):
        return forward_step_func
    if "train_state" not in params:
        return forward_step_func
    return functools.partial(forward_step_func, train_state=state)


class TrainingBackend:
    """The interface the training loop steps through (see the module docstring)."""

    name = "base"

    def __init__(self, model: list, optimizer, lr_scheduler):
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def train_step(self, forward_step_func, data_iterator, state: TrainState) -> StepResult:
        raise NotImplementedError

    def eval_step(self, forward_step_func, data_iterator) -> list:
        """Forward-only over the micro-batches of one global batch."""
        return get_forward_backward_func()(forward_step_func, data_iterator, self.model,
                                           None, forward_only=True)

    def save(self, state: TrainState) -> None:
        raise NotImplementedError

    def load(self, state: TrainState) -> int:
        raise NotImplementedError

    def loss_scale(self) -> float:
        raise NotImplementedError

    def extra_log_columns(self, state: TrainState) -> dict | None:
        return None

    def begin_iteration(self, state: TrainState) -> None:
        state.curriculum_seqlen = None

    def current_lr(self) -> float:
        return float(self.logging_optimizer().param_groups[0]["lr"])

    def logging_optimizer(self):
        """The optimizer holding the Adam state (for the optimizer-state statistics)."""
        return self.optimizer

    def params_norm(self) -> float | None:
        return calc_params_l2_norm(self.model)

    @property
    def dynamic_loss_scale(self) -> bool:
        """Whether an fp16 overflow backs the loss scale off (the overflow guard's minimum
        check applies)."""
        return False


def _allreduce_embedding_grads(model) -> None:
    """Sum the tied word-embedding gradients of the first and last pipeline stage."""
    if (mpu.get_pipeline_model_parallel_world_size() == 1
            or not mpu.is_rank_in_embedding_group(ignore_virtual=True)):
        return
    if mpu.is_pipeline_first_stage(ignore_virtual=True):
        unwrapped = unwrap_model(model[0])
    elif mpu.is_pipeline_last_stage(ignore_virtual=True):
        unwrapped = unwrap_model(model[-1])
    else:
        return
    if not getattr(unwrapped, "share_word_embeddings", True):
        return
    weight = unwrapped.word_embeddings_weight()
    grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
    if grad is not None:
        torch.distributed.all_reduce(grad, group=mpu.get_embedding_group())


def _allreduce_sequence_parallel_grads(model) -> None:
    """Under --sequence-parallel each TP rank sees only its slice of the sequence, so the
    gradients of the parameters replicated across TP (layer norms, row-parallel biases)
    are partial sums: add them up across the tensor group."""
    if not get_args().sequence_parallel or mpu.get_tensor_model_parallel_world_size() == 1:
        return
    grads = []
    for chunk in model:
        for param in unwrap_model(chunk).parameters():
            if getattr(param, "sequence_parallel", False):
                grad = param.main_grad if hasattr(param, "main_grad") else param.grad
                if grad is not None:
                    grads.append(grad)
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=mpu.get_tensor_model_parallel_group())
    for buf, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        buf.copy_(synced)


def _loss_is_finite(losses_reduced) -> bool:
    """All ranks agree whether every micro-batch loss was finite."""
    finite = all(torch.isfinite(v).all().item() if torch.is_tensor(v) else math.isfinite(v)
                 for d in losses_reduced for v in d.values())
    flag = torch.tensor([0.0 if finite else 1.0], device=current_device())
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


class MegatronBackend(TrainingBackend):
    """Megatron's own step: a forward-backward schedule over the micro-batches, the
    gradient reductions (data parallel, sequence parallel, tied embeddings), the
    optimizer step and AnnealingLR; Megatron's checkpoint folders."""

    name = "megatron"

    def train_step(self, forward_step_func, data_iterator, state: TrainState) -> StepResult:
        args = get_args()
        timers = get_timers()
        model, optimizer = self.model, self.optimizer
        if args.DDP_impl == "local" and args.use_contiguous_buffers_in_local_ddp:
            for chunk in model:
                chunk.zero_grad_buffer()
        optimizer.zero_grad()

        forward_backward_func = get_forward_backward_func()
        timers("forward-backward").start()
        losses_reduced = forward_backward_func(forward_step_func, data_iterator, model,
                                               optimizer, forward_only=False)
        timers("forward-backward").stop()
        empty_unused_memory(args, 1)
        if not _loss_is_finite(losses_reduced):
            if args.fp16 and args.loss_scale is None:
                # an fp16 forward that overflowed: skip the step like a gradient overflow,
                # and back the loss scale off as for one
                optimizer.skip_overflowed_step()
                return StepResult({}, 1, None, None, True)
            raise NonFiniteLossError(
                f"iteration {state.iteration + 1}: the loss is NaN or inf "
                f"({[{k: float(v) for k, v in d.items()} for d in losses_reduced][:4]}); "
                "stopping before the optimizer step so that the weights stay finite"
            )

        _allreduce_sequence_parallel_grads(model)
        timers("backward-params-all-reduce").start()
        # the distributed optimizer reduce-scatters in step(), after the embedding all-reduce
        if args.DDP_impl == "local" and not args.use_distributed_optimizer:
            for chunk in model:
                chunk.allreduce_gradients()
        timers("backward-params-all-reduce").stop()
        timers("backward-embedding-all-reduce").start()
        _allreduce_embedding_grads(model)
        timers("backward-embedding-all-reduce").stop()

        timers("optimizer").start()
        update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
        timers("optimizer").stop()
        if update_successful:
            increment = get_num_microbatches() * args.micro_batch_size * args.data_parallel_size
            self.lr_scheduler.step(increment=increment)
            skipped_iter = 0
        else:
            skipped_iter = 1
        empty_unused_memory(args, 2)

        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            loss_reduced = {}
            for key in losses_reduced[0]:
                values = [d[key] for d in losses_reduced]
                loss_reduced[key] = sum(values) / len(values)
            return StepResult(loss_reduced, skipped_iter, grad_norm, num_zeros_in_grad, False)
        return StepResult({}, skipped_iter, grad_norm, num_zeros_in_grad, False)

    def save(self, state: TrainState) -> None:
        save_checkpoint(state.iteration, self.model, self.optimizer, self.lr_scheduler,
                        train_state=state)

    def load(self, state: TrainState) -> int:
        return load_checkpoint(self.model, self.optimizer, self.lr_scheduler,
                               train_state=state)

    def loss_scale(self) -> float:
        return float(self.optimizer.get_loss_scale())

    @property
    def dynamic_loss_scale(self) -> bool:
        args = get_args()
        return bool(args.fp16 and args.loss_scale is None)


__all__ = ["TrainingBackend", "MegatronBackend", "StepResult", "bind_train_state",
           "empty_unused_memory"]
