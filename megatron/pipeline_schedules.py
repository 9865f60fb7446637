"""Pipeline-parallel schedules: 1F1B and interleaved 1F1B (see schedules.py for the
contract they share).

1F1B (PipeDream-Flush): stage r runs (p - r - 1) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards; at most p micro-batches
of activations are alive on any stage.

Interleaved 1F1B: each rank holds v model chunks (virtual stages); micro-batches visit
chunk 0 of every rank, then chunk 1, ...; the bubble shrinks by a factor v at the cost of
v times more point-to-point messages. The number of micro-batches must be a multiple of p.
"""

from __future__ import annotations

from . import get_args, get_num_microbatches, mpu
from . import p2p_communication as p2p
from .schedules import (
    allreduce_torch_ddp_grads,
    backward_step,
    forward_step,
    torch_ddp_no_sync,
)


def get_tensor_shapes():
    """[s, b, h] of the activations exchanged between stages."""
    args = get_args()
    seq_length = getattr(args, "curriculum_seqlen", None) or args.seq_length
    return (seq_length, args.micro_batch_size, args.hidden_size)


def forward_backward_pipelining_without_interleaving(
    forward_step_func, data_iterator, model, optimizer, forward_only: bool
):
    """1F1B without interleaving; returns the loss dicts on the last stage."""
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError(f"non-interleaved pipelining takes one model chunk, got {len(model)}")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    with torch_ddp_no_sync([model]):
        losses = _one_f_one_b(forward_step_func, data_iterator, model, optimizer, forward_only)
    if not forward_only:
        allreduce_torch_ddp_grads([model])
    return losses


def _one_f_one_b(forward_step_func, data_iterator, model, optimizer, forward_only: bool):
    shape = get_tensor_shapes()
    num_microbatches = get_num_microbatches()
    num_warmup = (
        num_microbatches
        if forward_only
        else min(
            mpu.get_pipeline_model_parallel_world_size()
            - mpu.get_pipeline_model_parallel_rank()
            - 1,
            num_microbatches,
        )
    )
    num_remaining = num_microbatches - num_warmup
    input_tensors, output_tensors, losses_reduced = [], [], []

    for _ in range(num_warmup):
        input_tensor = p2p.recv_forward(shape)
        output_tensor = forward_step(
            forward_step_func, data_iterator, model, input_tensor, losses_reduced
        )
        p2p.send_forward(output_tensor, shape)
        if not forward_only:
            input_tensors.append(input_tensor)
            output_tensors.append(output_tensor)

    input_tensor = p2p.recv_forward(shape) if num_remaining > 0 else None
    for i in range(num_remaining):
        last_iteration = i == num_remaining - 1
        output_tensor = forward_step(
            forward_step_func, data_iterator, model, input_tensor, losses_reduced
        )
        if forward_only:
            p2p.send_forward(output_tensor, shape)
            if not last_iteration:
                input_tensor = p2p.recv_forward(shape)
            continue
        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, shape)
        input_tensors.append(input_tensor)
        output_tensors.append(output_tensor)
        input_tensor, output_tensor = input_tensors.pop(0), output_tensors.pop(0)
        input_tensor_grad = backward_step(
            optimizer, input_tensor, output_tensor, output_tensor_grad, model
        )
        if last_iteration:
            input_tensor = None
            p2p.send_backward(input_tensor_grad, shape)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, shape)

    if not forward_only:
        for _ in range(num_warmup):
            input_tensor, output_tensor = input_tensors.pop(0), output_tensors.pop(0)
            output_tensor_grad = p2p.recv_backward(shape)
            input_tensor_grad = backward_step(
                optimizer, input_tensor, output_tensor, output_tensor_grad, model
            )
            p2p.send_backward(input_tensor_grad, shape)
    return losses_reduced


class _Interleaved:
    """State of one interleaved 1F1B pass (the per-chunk queues and chunk arithmetic)."""

    def __init__(self, forward_step_func, data_iterator, model, optimizer, forward_only):
        self.forward_step_func = forward_step_func
        self.data_iterator = data_iterator
        self.model = model
        self.optimizer = optimizer
        self.forward_only = forward_only
        self.num_chunks = len(model)
        self.pp = mpu.get_pipeline_model_parallel_world_size()
        self.input_tensors = [[] for _ in model]
        self.output_tensors = [[] for _ in model]
        self.output_tensor_grads = [[] for _ in model]
        self.losses_reduced = []

    def chunk_id(self, microbatch_id: int, forward: bool) -> int:
        in_group = microbatch_id % (self.pp * self.num_chunks)
        chunk = in_group // self.pp
        return chunk if forward else self.num_chunks - chunk - 1

    def forward(self, microbatch_id: int):
        chunk = self.chunk_id(microbatch_id, forward=True)
        mpu.set_virtual_pipeline_model_parallel_rank(chunk)
        if mpu.is_pipeline_first_stage() and (
            len(self.input_tensors[chunk]) == len(self.output_tensors[chunk])
        ):
            self.input_tensors[chunk].append(None)
        input_tensor = self.input_tensors[chunk][-1]
        output_tensor = forward_step(
            self.forward_step_func,
            self.data_iterator[chunk],
            self.model[chunk],
            input_tensor,
            self.losses_reduced,
        )
        self.output_tensors[chunk].append(output_tensor)
        if self.forward_only:
            self.input_tensors[chunk].pop()
            self.output_tensors[chunk].pop()
        return output_tensor

    def backward(self, microbatch_id: int):
        chunk = self.chunk_id(microbatch_id, forward=False)
        mpu.set_virtual_pipeline_model_parallel_rank(chunk)
        if mpu.is_pipeline_last_stage() and not self.output_tensor_grads[chunk]:
            self.output_tensor_grads[chunk].append(None)
        input_tensor = self.input_tensors[chunk].pop(0)
        output_tensor = self.output_tensors[chunk].pop(0)
        output_tensor_grad = self.output_tensor_grads[chunk].pop(0)
        return backward_step(
            self.optimizer, input_tensor, output_tensor, output_tensor_grad, self.model[chunk]
        )


def forward_backward_pipelining_with_interleaving(
    forward_step_func, data_iterator, model, optimizer, forward_only: bool
):
    """Interleaved 1F1B over len(model) chunks per rank (data_iterator: one per chunk)."""
    if not isinstance(data_iterator, list):
        data_iterator = [data_iterator] * len(model)
    with torch_ddp_no_sync(model):
        losses = _interleaved_one_f_one_b(
            forward_step_func, data_iterator, model, optimizer, forward_only
        )
    if not forward_only:
        allreduce_torch_ddp_grads(model)
    return losses


def _interleaved_one_f_one_b(
    forward_step_func, data_iterator, model, optimizer, forward_only: bool
):
    st = _Interleaved(forward_step_func, data_iterator, model, optimizer, forward_only)
    shape = get_tensor_shapes()
    pp, pp_rank, v = st.pp, mpu.get_pipeline_model_parallel_rank(), st.num_chunks
    if get_num_microbatches() % pp != 0:
        raise ValueError(
            f"interleaved pipelining needs the number of micro-batches "
            f"({get_num_microbatches()}) to be a multiple of --pipeline-model-parallel-size "
            f"({pp})"
        )
    total = get_num_microbatches() * v
    all_warmup = False
    if forward_only:
        num_warmup = total
    elif get_num_microbatches() == pp:
        num_warmup, all_warmup = total, True
    else:
        num_warmup = min((pp - pp_rank - 1) * 2 + (v - 1) * pp, total)
    num_remaining = total - num_warmup

    mpu.set_virtual_pipeline_model_parallel_rank(0)
    st.input_tensors[0].append(p2p.recv_forward(shape))
    for k in range(num_warmup):
        output_tensor = st.forward(k)
        next_chunk = st.chunk_id(k + 1, forward=True)
        recv_prev = not (mpu.is_pipeline_first_stage(ignore_virtual=True) and next_chunk == 0)
        if k == total - 1:
            recv_prev = False
        if mpu.is_pipeline_last_stage():
            output_tensor = None
        if k == num_warmup - 1 and not forward_only and not all_warmup:
            recv_next = not mpu.is_pipeline_last_stage(ignore_virtual=True)
            input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
                output_tensor, None, recv_prev, recv_next, shape
            )
            st.output_tensor_grads[v - 1].append(output_tensor_grad)
        else:
            input_tensor = p2p.send_forward_recv_forward(output_tensor, recv_prev, shape)
        st.input_tensors[next_chunk].append(input_tensor)

    for k in range(num_remaining):
        forward_k, backward_k = k + num_warmup, k
        output_tensor = st.forward(forward_k)
        input_tensor_grad = st.backward(backward_k)

        mpu.set_virtual_pipeline_model_parallel_rank(st.chunk_id(forward_k, forward=True))
        if mpu.is_pipeline_last_stage():
            output_tensor = None
        mpu.set_virtual_pipeline_model_parallel_rank(st.chunk_id(backward_k, forward=False))
        if mpu.is_pipeline_first_stage():
            input_tensor_grad = None

        recv_prev = True
        if mpu.is_pipeline_first_stage(ignore_virtual=True):
            next_forward = st.chunk_id(forward_k - (pp - 1), forward=True)
            if next_forward == v - 1:
                recv_prev = False
            next_forward += 1
        else:
            next_forward = st.chunk_id(forward_k + 1, forward=True)
        recv_next = True
        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            next_backward = st.chunk_id(backward_k - (pp - 1), forward=False)
            if next_backward == 0:
                recv_next = False
            next_backward -= 1
        else:
            next_backward = st.chunk_id(backward_k + 1, forward=False)
        if k == num_remaining - 1:
            recv_prev = False
        input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
            output_tensor, input_tensor_grad, recv_prev, recv_next, shape
        )
        if recv_prev:
            st.input_tensors[next_forward].append(input_tensor)
        if recv_next:
            st.output_tensor_grads[next_backward].append(output_tensor_grad)

    if not forward_only:
        if all_warmup:
            st.output_tensor_grads[v - 1].append(p2p.recv_backward(shape))
        for k in range(num_remaining, total):
            input_tensor_grad = st.backward(k)
            next_backward = st.chunk_id(k + 1, forward=False)
            recv_next = not (
                mpu.is_pipeline_last_stage(ignore_virtual=True) and next_backward == v - 1
            )
            if k == total - 1:
                recv_next = False
            st.output_tensor_grads[next_backward].append(
                p2p.send_backward_recv_backward(input_tensor_grad, recv_next, shape)
            )
    mpu.set_virtual_pipeline_model_parallel_rank(0)
    return st.losses_reduced
