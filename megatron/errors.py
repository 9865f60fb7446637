"""Errors a run stops with, and how an entry point reports them.

The classes here are importable from any module without import cycles. `install_excepthook`
(called by initialize_megatron) prints an error a user can act on as one line,
`ClassName: message`, prefixed with the rank in a multi-rank job, and exits 1; any other
exception keeps its full traceback.
"""

from __future__ import annotations

import os
import sys


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or inf (an fp32 divergence, or an fp16 run whose
    overflows the loss scale can no longer absorb)."""


class DistributedTimeoutError(RuntimeError):
    """A collective waited longer than --distributed-timeout-minutes for another rank."""


# Classes (by module and name, so that nothing is imported here) whose message is the whole
# story: the traceback only hides it.
_ONE_LINE = {
    ("megatron.errors", "NonFiniteLossError"),
    ("megatron.errors", "DistributedTimeoutError"),
    ("megatron.arguments", "ArgumentError"),
    ("megatron.checkpointing", "CheckpointError"),
    ("megatron.checkpoint_reshape", "ReshapeError"),
    ("megatron.deepspeed_engine", "DeepSpeedConfigError"),
    ("megatron.data.indexed_dataset", "IndexedDatasetError"),
    ("megatron.data.dataset_utils", "DataPathError"),
}


def register_one_line_error(cls: type) -> type:
    """Class decorator: report `cls` as one line when it ends a run."""
    _ONE_LINE.add((cls.__module__, cls.__name__))
    return cls


def is_one_line_error(exc: BaseException) -> bool:
    return any((c.__module__, c.__name__) in _ONE_LINE for c in type(exc).__mro__)


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def _excepthook(exc_type, exc, tb) -> None:
    if exc is not None and is_one_line_error(exc):
        message = " ".join(str(exc).split("\n"))
        sys.stdout.flush()
        sys.stderr.write(f"{_rank_prefix()}{exc_type.__name__}: {message}\n")
        sys.stderr.flush()
        return  # the interpreter exits with status 1, as for any uncaught exception
    sys.__excepthook__(exc_type, exc, tb)


def install_excepthook() -> None:
    sys.excepthook = _excepthook
