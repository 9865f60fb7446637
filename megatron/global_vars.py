"""Process-wide state set once by initialize_megatron(): args, tokenizer, timers,
TensorBoard writer and the micro-batch calculator."""

from __future__ import annotations

import os

from .timers import Timers

_GLOBAL_ARGS = None
_GLOBAL_NUM_MICROBATCHES_CALCULATOR = None
_GLOBAL_TOKENIZER = None
_GLOBAL_TENSORBOARD_WRITER = None
_GLOBAL_ADLR_AUTORESUME = None
_GLOBAL_TIMERS = None


def get_args():
    """The parsed arguments (for entry scripts, training and tasks; layers take a config)."""
    _ensure_var_is_initialized(_GLOBAL_ARGS, "args")
    return _GLOBAL_ARGS


def get_num_microbatches() -> int:
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR.get()


def get_current_global_batch_size() -> int:
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR.get_current_global_batch_size()


def update_num_microbatches(consumed_samples: int, consistency_check: bool = True) -> None:
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR.update(consumed_samples, consistency_check)


def get_tokenizer():
    _ensure_var_is_initialized(_GLOBAL_TOKENIZER, "tokenizer")
    return _GLOBAL_TOKENIZER


def get_tensorboard_writer():
    """The TensorBoard writer on the last rank when --tensorboard-dir is set, else None;
    with --wandb-project it writes to wandb as well."""
    return _GLOBAL_TENSORBOARD_WRITER


def get_adlr_autoresume():
    return _GLOBAL_ADLR_AUTORESUME


def get_timers():
    _ensure_var_is_initialized(_GLOBAL_TIMERS, "timers")
    return _GLOBAL_TIMERS


def set_global_variables(args, build_tokenizer: bool = True) -> None:
    """Set args, micro-batch calculator, tokenizer, TensorBoard writer and timers."""
    set_args(args)
    _build_num_microbatches_calculator(args)
    if build_tokenizer and getattr(args, "tokenizer_type", None):
        _build_tokenizer(args)
    _set_tensorboard_writer(args)
    _set_wandb_writer(args)
    _set_timers(args)


def set_args(args) -> None:
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


def _build_num_microbatches_calculator(args) -> None:
    from .microbatches import build_num_microbatches_calculator

    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = build_num_microbatches_calculator(args)


def _build_tokenizer(args):
    from .tokenizer import build_tokenizer

    global _GLOBAL_TOKENIZER
    _GLOBAL_TOKENIZER = build_tokenizer(args)
    return _GLOBAL_TOKENIZER


def _set_tensorboard_writer(args) -> None:
    global _GLOBAL_TENSORBOARD_WRITER
    _GLOBAL_TENSORBOARD_WRITER = None
    tb_dir = getattr(args, "tensorboard_dir", None)
    if tb_dir and args.rank == (args.world_size - 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("WARNING: TensorBoard writing requested but is not available "
                  "(pip install tensorboard); no TensorBoard logs will be written.", flush=True)
            return
        os.makedirs(tb_dir, exist_ok=True)
        _GLOBAL_TENSORBOARD_WRITER = SummaryWriter(
            log_dir=tb_dir, max_queue=getattr(args, "tensorboard_queue_size", 1000)
        )


def _set_wandb_writer(args) -> None:
    """--wandb-project: the writer sends its scalars to wandb too (megatron/wandb_utils.py)."""
    from .wandb_utils import wandb_writer

    global _GLOBAL_TENSORBOARD_WRITER
    _GLOBAL_TENSORBOARD_WRITER = wandb_writer(args, _GLOBAL_TENSORBOARD_WRITER)


def _set_timers(args) -> None:
    """Timers of --timing-log-level and --timing-log-option (megatron/timers.py)."""
    global _GLOBAL_TIMERS
    _GLOBAL_TIMERS = Timers(getattr(args, "timing_log_level", 0),
                            getattr(args, "timing_log_option", "minmax"))


def reset_global_variables() -> None:
    """Forget all process-wide state (tests run several configurations in one process)."""
    global _GLOBAL_ARGS, _GLOBAL_NUM_MICROBATCHES_CALCULATOR, _GLOBAL_TOKENIZER
    global _GLOBAL_TENSORBOARD_WRITER, _GLOBAL_TIMERS
    if _GLOBAL_TENSORBOARD_WRITER is not None:
        _GLOBAL_TENSORBOARD_WRITER.close()
    _GLOBAL_ARGS = _GLOBAL_NUM_MICROBATCHES_CALCULATOR = _GLOBAL_TOKENIZER = None
    _GLOBAL_TENSORBOARD_WRITER = _GLOBAL_TIMERS = None


def _ensure_var_is_initialized(var, name: str) -> None:
    if var is None:
        raise RuntimeError(f"{name} is not initialized; call initialize_megatron() first")
