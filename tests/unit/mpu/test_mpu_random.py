"""RNG tracker, model-parallel seeding and activation checkpointing (1 process and 2 ranks),
plus the small utils."""

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.dist_utils import run_distributed


def test_utils():
    assert mpu.divide(12, 4) == 3
    with pytest.raises(ValueError, match="10 is not divisible by 4"):
        mpu.divide(10, 4)
    with pytest.raises(ValueError, match="not divisible"):
        mpu.ensure_divisibility(3, 0)
    x = torch.arange(24.0).view(2, 3, 4)
    chunks = mpu.split_tensor_along_last_dim(x, 2)
    assert [c.shape for c in chunks] == [(2, 3, 2), (2, 3, 2)]
    assert torch.equal(torch.cat(chunks, -1), x) and not chunks[0].is_contiguous()
    assert all(c.is_contiguous() for c in mpu.split_tensor_along_last_dim(x, 2, True))
    assert mpu.VocabUtility.vocab_range_from_global_vocab_size(16, 3, 4) == (12, 16)
    assert mpu.VocabUtility.vocab_range_from_per_partition_vocab_size(5, 1, 2) == (5, 10)


def test_tracker_single_process():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 11)
    with pytest.raises(ValueError, match="seed 11 already exists"):
        tracker.add("b", 11)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 12)
    with pytest.raises(KeyError, match="'zz' is not added"):
        with tracker.fork("zz"):
            pass

    torch.manual_seed(5)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(4)), "state 'a' must start as seed 11"
    saved = tracker.get_states()
    with tracker.fork("a"):
        second = torch.rand(4)
    assert not torch.equal(first, second), "the tracked state must advance"
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(4), second), "set_states must rewind"
    tracker.reset()
    assert tracker.get_states() == {}
    assert mpu.get_rng_tracker() is mpu.get_cuda_rng_tracker()


class _DropoutBlock(torch.nn.Module):
    """Linear -> dropout (shared stream) -> linear -> dropout (model-parallel stream)."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(6, 6))
        self.w2 = torch.nn.Parameter(torch.randn(6, 6))

    def forward(self, x, scale):
        h = F.dropout(F.linear(x, self.w1), p=0.5, training=True)
        with mpu.get_cuda_rng_tracker().fork():
            h = F.dropout(F.linear(torch.tanh(h), self.w2), p=0.5, training=True)
        return h * scale


def _gather_all(t):
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return out


def _check_seeding(tp, r):
    mpu.model_parallel_manual_seed(123)
    ones = torch.ones(4096)
    shared = F.dropout(ones, p=0.5, training=True)
    with mpu.get_cuda_rng_tracker().fork():
        private = F.dropout(ones, p=0.5, training=True)
    masks = _gather_all(shared)
    assert all(torch.equal(m, masks[0]) for m in masks), "dropout outside fork must agree"
    masks = _gather_all(private)
    assert not torch.equal(masks[0], masks[1]), "dropout inside fork must differ across TP"
    # the tracked stream is seed + 2718 + tp_rank
    torch.manual_seed(123 + 2718 + r)
    assert torch.equal(private, F.dropout(ones, p=0.5, training=True))
    mpu.model_parallel_cuda_manual_seed(123)  # Megatron's name, same behaviour
    assert torch.equal(shared, F.dropout(ones, p=0.5, training=True))


def _grads_of(block, x, fn):
    for p in block.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


def _check_checkpoint(tp, r):
    torch.manual_seed(0)
    block = _DropoutBlock()
    x = torch.randn(4, 3, 6)  # [s, b, h]
    results = []
    for mode in ("plain", "checkpoint", "distributed"):
        mpu.model_parallel_manual_seed(99)
        if mode == "plain":
            fn = lambda t: block(t, 2.0)  # noqa: E731
        else:
            fn = lambda t, d=(mode == "distributed"): mpu.checkpoint(block, d, t, 2.0)  # noqa: E731
        results.append(_grads_of(block, x, fn))
        # the RNG streams advanced exactly as in the plain run
        results[-1] += (torch.get_rng_state(), mpu.get_cuda_rng_tracker().get_states())
    plain = results[0]
    for mode, other in zip(("checkpoint", "distributed"), results[1:]):
        assert torch.equal(other[0], plain[0]), f"{mode}: forward differs"
        assert torch.equal(other[1], plain[1]), f"{mode}: input grad differs"
        for a, b in zip(other[2], plain[2]):
            assert torch.equal(a, b), f"{mode}: weight grad differs (recompute used other masks?)"
        assert torch.equal(other[3], plain[3]), f"{mode}: default RNG state not restored"
        for name in plain[4]:
            assert torch.equal(other[4][name], plain[4][name]), f"{mode}: tracker not restored"


class _MultiOutputBlock(_DropoutBlock):
    """(h, aux, spare): h as _DropoutBlock, a scalar aux loss drawn from more dropout
    (like a MoE layer's), and an output no loss uses (its incoming gradient is None)."""

    def forward(self, x, scale):
        h = super().forward(x, scale)
        aux = F.dropout(torch.sigmoid(h), p=0.5, training=True).pow(2).mean()
        return h, aux, h.sum(dim=-1)


def _multi_grads(block, x, fn, use_hidden):
    for p in block.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    h, aux, spare = fn(x)
    loss = 3.0 * aux
    if use_hidden:
        loss = loss + (h * torch.arange(h.numel(), dtype=h.dtype).view_as(h)).sum()
    loss.backward()
    return [h.detach(), aux.detach(), spare.detach(), x.grad] + [
        p.grad.clone() for p in block.parameters()
    ]


def _check_checkpoint_multi_output(tp, r):
    """A checkpointed function returning several tensors: the gradients of all outputs
    the loss uses flow back through one recompute, unused ones (None) are skipped."""
    torch.manual_seed(1)
    block = _MultiOutputBlock()
    x = torch.randn(4, 3, 6)  # [s, b, h]
    for use_hidden in (True, False):
        results = {}
        for mode in ("plain", "checkpoint", "distributed"):
            mpu.model_parallel_manual_seed(7)
            if mode == "plain":
                fn = lambda t: block(t, 2.0)  # noqa: E731
            else:
                fn = lambda t, d=(mode == "distributed"): mpu.checkpoint(block, d, t, 2.0)  # noqa: E731
            results[mode] = _multi_grads(block, x, fn, use_hidden)
        assert results["plain"][1] > 0  # the aux output carries a gradient
        for mode in ("checkpoint", "distributed"):
            for i, (a, b) in enumerate(zip(results[mode], results["plain"])):
                assert torch.equal(a, b), f"{mode}, use_hidden={use_hidden}: item {i} differs"


def _check_split_1d(tp, r):
    t = torch.arange(24.0).view(4, 6)
    chunk = mpu.split_tensor_into_1d_equal_chunks(t, new_buffer=True)
    assert torch.equal(chunk, torch.arange(24.0).chunk(tp)[r])
    assert torch.equal(mpu.gather_split_1d_tensor(chunk).view(4, 6), t)


def _check_world(rank, world_size):
    mpu.initialize_model_parallel(world_size, 1)
    tp, r = world_size, mpu.get_tensor_model_parallel_rank()
    _check_seeding(tp, r)
    _check_checkpoint(tp, r)
    _check_checkpoint_multi_output(tp, r)
    _check_split_1d(tp, r)
    mpu.destroy_model_parallel()


def test_rng_and_checkpoint_two_ranks():
    run_distributed(_check_world, world_size=2, timeout=120)
