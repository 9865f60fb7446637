"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay.

The schedule counts abstract *steps*. The training loop decides what a step is by what it
passes to ``step(increment=...)``: the global batch size when training is measured in
samples (``--train-samples``, ``--lr-warmup-samples``, ``--lr-decay-samples``), or 1 when it
is measured in iterations (``--train-iters``, ``--lr-warmup-iters``, ``--lr-decay-iters``).
``warmup_steps`` and ``decay_steps`` must be in the same unit.
"""

from __future__ import annotations

import math
from typing import Any

from megatron import print_rank_0

DECAY_STYLES = ("constant", "linear", "cosine")


class AnnealingLR:
    """Sets ``group['lr']`` of every optimizer param group from the step count n.

    With max = ``max_lr``, min = ``min_lr``, W = ``warmup_steps``, D = ``decay_steps``:

    - warmup (W > 0 and n <= W): lr = max * n / W
    - constant style: lr = max after warmup
    - n > D: lr = min
    - otherwise with r = (n - W) / (D - W) in [0, 1]:
      linear: lr = min + (max - min) * (1 - r)
      cosine: lr = min + (max - min) * 0.5 * (cos(pi * r) + 1)

    A param group carrying ``'lr_mult'`` gets ``lr * lr_mult`` (the default multiplier is 1).

    On ``load_state_dict`` the checkpoint's schedule is compared with this one field by field:
    with ``override_lr_scheduler`` the class values win; with ``use_checkpoint_lr_scheduler``
    the checkpoint's values win; with neither, a difference is an error naming the field.
    """

    def __init__(
        self,
        optimizer: Any,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
        decay_style: str,
        use_checkpoint_lr_scheduler: bool = True,
        override_lr_scheduler: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        if self.min_lr < 0.0:
            raise ValueError(f"learning_rates.py: --min-lr must be >= 0, got {min_lr}")
        if self.max_lr < self.min_lr:
            raise ValueError(f"learning_rates.py: --lr ({max_lr}) must be >= --min-lr ({min_lr})")
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        if self.decay_steps <= 0:
            raise ValueError(
                f"learning_rates.py: lr decay steps must be > 0, got {decay_steps} "
                "(set --lr-decay-iters / --lr-decay-samples or the training length)"
            )
        if self.warmup_steps >= self.decay_steps:
            raise ValueError(
                f"learning_rates.py: warmup steps ({warmup_steps}) must be smaller than "
                f"decay steps ({decay_steps})"
            )
        if decay_style not in DECAY_STYLES:
            raise ValueError(
                f"learning_rates.py: --lr-decay-style {decay_style!r} is not one of "
                f"{', '.join(DECAY_STYLES)}"
            )
        self.decay_style = decay_style
        self.num_steps = 0
        self.override_lr_scheduler = override_lr_scheduler
        self.use_checkpoint_lr_scheduler = use_checkpoint_lr_scheduler
        if self.override_lr_scheduler and self.use_checkpoint_lr_scheduler:
            raise ValueError(
                "learning_rates.py: --override-lr-scheduler and --use-checkpoint-lr-scheduler "
                "are mutually exclusive"
            )
        # Apply the lr for step 0 right away, as Megatron does.
        self.step(0)
        print_rank_0(f"> learning rate decay style: {self.decay_style}")

    def get_lr(self) -> float:
        """The learning rate at the current step count (see the class docstring)."""
        n = self.num_steps
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.max_lr * float(n) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_steps:
            return self.min_lr
        ratio = float(n - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        delta = self.max_lr - self.min_lr
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * delta

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` steps (samples or iterations) and set every group's lr."""
        self.num_steps += increment
        new_lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
        return new_lr

    def state_dict(self) -> dict:
        return {
            "max_lr": self.max_lr,
            "warmup_steps": self.warmup_steps,
            "num_steps": self.num_steps,
            "decay_style": self.decay_style,
            "decay_steps": self.decay_steps,
            "min_lr": self.min_lr,
        }

    def _check_and_set(self, cls_value: Any, sd_value: Any, name: str) -> Any:
        """Pick the class or checkpoint value of one field, or fail if they disagree."""
        if self.override_lr_scheduler:
            print_rank_0(f" > overriding {name} value to {cls_value}")
            return cls_value
        if not self.use_checkpoint_lr_scheduler and cls_value != sd_value:
            raise ValueError(
                f"learning_rates.py: AnnealingLR: class {name} value {cls_value} differs from "
                f"checkpoint value {sd_value}; pass --override-lr-scheduler or "
                "--use-checkpoint-lr-scheduler"
            )
        print_rank_0(f" > using checkpoint value {sd_value} for {name}")
        return sd_value

    def load_state_dict(self, sd: dict) -> None:
        """Restore the schedule; also reads the keys of older Megatron checkpoints."""
        max_lr_ = sd["start_lr"] if "start_lr" in sd else sd["max_lr"]
        self.max_lr = self._check_and_set(self.max_lr, max_lr_, "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, sd["min_lr"], "minimum learning rate")
        warmup_ = sd["warmup_iter"] if "warmup_iter" in sd else sd["warmup_steps"]
        self.warmup_steps = self._check_and_set(self.warmup_steps, warmup_, "warmup iterations")
        decay_ = sd["end_iter"] if "end_iter" in sd else sd["decay_steps"]
        self.decay_steps = self._check_and_set(
            self.decay_steps, decay_, "total number of iterations"
        )
        self.decay_style = self._check_and_set(self.decay_style, sd["decay_style"], "decay style")
        num_steps = sd["num_iters"] if "num_iters" in sd else sd["num_steps"]
        self.num_steps = 0
        self.step(increment=num_steps)
