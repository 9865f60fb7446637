"""DeepSpeed-Ulysses sequence parallelism (--ds-sequence-parallel-size N).

The N ranks of a sequence group (megatron/mpu/initialize.py) read the same samples and
each keeps a contiguous slice of s/N tokens: rank i holds positions i s/N .. (i+1) s/N - 1
of the tokens, labels, loss mask and position ids (`slice_sequence`). Everything outside
the core attention (embeddings, projections, MLP, norms, the loss) is per token and runs
on [s/N, b, h] unchanged. Around the core attention, DeepSpeed's DistributedAttention
does an all-to-all that trades the sequence split for a head split,

    q, k, v [s/N, b, n, hn]  --all-to-all-->  [s, b, n/N, hn]
    context [s, b, n/N, hn]  --all-to-all-->  [s/N, b, n, hn]

so attention sees every token of n/N heads (n = the heads of this tensor-parallel rank)
and is exact: causal masking and softmax need the whole sequence, which no rank is short
of. RoPE is applied before the exchange at each token's global position.

Loss and gradients: every rank's loss is the masked mean over the whole sequence
(`masked_mean_over_sequence`: sums all-reduced over the sequence group), but the
backward of that all-reduce is the identity, so each rank seeds only its own tokens'
share of the loss; the gradient of the sample is then the sum of the sequence ranks'
gradients. Gradients are therefore summed over the sequence ranks and averaged over the
data ranks (the sequence-data group), as DeepSpeed's engine and ZeRO do for a mpu with
sequence groups, and as the local DDP does (megatron/model/distributed.py).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch

__all__ = ["UlyssesAttention", "masked_mean_over_sequence", "slice_sequence"]


def slice_sequence(
    tensors: Sequence[torch.Tensor | None], rank: int, size: int
) -> Tuple[torch.Tensor | None, ...]:
    """Rank `rank`'s contiguous slice [b, s/size] of each [b, s] tensor (None stays None)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        s = t.size(1)
        if s % size != 0:
            raise ValueError(
                f"megatron/model/ulysses.py: sequence length {s} is not divisible by "
                f"--ds-sequence-parallel-size ({size})"
            )
        chunk = s // size
        out.append(t[:, rank * chunk : (rank + 1) * chunk].contiguous())
    return tuple(out)


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce sum over `group`. Backward: the incoming gradient unchanged
    (each rank's input contributes to the sum once; the other ranks' gradients of their
    own inputs are their own business)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, group) -> torch.Tensor:
        value = value.clone()
        torch.distributed.all_reduce(value, group=group)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def masked_mean_over_sequence(
    losses: torch.Tensor, loss_mask: torch.Tensor, group
) -> torch.Tensor:
    """sum(losses * mask) / sum(mask) over the whole sequence, from each rank's slice
    losses, loss_mask [b, s/N]; the same value on every rank of `group`, whose gradient
    reaches only this rank's tokens (see the module docstring)."""
    losses = losses.float().reshape(-1)
    loss_mask = loss_mask.float().reshape(-1)
    numerator = _SumOverGroup.apply(torch.sum(losses * loss_mask), group)
    count = torch.sum(loss_mask).detach()
    torch.distributed.all_reduce(count, group=group)
    return numerator / count


class _CallLocalAttention(torch.nn.Module):
    """DistributedAttention's local attention: calls the function passed as the first
    extra argument on the exchanged q, k, v [s, b, n/N, hn] and returns its context
    [s, b, (n/N) hn] as [s, b, n/N, hn] for the return all-to-all. No parameters."""

    def forward(self, query, key, value, attention: Callable, *args) -> torch.Tensor:
        context = attention(query, key, value, *args)  # [s, b, (n/N) hn]
        return context.view(*query.shape)  # [s, b, n/N, hn]


class UlyssesAttention(torch.nn.Module):
    """Core attention over a sequence group through deepspeed.sequence.layer's
    DistributedAttention (no parameters, so no checkpoint keys).

    forward(attention, q [s/N, b, n, hn], k, v [s/N, b, ng, hn], *args) calls
    attention(q, k, v, *args) on [s, b, n/N, hn] (and [s, b, ng/N, hn]) and returns the
    context [s/N, b, n hn] of this rank's tokens."""

    def __init__(self, group) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        from megatron.deepspeed_comm import prepare_deepspeed

        prepare_deepspeed()  # DistributedAttention communicates through deepspeed.comm
        self.group = group
        # seq-first layout [s, b, heads, hn]: scatter the heads (dim 2), gather the sequence
        self.distributed_attention = DistributedAttention(
            _CallLocalAttention(), group, scatter_idx=2, gather_idx=0
        )

    def __deepcopy__(self, memo) -> UlyssesAttention:
        """A copy over the same process group (a group is a handle; it cannot be copied)."""
        return UlyssesAttention(self.group)

    def forward(self, attention: Callable, query, key, value, *args) -> torch.Tensor:
        sq, b = query.shape[:2]
        context = self.distributed_attention(
            query, key, value, 1, None, attention, *args  # batch dim 1, no RoPE inside
        )  # [s/N, b, n, hn]
        return context.reshape(sq, b, -1)  # [s/N, b, n hn]
