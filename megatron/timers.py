"""Named wall-clock timers with Megatron's log levels and cross-rank reductions.

--timing-log-level L records a timer only when its level is <= L (others are no-ops):
level 0 the iteration time and the one-off setup, load and save timers; level 1 the
step's phases (forward-backward, gradient all-reduces, optimizer and its parts); level 2
everything else (the finest timers, which may add device synchronisation).
--timing-log-option says how `log` reduces a timer over the ranks: max prints the
slowest rank, minmax the fastest and the slowest, all every rank's value. `write`
(TensorBoard) always writes the slowest rank's value. Both are collective: every rank
calls them with the same names.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: `import megatron` stays torch-free
    import torch

MAX_LOG_LEVEL = 2
LOG_OPTIONS = ("max", "minmax", "all")

# The level of each timer that the training loop and optimizers start by name; a name
# not here (or a timer started without a level) is level 2, as in Megatron.
LOG_LEVELS = {
    "interval-time": 0,
    "model-and-optimizer-setup": 0,
    "train/valid/test-data-iterators-setup": 0,
    "load-checkpoint": 0,
    "save-checkpoint": 0,
    "train/valid/test dataset/dataloder": 0,  # tasks/finetune_utils.py
    "model and optimizer": 0,
    "pretrained checkpoint": 0,
    "forward-backward": 1,
    "backward-params-all-reduce": 1,
    "backward-embedding-all-reduce": 1,
    "grads-reduce-scatter": 1,
    "params-all-gather": 1,
    "optimizer": 1,
    "optimizer-copy-to-main-grad": 1,
    "optimizer-unscale-and-check-inf": 1,
    "optimizer-clip-main-grad": 1,
    "optimizer-count-zeros": 1,
    "optimizer-inner-step": 1,
    "optimizer-copy-main-to-model-params": 1,
}


# The step timers printed at each log line (and written by --log-timers-to-tensorboard),
# in the order of a step; those not recorded at the chosen level are left out.
STEP_TIMERS = (
    "forward-backward", "batch-generator", "backward-params-all-reduce",
    "backward-embedding-all-reduce", "grads-reduce-scatter", "params-all-gather",
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
    "optimizer-copy-main-to-model-params", "optimizer",
)


class _Timer:
    """One timer; start/stop synchronise the device so that the time is the device's."""

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
        """Seconds accumulated (a running timer is read without being stopped)."""
        started = self.started_
        if started:
            self.stop()
        elapsed = self.elapsed_
        if reset:
            self.reset()
        if started:
            self.start()
        return elapsed


class _DummyTimer:
    """A timer above --timing-log-level: start and stop do nothing (no synchronisation)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        raise RuntimeError("a timer above --timing-log-level has no elapsed time")


class Timers:
    """The timers of one process, by name (see the module docstring)."""

    def __init__(self, log_level: int = MAX_LOG_LEVEL, log_option: str = "minmax"):
        if not 0 <= log_level <= MAX_LOG_LEVEL:
            raise ValueError(f"--timing-log-level must be 0, 1 or 2, got {log_level}")
        if log_option not in LOG_OPTIONS:
            raise ValueError(f"--timing-log-option must be one of {LOG_OPTIONS}, got "
                             f"{log_option!r}")
        self.log_level = log_level
        self.log_option = log_option
        self.timers: dict[str, _Timer] = {}
        self._dummy = _DummyTimer()

    def __call__(self, name: str, log_level: int | None = None) -> _Timer | _DummyTimer:
        if name in self.timers:
            return self.timers[name]
        level = LOG_LEVELS.get(name, MAX_LOG_LEVEL) if log_level is None else log_level
        if level > self.log_level:
            return self._dummy
        self.timers[name] = _Timer(name)
        return self.timers[name]

    def _times_all_ranks(self, names: Sequence[str], reset: bool) -> torch.Tensor:
        """[world, len(names)] seconds, 0 where a rank has no such timer (all-gathered)."""
        import torch

        from .accelerator import current_device

        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        mine = torch.zeros(len(names), dtype=torch.float64, device=current_device())
        for i, name in enumerate(names):
            if name in self.timers:
                mine[i] = self.timers[name].elapsed(reset=reset)
        if not dist:
            return mine.view(1, -1).cpu()
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)
        return torch.stack(gathered).cpu()  # [world, names]

    def min_max(self, names: Sequence[str], normalizer: float = 1.0,
                reset: bool = True) -> dict[str, tuple[float, float]]:
        """{name: (fastest, slowest) rank's seconds / normalizer} over the ranks that
        recorded the timer (collective)."""
        assert normalizer > 0.0
        times = self._times_all_ranks(names, reset)
        out = {}
        for i, name in enumerate(names):
            column = times[:, i]
            column = column[column > 0.0]
            if column.numel():
                out[name] = (column.min().item() / normalizer, column.max().item() / normalizer)
        return out

    def log_string(self, names: Sequence[str], normalizer: float = 1.0,
                   reset: bool = True) -> str | None:
        """The text `log` prints (collective); None when no rank recorded any timer."""
        ms = normalizer / 1000.0
        if self.log_option == "all":
            times = self._times_all_ranks(names, reset)
            lines = []
            for i, name in enumerate(names):
                ranks = [(r, t) for r, t in enumerate(times[:, i].tolist()) if t > 0.0]
                if ranks:
                    lines.append(f"  {name}:")
                    lines += [f"     rank {r:2d}: {t / ms:.2f}" for r, t in ranks]
            return "times across ranks (ms):\n" + "\n".join(lines) if lines else None
        stats = self.min_max(names, ms, reset)
        if not stats:
            return None
        lines = []
        for name, (low, high) in stats.items():
            label = (name + " ").ljust(48, ".")
            value = f"{high:.2f}" if self.log_option == "max" else f"({low:.2f}, {high:.2f})"
            lines.append(f"    {label}: {value}")
        title = "max time across ranks (ms):" if self.log_option == "max" else \
            "(min, max) time across ranks (ms):"
        return title + "\n" + "\n".join(lines)

    def log(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True,
            rank: int | None = None) -> str | None:
        """Print the timers, reduced over the ranks as --timing-log-option says, on `rank`
        (the last rank if None); returns the text. Every rank must call it."""
        import torch

        text = self.log_string(list(names), normalizer, reset)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        me = torch.distributed.get_rank() if dist else 0
        if rank is None:
            rank = torch.distributed.get_world_size() - 1 if dist else 0
        if text is not None and me == rank:
            print(text, flush=True)
        return text

    def write(self, names: Iterable[str], writer, iteration: int, normalizer: float = 1.0,
              reset: bool = False) -> None:
        """Write the slowest rank's time of each timer as '<name>-time' (collective; only
        a rank with a writer writes)."""
        stats = self.min_max(list(names), normalizer, reset)
        if writer is None:
            return
        for name, (_, slowest) in stats.items():
            writer.add_scalar(name + "-time", slowest, iteration)
