"""Forward-backward schedules.

Contract of every schedule returned by get_forward_backward_func():

    losses = schedule(forward_step_func, data_iterator, model, optimizer, forward_only)

* forward_step_func(data_iterator, model) -> (output_tensor, loss_func), where
  loss_func(output_tensor) -> (loss, {name: reduced value}) on the last pipeline stage;
* it runs get_num_microbatches() micro-batches, scales each loss by 1/num_microbatches,
  runs the backward pass unless forward_only, and leaves the gradients accumulated in the
  model (the caller reduces them across data-parallel ranks and steps the optimizer);
* it returns the list of per-micro-batch loss dicts on the last pipeline stage and [] on
  the other stages.
"""

from __future__ import annotations

import contextlib

import torch

from . import get_num_microbatches, mpu


def get_forward_backward_func():
    """No pipelining (gradient accumulation), 1F1B, or interleaved 1F1B."""
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        from .pipeline_schedules import (
            forward_backward_pipelining_with_interleaving,
            forward_backward_pipelining_without_interleaving,
        )

        if mpu.get_virtual_pipeline_model_parallel_world_size() is not None:
            return forward_backward_pipelining_with_interleaving
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining


def is_torch_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


@contextlib.contextmanager
def torch_ddp_no_sync(model_chunks):
    """Suspend torch DDP's all-reduce inside backward on every chunk.

    Pipeline schedules run several forwards before their backwards, which torch DDP does
    not allow while it synchronises (its reducer expects forward, backward, forward, ...);
    they accumulate gradients locally and call allreduce_torch_ddp_grads at the end."""
    with contextlib.ExitStack() as stack:
        for chunk in model_chunks:
            if is_torch_ddp(chunk):
                stack.enter_context(chunk.no_sync())
        yield


def allreduce_torch_ddp_grads(model_chunks) -> None:
    """Average the accumulated .grad of torch-DDP chunks over their data-parallel group,
    g = (1 / DP) * sum over ranks of g_rank, one flat all-reduce per gradient dtype."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for chunk in model_chunks:
        if not is_torch_ddp(chunk):
            continue
        group = chunk.process_group
        world = torch.distributed.get_world_size(group=group)
        if world == 1:
            continue
        by_dtype = {}
        for param in chunk.module.parameters():
            if param.requires_grad and param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat, group=group)
            flat /= world
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)


def _unwrapped(model):
    from .utils import unwrap_model

    return unwrap_model(model)


def forward_step(forward_step_func, data_iterator, model, input_tensor, losses_reduced):
    """One micro-batch forward. On the last stage the output is the loss, divided by the
    number of micro-batches so that accumulated gradients average over the global batch."""
    _unwrapped(model).set_input_tensor(input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if mpu.is_pipeline_last_stage():
        loss, loss_reduced = loss_func(output_tensor)
        output_tensor = loss / get_num_microbatches()
        losses_reduced.append(loss_reduced)
    return output_tensor


def backward_step(optimizer, input_tensor, output_tensor, output_tensor_grad, model=None):
    """Backward through one micro-batch; returns the gradient w.r.t. its input tensor."""
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_tensor_grad is None:
        output_tensor = optimizer.scale_loss(output_tensor) if optimizer else output_tensor
        output_tensor.backward()
    else:
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    return None if input_tensor is None else input_tensor.grad


def forward_backward_no_pipelining(
    forward_step_func, data_iterator, model, optimizer, forward_only: bool
):
    """Gradient accumulation over the micro-batches; gradient all-reduce (torch DDP) only
    on the last micro-batch."""
    if isinstance(model, list):
        assert len(model) == 1, "non-pipelined schedule takes a single model chunk"
        model = model[0]
    no_sync = getattr(model, "no_sync", None)
    context = (
        no_sync
        if (no_sync is not None and not getattr(model, "_is_deepspeed_engine", False))
        else contextlib.nullcontext
    )
    losses_reduced = []
    num_microbatches = get_num_microbatches()
    with context():
        for _ in range(num_microbatches - 1):
            output_tensor = forward_step(
                forward_step_func, data_iterator, model, None, losses_reduced
            )
            if not forward_only:
                backward_step(optimizer, None, output_tensor, None, model)
    # the last micro-batch outside no_sync, so torch DDP all-reduces its gradients
    output_tensor = forward_step(forward_step_func, data_iterator, model, None, losses_reduced)
    if not forward_only:
        backward_step(optimizer, None, output_tensor, None, model)
    return losses_reduced
