"""Point-to-point activation and gradient exchange between pipeline stages.

Every exchange is one batch of isend/irecv (torch.distributed.batch_isend_irecv), which
works on gloo (CPU) and NCCL (GPU). Tensors are [s, b, h] (s / tp under sequence
parallelism). With --scatter-gather-tensors-in-pipeline and TP > 1, each rank sends only
its 1/tp slice of the flattened tensor and the receiver all-gathers it inside its tensor
group: TP ranks hold identical activations between stages, so this moves 1/tp of the bytes
over the inter-stage link.
"""

from __future__ import annotations

import torch

from . import get_args, mpu
from .accelerator import current_device


def _p2p_shape(tensor_shape, args):
    if args.sequence_parallel:
        tp = mpu.get_tensor_model_parallel_world_size()
        s, b, h = tensor_shape
        return (s // tp, b, h)
    return tuple(tensor_shape)


def _use_scatter_gather(args) -> bool:
    return (
        args.scatter_gather_tensors_in_pipeline
        and not args.sequence_parallel
        and mpu.get_tensor_model_parallel_world_size() > 1
    )


def _dtype(args) -> torch.dtype:
    if args.fp32_residual_connection:
        return torch.float
    return args.params_dtype


def _communicate(
    tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool, tensor_shape, dtype=None
):
    """Send to / receive from the neighbouring stages; returns (from prev, from next)."""
    args = get_args()
    shape = _p2p_shape(tensor_shape, args)
    dtype = dtype or _dtype(args)
    scatter_gather = _use_scatter_gather(args)
    numel = 1
    for d in shape:
        numel *= d
    comm_shape = (numel // mpu.get_tensor_model_parallel_world_size(),) if scatter_gather else shape
    device = current_device()

    # Receive buffers are plain tensors: the backend writes into them in place, and only
    # then do they become autograd leaves (requires_grad) for the backward pass.
    tensor_recv_prev = tensor_recv_next = None
    if recv_prev:
        tensor_recv_prev = torch.empty(comm_shape, device=device, dtype=dtype)
    if recv_next:
        tensor_recv_next = torch.empty(comm_shape, device=device, dtype=dtype)
    if scatter_gather:
        if tensor_send_next is not None:
            tensor_send_next = mpu.split_tensor_into_1d_equal_chunks(tensor_send_next)
        if tensor_send_prev is not None:
            tensor_send_prev = mpu.split_tensor_into_1d_equal_chunks(tensor_send_prev)

    # Messages between two ranks are matched in the order they are posted. With two stages
    # the previous and the next stage are the same rank (interleaving wraps around), so
    # every rank posts activations before gradients on both sides: sends to next, then to
    # prev; receives from prev, then from next. A's (activation, gradient) to B then meet
    # B's (recv from prev, recv from next) in the same order.
    prev_rank = mpu.get_pipeline_model_parallel_prev_rank()
    next_rank = mpu.get_pipeline_model_parallel_next_rank()
    group = mpu.get_pipeline_model_parallel_group()
    ops = []
    for op, tensor, peer in (
        (torch.distributed.isend, tensor_send_next, next_rank),
        (torch.distributed.isend, tensor_send_prev, prev_rank),
        (torch.distributed.irecv, tensor_recv_prev, prev_rank),
        (torch.distributed.irecv, tensor_recv_next, next_rank),
    ):
        if tensor is not None:
            ops.append(torch.distributed.P2POp(op, tensor.contiguous(), peer, group))
    if ops:
        for req in torch.distributed.batch_isend_irecv(ops):
            req.wait()
    if scatter_gather:
        if recv_prev:
            tensor_recv_prev = mpu.gather_split_1d_tensor(tensor_recv_prev).view(shape)
        if recv_next:
            tensor_recv_next = mpu.gather_split_1d_tensor(tensor_recv_next).view(shape)
    if tensor_recv_prev is not None:
        tensor_recv_prev.requires_grad_()
    if tensor_recv_next is not None:
        tensor_recv_next.requires_grad_()
    return tensor_recv_prev, tensor_recv_next


def recv_forward(tensor_shape):
    """Activation from the previous stage (None on the first stage)."""
    if mpu.is_pipeline_first_stage():
        return None
    return _communicate(None, None, True, False, tensor_shape)[0]


def recv_backward(tensor_shape):
    """Gradient from the next stage (None on the last stage)."""
    if mpu.is_pipeline_last_stage():
        return None
    return _communicate(None, None, False, True, tensor_shape)[1]


def send_forward(output_tensor, tensor_shape) -> None:
    if not mpu.is_pipeline_last_stage():
        _communicate(output_tensor, None, False, False, tensor_shape)


def send_backward(input_tensor_grad, tensor_shape) -> None:
    if not mpu.is_pipeline_first_stage():
        _communicate(None, input_tensor_grad, False, False, tensor_shape)


def send_forward_recv_backward(output_tensor, tensor_shape):
    if mpu.is_pipeline_last_stage():
        return None
    return _communicate(output_tensor, None, False, True, tensor_shape)[1]


def send_backward_recv_forward(input_tensor_grad, tensor_shape):
    if mpu.is_pipeline_first_stage():
        return None
    return _communicate(None, input_tensor_grad, True, False, tensor_shape)[0]


def send_forward_recv_forward(output_tensor, recv_prev: bool, tensor_shape):
    return _communicate(output_tensor, None, recv_prev, False, tensor_shape)[0]


def send_backward_recv_backward(input_tensor_grad, recv_next: bool, tensor_shape):
    return _communicate(None, input_tensor_grad, False, recv_next, tensor_shape)[1]


def send_forward_backward_recv_forward_backward(
    output_tensor, input_tensor_grad, recv_prev: bool, recv_next: bool, tensor_shape
):
    return _communicate(output_tensor, input_tensor_grad, recv_prev, recv_next, tensor_shape)
