"""Small helpers for splitting sizes and tensors across tensor-parallel ranks."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["ensure_divisibility", "divide", "split_tensor_along_last_dim", "VocabUtility"]


def ensure_divisibility(numerator: int, denominator: int) -> None:
    """Raise if `numerator` is not a multiple of `denominator`."""
    if denominator == 0 or numerator % denominator != 0:
        raise ValueError(f"megatron/mpu/utils.py: {numerator} is not divisible by {denominator}")


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator as an int, raising unless it divides exactly."""
    ensure_divisibility(numerator, denominator)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> Sequence[torch.Tensor]:
    """Split `tensor` into `num_partitions` equal views along its last dimension.

    The views share storage with `tensor`; `contiguous_split_chunks` makes each one
    contiguous (a copy).
    """
    last_dim = tensor.dim() - 1
    last_dim_size = divide(tensor.size()[last_dim], num_partitions)
    chunks = torch.split(tensor, last_dim_size, dim=last_dim)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


class VocabUtility:
    """The vocabulary is split into contiguous ranges [first, last) of equal size:
    rank r of p owns indices [r * V/p, (r + 1) * V/p)."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> Tuple[int, int]:
        index_f = rank * per_partition_vocab_size
        index_l = index_f + per_partition_vocab_size
        return index_f, index_l

    @staticmethod
    def vocab_range_from_global_vocab_size(
        global_vocab_size: int, rank: int, world_size: int
    ) -> Tuple[int, int]:
        per_partition_vocab_size = divide(global_vocab_size, world_size)
        return VocabUtility.vocab_range_from_per_partition_vocab_size(
            per_partition_vocab_size, rank, world_size
        )
