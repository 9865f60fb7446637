"""Process-wide state set once by initialize_megatron(): args, tokenizer, timers,
TensorBoard writer and the micro-batch calculator."""

from __future__ import annotations

import os
import time

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
    """The TensorBoard writer on the last rank when --tensorboard-dir is set, else None."""
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
    _set_timers()


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


def _set_timers() -> None:
    global _GLOBAL_TIMERS
    _GLOBAL_TIMERS = Timers()


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


class _Timer:
    def __init__(self, name: str):
        self.name_ = name
        self.elapsed_ = 0.0
        self.started_ = False
        self.start_time = time.time()

    def start(self) -> None:
        assert not self.started_, f"timer {self.name_} has already been started"
        from .accelerator import synchronize

        synchronize()
        self.start_time = time.time()
        self.started_ = True

    def stop(self) -> None:
        assert self.started_, f"timer {self.name_} is not started"
        from .accelerator import synchronize

        synchronize()
        self.elapsed_ += time.time() - self.start_time
        self.started_ = False

    def reset(self) -> None:
        self.elapsed_ = 0.0
        self.started_ = False

    def elapsed(self, reset: bool = True) -> float:
        started = self.started_
        if started:
            self.stop()
        elapsed = self.elapsed_
        if reset:
            self.reset()
        if started:
            self.start()
        return elapsed


class Timers:
    """Named wall-clock timers that synchronise the device at start and stop."""

    def __init__(self):
        self.timers: dict[str, _Timer] = {}

    def __call__(self, name: str) -> _Timer:
        if name not in self.timers:
            self.timers[name] = _Timer(name)
        return self.timers[name]

    def write(self, names, writer, iteration, normalizer=1.0, reset=False) -> None:
        assert normalizer > 0.0
        for name in names:
            if name in self.timers:
                value = self.timers[name].elapsed(reset=reset) / normalizer
                writer.add_scalar(name + "-time", value, iteration)

    def log(self, names, normalizer=1.0, reset=True) -> str:
        """Print 'time (ms) | name: x | ...' from the last rank; returns the string."""
        assert normalizer > 0.0
        parts = []
        for name in names:
            if name in self.timers:
                ms = self.timers[name].elapsed(reset=reset) * 1000.0 / normalizer
                parts.append(f"{name}: {ms:.2f}")
        string = "time (ms) | " + " | ".join(parts)
        from . import print_rank_last

        print_rank_last(string)
        return string
