"""The pipeline schedules (megatron/pipeline_schedules.py over megatron/p2p_communication.py)
on 4 gloo ranks, as PP=4, PP=2 x DP=2 and TP=2 x PP=2: each rank's order of forward and
backward micro-batches is the 1F1B / interleaved 1F1B order worked out by hand below, and
the losses and gradients equal one process running every stage in turn (exactly: the
same operations in the same order). Also the no-pipelining schedule and forward_only.

The model is a stack of virtual stages, each Linear(h, h) + tanh seeded by its global
stage index; stage c of rank r in an interleaved run of p ranks is global stage c p + r.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import pytest
import torch

from megatron import global_vars, mpu
from megatron.microbatches import ConstantNumMicroBatches
from megatron.schedules import forward_backward_no_pipelining, get_forward_backward_func
from tests.dist_utils import run_distributed

S, B, H = 3, 2, 4  # activation [s, b, h] exchanged between stages

# "F1.2": forward of micro-batch 2 through model chunk 1 of this rank; "B..." backward.
# 1F1B, rank r of p: min(p - r - 1, m) warm-up forwards, then one forward / one backward,
# then the remaining backwards.
ONE_F_ONE_B = {
    # PP=2, 4 micro-batches
    (2, 0): "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 B0.3",
    (2, 1): "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3",
    # PP=4, 6 micro-batches
    (4, 0): "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5",
    (4, 1): "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 F0.4 B0.2 F0.5 B0.3 B0.4 B0.5",
    (4, 2): "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 F0.4 B0.3 F0.5 B0.4 B0.5",
    (4, 3): "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4 F0.5 B0.5",
}
# Interleaved, 2 chunks per rank: micro-batches go in groups of p through chunk 0, then
# the same group through chunk 1; backwards in the same groups from the last chunk.
# Warm-up on rank r: 2 (p - r - 1) + (2 - 1) p forwards.
INTERLEAVED = {
    # PP=2, 4 micro-batches (warm-up 4 and 2)
    (2, 0): "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3",
    (2, 1): "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3",
    # PP=4, 8 micro-batches (warm-up 10, 8, 6, 4 of 16)
    (4, 0): "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 F0.5 F0.6 B1.0 F0.7 B1.1 "
    "F1.4 B1.2 F1.5 B1.3 F1.6 B0.0 F1.7 B0.1 B0.2 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 "
    "B0.6 B0.7",
    (4, 1): "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 B1.0 F0.5 B1.1 F0.6 B1.2 "
    "F0.7 B1.3 F1.4 B0.0 F1.5 B0.1 F1.6 B0.2 F1.7 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 "
    "B0.6 B0.7",
    (4, 2): "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 B1.0 F1.3 B1.1 F0.4 B1.2 F0.5 B1.3 "
    "F0.6 B0.0 F0.7 B0.1 F1.4 B0.2 F1.5 B0.3 F1.6 B1.4 F1.7 B1.5 B1.6 B1.7 B0.4 B0.5 "
    "B0.6 B0.7",
    (4, 3): "F0.0 F0.1 F0.2 F0.3 F1.0 B1.0 F1.1 B1.1 F1.2 B1.2 F1.3 B1.3 F0.4 B0.0 "
    "F0.5 B0.1 F0.6 B0.2 F0.7 B0.3 F1.4 B1.4 F1.5 B1.5 F1.6 B1.6 F1.7 B1.7 B0.4 B0.5 "
    "B0.6 B0.7",
}


class _Record(torch.autograd.Function):
    """Identity that logs 'B<chunk>.<n>' when the gradient of a chunk's output arrives."""

    @staticmethod
    def forward(ctx, x, log, tag):
        ctx.log, ctx.tag = log, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.tag)
        return grad, None, None


class Stage(torch.nn.Module):
    """One virtual stage: tanh(x W^T + b), logging its forwards and backwards."""

    def __init__(self, global_stage: int, chunk: int, log: List[str]):
        super().__init__()
        torch.manual_seed(100 + global_stage)
        self.linear = torch.nn.Linear(H, H)
        self.chunk, self.log = chunk, log
        self.input_tensor = None
        self.calls = 0

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def forward(self, x):
        if x is None:
            x = self.input_tensor  # from the previous stage
        n = self.calls
        self.calls += 1
        self.log.append(f"F{self.chunk}.{n}")
        return _Record.apply(torch.tanh(self.linear(x)), self.log, f"B{self.chunk}.{n}")


def _microbatch(i: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def _forward_step(data_iterator, model):
    x, target = next(data_iterator)
    output = model(x if mpu.is_pipeline_first_stage() else None)

    def loss_func(out):
        loss = _loss(out, target)
        return loss, {"loss": loss.detach()}

    return output, loss_func


def _set_globals(num_microbatches: int, dp: int, scatter_gather: bool = False) -> None:
    args = argparse.Namespace(
        seq_length=S, micro_batch_size=B, hidden_size=H, sequence_parallel=False,
        scatter_gather_tensors_in_pipeline=scatter_gather, fp32_residual_connection=False,
        params_dtype=torch.float32,
    )  # fmt: skip
    global_vars.set_args(args)
    global_vars._GLOBAL_NUM_MICROBATCHES_CALCULATOR = ConstantNumMicroBatches(
        num_microbatches * B * dp, B, dp
    )


def _serial(num_stages: int, m: int):
    """Every stage in one process: (per-micro-batch losses, grads of each global stage)."""
    stages = [Stage(s, 0, []) for s in range(num_stages)]
    losses = []
    for i in range(m):
        x, target = _microbatch(i)
        for stage in stages:
            x = stage(x)
        loss = _loss(x, target)
        losses.append(loss.detach())
        (loss / m).backward()
    return losses, [[p.grad for p in stage.parameters()] for stage in stages]


def _run(pp: int, chunks: int, m: int, forward_only: bool = False, scatter_gather=False):
    """One pass of the selected schedule: (log, loss dicts, this rank's stages)."""
    rank = mpu.get_pipeline_model_parallel_rank()
    _set_globals(m, mpu.get_data_parallel_world_size(), scatter_gather)
    log: List[str] = []
    model = [Stage(c * pp + rank, c, log) for c in range(chunks)]
    iterators = [iter([_microbatch(i) for i in range(m)]) for _ in range(chunks)]
    schedule = get_forward_backward_func()
    losses = schedule(
        _forward_step,
        iterators if chunks > 1 else iterators[0],
        model if chunks > 1 else model[0],
        None,
        forward_only=forward_only,
    )
    return log, losses, model


def _check_schedule(
    pp: int, chunks: int, m: int, expected: Dict, scatter_gather: bool = False
) -> None:
    rank = mpu.get_pipeline_model_parallel_rank()
    log, losses, model = _run(pp, chunks, m, scatter_gather=scatter_gather)
    assert " ".join(log) == expected[(pp, rank)], f"PP={pp} x {chunks} rank {rank}: {log}"
    ref_losses, ref_grads = _serial(pp * chunks, m)
    last = rank == pp - 1
    assert len(losses) == (m if last else 0)
    if last:
        for i, (got, want) in enumerate(zip(losses, ref_losses)):
            assert torch.equal(got["loss"], want), f"micro-batch {i}: {got} != {want}"
    for c, stage in enumerate(model):
        for got, want in zip(stage.parameters(), ref_grads[c * pp + rank]):
            assert torch.equal(got.grad, want), f"PP={pp} x {chunks}: grad of chunk {c}"
    # forward only (evaluation): groups of pp micro-batches through each chunk in turn,
    # no backward, the same losses
    log, losses, _ = _run(pp, chunks, m, forward_only=True, scatter_gather=scatter_gather)
    if chunks == 1:
        want = [f"F0.{i}" for i in range(m)]
    else:
        want = [f"F{c}.{g + i}" for g in range(0, m, pp) for c in range(chunks) for i in range(pp)]
    assert log == want, f"forward only, PP={pp} x {chunks} rank {rank}: {log}"
    if last:
        assert torch.equal(torch.stack([d["loss"] for d in losses]), torch.stack(ref_losses))


def _check_all_warmup(pp: int) -> None:
    """Interleaved with as many micro-batches as stages: all forwards, then all backwards."""
    rank = mpu.get_pipeline_model_parallel_rank()
    log, _, model = _run(pp, 2, pp)
    forwards = [f"F{c}.{i}" for c in range(2) for i in range(pp)]
    backwards = [f"B{c}.{i}" for c in (1, 0) for i in range(pp)]
    assert log == forwards + backwards, f"rank {rank}: {log}"
    ref_grads = _serial(2 * pp, pp)[1]
    for c, stage in enumerate(model):
        for got, want in zip(stage.parameters(), ref_grads[c * pp + rank]):
            assert torch.equal(got.grad, want)


def _check_world(rank, world_size):
    for pp in (4, 2):
        vpp = 2
        mpu.initialize_model_parallel(1, pp, vpp)
        _check_schedule(pp, 2, 2 * pp, INTERLEAVED)
        _check_all_warmup(pp)
        mpu.destroy_model_parallel()
        mpu.initialize_model_parallel(1, pp)
        _check_schedule(pp, 1, 6 if pp == 4 else 4, ONE_F_ONE_B)
        mpu.destroy_model_parallel()
    # TP=2 x PP=2 with --scatter-gather-tensors-in-pipeline: each rank sends half of every
    # activation and gradient, the receiver all-gathers them in its tensor group
    mpu.initialize_model_parallel(2, 2)
    _check_schedule(2, 1, 4, ONE_F_ONE_B, scatter_gather=True)
    mpu.destroy_model_parallel()
    global_vars.reset_global_variables()


def test_pipeline_schedules_order_and_equal_serial():
    run_distributed(_check_world, world_size=4, timeout=150)


def test_no_pipelining_accumulates_like_serial():
    """Without pipelining: gradient accumulation over the micro-batches equals the serial
    sum, and the loss dicts come back in order."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group was left initialised in this process")
    mpu.destroy_model_parallel()
    _set_globals(3, 1)
    try:
        log: List[str] = []
        model = Stage(0, 0, log)
        data = iter([_microbatch(i) for i in range(3)])
        losses = forward_backward_no_pipelining(_forward_step, data, model, None, False)
        assert log == ["F0.0", "B0.0", "F0.1", "B0.1", "F0.2", "B0.2"]
        ref_losses, ref_grads = _serial(1, 3)
        assert torch.equal(torch.stack([d["loss"] for d in losses]), torch.stack(ref_losses))
        for got, want in zip(model.parameters(), ref_grads[0]):
            assert torch.equal(got.grad, want)
    finally:
        global_vars.reset_global_variables()
