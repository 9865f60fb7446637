"""Megatron-DeepSpeed: large transformer training with tensor, pipeline and data parallelism.

Importing this package does not import torch, so that tools such as preprocess_data.py
start fast; the helpers below import it when called.
"""

from .global_vars import (  # noqa: F401
    get_args,
    get_current_global_batch_size,
    get_num_microbatches,
    get_tensorboard_writer,
    get_timers,
    get_tokenizer,
    update_num_microbatches,
)


def _rank() -> int:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_last_rank() -> bool:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    return True


def print_rank_0(message) -> None:
    """Print once, from global rank 0."""
    if _rank() == 0:
        print(message, flush=True)


def print_rank_last(message) -> None:
    """Print once, from the last global rank (the one that holds the loss under pipelining)."""
    if is_last_rank():
        print(message, flush=True)


def initialize_megatron(*args, **kwargs):
    from .initialize import initialize_megatron as _init

    return _init(*args, **kwargs)
