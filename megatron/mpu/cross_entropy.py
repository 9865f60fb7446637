"""Cross entropy over logits whose vocabulary dimension is split across tensor-parallel ranks.

Rank r holds logits z[..., v] for v in its contiguous vocabulary range [f_r, l_r). The
per-token loss for target t is

    loss = log(sum_v exp(z_v - m)) - (z_t - m),   m = max_v z_v

computed with three all-reduces of per-token scalars (max, the target logit - held by one
rank only - and the sum of exponentials), never gathering the [.., V] logits. The
gradient with respect to the local logits is softmax(z)[f_r:l_r] - onehot(t)[f_r:l_r].
"""

from __future__ import annotations

import torch

from .initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from .utils import VocabUtility

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(tensor: torch.Tensor, op) -> None:
    if get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=get_tensor_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):
        # vocab_parallel_logits: [s, b, V/p]; target: [s, b] global token ids
        logits_max = vocab_parallel_logits.max(dim=-1)[0]  # [s, b]
        _all_reduce(logits_max, torch.distributed.ReduceOp.MAX)
        logits = vocab_parallel_logits - logits_max.unsqueeze(-1)  # [s, b, V/p], <= 0

        partition_vocab_size = logits.size(-1)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size,
            get_tensor_model_parallel_rank(),
            get_tensor_model_parallel_world_size(),
        )
        # Targets outside this rank's range contribute 0 here; the owner adds the logit.
        target_mask = (target < vocab_start) | (target >= vocab_end)
        masked_target = (target - vocab_start).masked_fill(target_mask, 0)

        logits_2d = logits.view(-1, partition_vocab_size)  # [s*b, V/p]
        masked_target_1d = masked_target.reshape(-1)
        rows = torch.arange(logits_2d.size(0), device=logits_2d.device)
        predicted_logits = logits_2d[rows, masked_target_1d].view_as(target)
        predicted_logits = predicted_logits.masked_fill(target_mask, 0.0).contiguous()
        _all_reduce(predicted_logits, torch.distributed.ReduceOp.SUM)

        exp_logits = torch.exp(logits)  # [s, b, V/p]
        sum_exp_logits = exp_logits.sum(dim=-1)  # [s, b]
        _all_reduce(sum_exp_logits, torch.distributed.ReduceOp.SUM)

        loss = torch.log(sum_exp_logits) - predicted_logits  # [s, b]

        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        # d loss / d z = softmax - onehot(target), restricted to the local vocabulary.
        grad_input = softmax * grad_output.unsqueeze(-1)  # [s, b, V/p]
        grad_2d = grad_input.view(-1, softmax.size(-1))
        rows = torch.arange(grad_2d.size(0), device=grad_2d.device)
        in_range = (~target_mask).reshape(-1).to(grad_2d.dtype)
        grad_2d[rows, masked_target_1d] -= in_range * grad_output.reshape(-1).to(grad_2d.dtype)
        return grad_input, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-token cross entropy (no reduction) of vocabulary-split logits.

    vocab_parallel_logits: [..., V/p], this rank's slice of the vocabulary;
    target: [...] global token ids. Returns the loss with the shape of `target`.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
