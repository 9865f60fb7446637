"""--wandb-project / --wandb-exp-name / --wandb-save-dir: the scalars TensorBoard gets, to
Weights & Biases as well.

As in Megatron-DeepSpeed, the run is created on the last rank (the rank that logs) when a
project or an experiment name is given; its files go to --wandb-save-dir, else to
<--save>/wandb. `ScalarWriter` stands where the TensorBoard writer stands: each
`add_scalar(tag, value, step)` goes to TensorBoard (when --tensorboard-dir is set) and to
wandb. A tag ending in " vs samples" or " vs tokens" is plotted against its own x-axis
("samples", "tokens": wandb's define_metric), every other tag against the iteration, which
is wandb's step. Offline runs (WANDB_MODE=offline) write the same files for `wandb sync`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# tag suffix -> the wandb metric that is its x-axis
_X_AXES = ((" vs samples", "samples"), (" vs tokens", "tokens"))


def wants_wandb(args: argparse.Namespace) -> bool:
    """--wandb-project or --wandb-exp-name was given."""
    return bool(getattr(args, "wandb_project", "") or getattr(args, "wandb_exp_name", ""))


def wandb_save_dir(args: argparse.Namespace) -> str:
    """--wandb-save-dir, else <--save>/wandb (validate_args requires one of them)."""
    return args.wandb_save_dir or os.path.join(args.save, "wandb")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as wandb config values (a dtype or other object becomes its str)."""
    plain = (bool, int, float, str, type(None))
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, plain) or (isinstance(value, (list, tuple))
                                        and all(isinstance(v, plain) for v in value)):
            out[key] = value
        else:
            out[key] = str(value)
    return out


class ScalarWriter:
    """TensorBoard's add_scalar/flush/close, to TensorBoard (if given) and a wandb run."""

    def __init__(self, run: Any, tensorboard: Any = None):
        self.run = run
        self.tensorboard = tensorboard
        self.step = 0  # wandb's step: the largest iteration logged so far
        self._defined: set[str] = set()

    def _define(self, name: str, step_metric: str | None = None) -> None:
        if name not in self._defined:
            if step_metric is None:
                self.run.define_metric(name)
            else:
                self.run.define_metric(name, step_metric=step_metric)
            self._defined.add(name)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        value = float(value)
        for suffix, axis in _X_AXES:
            if tag.endswith(suffix):
                self._define(axis)
                self._define(tag, step_metric=axis)
                self.run.log({tag: value, axis: step}, step=self.step)
                return
        # wandb's steps only go forward: a value for an earlier iteration (the test-set
        # loss logged at iteration 0 after training) joins the current step
        self.step = max(self.step, int(step))
        self.run.log({tag: value}, step=self.step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.run.finish()


def wandb_writer(args: argparse.Namespace, tensorboard: Any = None) -> Any:
    """The writer of this rank: a ScalarWriter on the last rank when wandb is asked for,
    else `tensorboard` (the SummaryWriter or None)."""
    if not wants_wandb(args) or args.rank != args.world_size - 1:
        return tensorboard
    import wandb

    save_dir = wandb_save_dir(args)
    os.makedirs(save_dir, exist_ok=True)
    run = wandb.init(dir=save_dir, project=args.wandb_project or None,
                     name=args.wandb_exp_name or None, config=_config(args))
    print(f"> wandb: logging to project {args.wandb_project!r}, run {run.name!r}, files "
          f"under {save_dir} (mode {run.settings.mode})", flush=True)
    return ScalarWriter(run, tensorboard)
