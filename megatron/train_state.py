"""TrainState: what a training run changes as it goes (args stay as validated).

The loop in training.py owns one TrainState; it is handed to whoever needs a part of it
(the forward step for the curriculum length, the checkpoint for the counters) and saved
by every checkpoint under the key "train_state". Checkpoints written before that key
existed kept the counters at the top level of the file or in their pickled args; both are
still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STATE_KEY = "train_state"
# Top-level checkpoint entries of the counters (older files kept them only there, or in
# their args); still written for readers of those files.
_LEGACY_KEYS = ("iteration", "consumed_train_samples", "consumed_valid_samples",
                "consumed_train_tokens")


@dataclass
class TrainState:
    """The run state of one training run."""

    iteration: int = 0  # optimizer steps taken (skipped ones included)
    consumed_train_samples: int = 0  # training samples read, over all data-parallel ranks
    consumed_valid_samples: int = 0  # validation samples read
    consumed_train_tokens: int = 0  # training tokens read (samples x sequence length)
    curriculum_seqlen: int | None = None  # the curriculum's sequence length (None: full)
    skipped_iterations: int = 0  # steps skipped for an fp16 overflow, since the first run
    nan_iterations: int = 0  # of those, steps whose loss was NaN or inf
    # not saved in the state dict: facts of this process
    run_id: str | None = field(default=None, compare=False)  # lineage (run_id.txt)
    last_saved_iteration: int | None = field(default=None, compare=False)
    do_train: bool = field(default=False, compare=False)  # a train split with iterations
    do_valid: bool = field(default=False, compare=False)  # a validation split to evaluate
    do_test: bool = field(default=False, compare=False)  # a test split to evaluate

    _SAVED = ("iteration", "consumed_train_samples", "consumed_valid_samples",
              "consumed_train_tokens", "curriculum_seqlen", "skipped_iterations",
              "nan_iterations")

    def seq_length(self, full: int) -> int:
        """The sequence length of this iteration's samples: the curriculum's, else `full`."""
        return self.curriculum_seqlen or full

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED}

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a checkpoint stores: the state under STATE_KEY and the counters at the top
        level, as older readers expect them."""
        entries: dict[str, Any] = {name: getattr(self, name) for name in _LEGACY_KEYS}
        entries[STATE_KEY] = self.state_dict()
        return entries

    def restore(self, checkpoint: dict, seq_length: int | None = None,
                iteration: int | None = None) -> None:
        """Take the counters of a checkpoint file's dict (or a DeepSpeed client state):
        STATE_KEY, else the top-level entries, else the checkpoint's pickled args. A
        checkpoint without a token count gets samples x seq_length."""
        saved = checkpoint.get(STATE_KEY)
        if saved is None:
            old_args = checkpoint.get("args")
            saved = {}
            for name in _LEGACY_KEYS:
                if name in checkpoint:
                    saved[name] = checkpoint[name]
                elif getattr(old_args, name, None) is not None:
                    saved[name] = getattr(old_args, name)
        for name in self._SAVED:
            if name in saved:
                setattr(self, name, saved[name])
        if iteration is not None:
            self.iteration = iteration
        if "consumed_train_tokens" not in saved and seq_length:
            self.consumed_train_tokens = self.consumed_train_samples * seq_length

    def copy(self) -> TrainState:
        return dataclasses.replace(self)

    @classmethod
    def from_args(cls, args) -> TrainState:
        """The counters of a caller that keeps them on args (a loop of its own over
        train_step, as tasks/ has): what save_checkpoint stores for it."""
        state = cls(**{name: getattr(args, name) for name in _LEGACY_KEYS
                       if getattr(args, name, None) is not None})
        state.run_id = getattr(args, "checkpoint_run_id", None)
        return state

    def to_args(self, args) -> None:
        """Hand the counters and the run lineage to such a caller, as Megatron's
        setup_model_and_optimizer did (pretrain() keeps its TrainState and never calls
        this)."""
        for name in _LEGACY_KEYS:
            setattr(args, name, getattr(self, name))
        args.checkpoint_run_id = self.run_id


__all__ = ["TrainState", "STATE_KEY"]
