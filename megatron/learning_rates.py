"""Learning-rate schedule: linear warmup, then constant, linear, cosine or inverse-square-root
decay.

The schedule counts abstract *steps*. The training loop decides what a step is by what it
passes to ``step(increment=...)``: the global batch size when training is measured in
samples (``--train-samples``, ``--lr-warmup-samples``, ``--lr-decay-samples``), or 1 when it
is measured in iterations (``--train-iters``, ``--lr-warmup-iters``, ``--lr-decay-iters``).
``warmup_steps`` and ``decay_steps`` must be in the same unit.

With ``decay_tokens`` (``--lr-decay-tokens``) the schedule follows consumed *tokens*
instead: every step adds ``increment x tokens_per_sample`` tokens (the sequence length, or
the curriculum length the loop sets with ``set_tokens_per_sample``), so a token schedule
of W x B x s warm-up tokens and D x B x s decay tokens gives the same learning rates as
W warm-up and D decay iterations of global batch B and sequence length s. Skipped steps
(fp16 overflow) count neither samples nor tokens here.
"""

from __future__ import annotations

import math
from typing import Any

from megatron import print_rank_0

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


class AnnealingLR:
    """Sets ``group['lr']`` of every optimizer param group from the step count n.

    With max = ``max_lr``, min = ``min_lr``, W = ``warmup_steps``, D = ``decay_steps``:

    - warmup (W > 0 and n <= W): lr = max * n / W
    - constant style: lr = max after warmup
    - n > D: lr = min
    - inverse-square-root style: lr = max(min, max * sqrt(max(W, 1)) / sqrt(max(n, 1)))
      (Megatron's: it equals max at the end of warm-up, then falls as 1 / sqrt(n))
    - otherwise with r = (n - W) / (D - W) in [0, 1]:
      linear: lr = min + (max - min) * (1 - r)
      cosine: lr = min + (max - min) * 0.5 * (cos(pi * r) + 1)

    With ``decay_tokens`` D_t, the decay counts consumed tokens t: t > D_t gives min and
    r = (t - W_t) / (D_t - W_t), where W_t is ``warmup_tokens`` (then the warm-up is
    lr = max * t / W_t), or, for a warm-up in steps, the tokens consumed when it ended;
    inverse-square-root then gives max(min, max * sqrt(max(W_t, 1)) / sqrt(max(t, 1))).

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
        warmup_tokens: int | None = None,
        decay_tokens: int | None = None,
        tokens_per_sample: int = 1,
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
        self.warmup_tokens = None if warmup_tokens is None else int(warmup_tokens)
        self.decay_tokens = None if decay_tokens is None else int(decay_tokens)
        if self.warmup_tokens is not None and self.decay_tokens is None:
            raise ValueError("learning_rates.py: --lr-warmup-tokens needs --lr-decay-tokens")
        if self.decay_tokens is not None and self.decay_tokens <= 0:
            raise ValueError(
                f"learning_rates.py: --lr-decay-tokens must be > 0, got {decay_tokens}")
        if self.warmup_tokens is not None and self.warmup_tokens >= self.decay_tokens:
            raise ValueError(
                f"learning_rates.py: --lr-warmup-tokens ({warmup_tokens}) must be smaller "
                f"than --lr-decay-tokens ({decay_tokens})")
        self.num_tokens = 0
        self.tokens_per_sample = int(tokens_per_sample)
        # Tokens consumed when a warm-up counted in steps ended (token decay starts there).
        self.warmup_end_tokens: int | None = None
        self.override_lr_scheduler = override_lr_scheduler
        self.use_checkpoint_lr_scheduler = use_checkpoint_lr_scheduler
        if self.override_lr_scheduler and self.use_checkpoint_lr_scheduler:
            raise ValueError(
                "learning_rates.py: --override-opt_param-scheduler and "
                "--use-checkpoint-opt_param-scheduler are mutually exclusive"
            )
        # Apply the lr for step 0 right away, as Megatron does.
        self.step(0)
        print_rank_0(f"> learning rate decay style: {self.decay_style}")

    def get_lr(self) -> float:
        """The learning rate at the current step count (see the class docstring)."""
        n, t = self.num_steps, self.num_tokens
        if self.warmup_tokens is not None:
            if self.warmup_tokens > 0 and t <= self.warmup_tokens:
                return self.max_lr * float(t) / float(self.warmup_tokens)
        elif self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.max_lr * float(n) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return self.max_lr
        if self.decay_tokens is None:
            if n > self.decay_steps:
                return self.min_lr
            if self.decay_style == "inverse-square-root":
                return self._inverse_square_root(self.warmup_steps, n)
            ratio = float(n - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        else:
            start = self._token_decay_start()
            if t > self.decay_tokens or start >= self.decay_tokens:
                return self.min_lr
            if self.decay_style == "inverse-square-root":
                return self._inverse_square_root(start, t)
            ratio = float(t - start) / float(self.decay_tokens - start)
        delta = self.max_lr - self.min_lr
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * delta

    def _inverse_square_root(self, warmup: int, count: int) -> float:
        """max * sqrt(warmup) / sqrt(count), both at least 1, floored at min_lr."""
        lr = self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(count, 1))
        return max(self.min_lr, lr)

    def _token_decay_start(self) -> int:
        if self.warmup_tokens is not None:
            return self.warmup_tokens
        return self.warmup_end_tokens if self.warmup_end_tokens is not None else self.num_tokens

    def set_tokens_per_sample(self, tokens: int) -> None:
        """Tokens each sample of the next steps holds (the curriculum sequence length)."""
        self.tokens_per_sample = int(tokens)

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` steps (samples or iterations), and by increment x
        tokens_per_sample tokens, and set every group's lr."""
        self.num_steps += increment
        self.num_tokens += increment * self.tokens_per_sample
        if (self.decay_tokens is not None and self.warmup_tokens is None
                and self.warmup_end_tokens is None and self.num_steps >= self.warmup_steps):
            self.warmup_end_tokens = self.num_tokens
        new_lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
        return new_lr

    def state_dict(self) -> dict:
        """Megatron's keys; a token schedule adds its own (Megatron-DeepSpeed's names)."""
        sd = {
            "max_lr": self.max_lr,
            "warmup_steps": self.warmup_steps,
            "num_steps": self.num_steps,
            "decay_style": self.decay_style,
            "decay_steps": self.decay_steps,
            "min_lr": self.min_lr,
        }
        if self.decay_tokens is not None:
            sd.update({
                "lr_warmup_tokens": self.warmup_tokens,
                "lr_decay_tokens": self.decay_tokens,
                "num_tokens": self.num_tokens,
                "warmup_end_tokens": self.warmup_end_tokens,
            })
        return sd

    def _check_and_set(self, cls_value: Any, sd_value: Any, name: str) -> Any:
        """Pick the class or checkpoint value of one field, or fail if they disagree."""
        if self.override_lr_scheduler:
            print_rank_0(f" > overriding {name} value to {cls_value}")
            return cls_value
        if not self.use_checkpoint_lr_scheduler and cls_value != sd_value:
            raise ValueError(
                f"learning_rates.py: AnnealingLR: class {name} value {cls_value} differs from "
                f"checkpoint value {sd_value}; pass --override-opt_param-scheduler or "
                "--use-checkpoint-opt_param-scheduler"
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
        # A checkpoint without token keys was saved by a schedule without tokens.
        if self.decay_tokens is not None or "lr_decay_tokens" in sd:
            self.warmup_tokens = self._check_and_set(
                self.warmup_tokens, sd.get("lr_warmup_tokens"), "warmup tokens")
            self.decay_tokens = self._check_and_set(
                self.decay_tokens, sd.get("lr_decay_tokens"), "decay tokens")
        num_steps = sd["num_iters"] if "num_iters" in sd else sd["num_steps"]
        self.num_steps = num_steps
        self.num_tokens = int(sd.get("num_tokens", 0))
        self.warmup_end_tokens = sd.get("warmup_end_tokens")
        self.step(increment=0)
