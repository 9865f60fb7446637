"""Validation of the wandb, timing and profiling flags, and the profiling window."""

from __future__ import annotations

import shlex

import pytest

from megatron.arguments import ArgumentError, build_parser, validate_args
from megatron.profiling import profile_window

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --train-iters 10")


def _validate(flags: str, world_size: int = 2):
    args = build_parser().parse_args(shlex.split(f"{BASE} {flags}"))
    return validate_args(args, world_size=world_size, rank=1)


def test_defaults_are_megatron_deepspeeds():
    args = _validate("")
    assert (args.timing_log_level, args.timing_log_option) == (0, "minmax")
    assert (args.wandb_project, args.wandb_exp_name, args.wandb_save_dir) == ("", "", "")
    assert (args.profile, args.profile_steps, args.profile_ranks) == (None, "2,3", None)
    assert args.log_world_size_to_tensorboard is False


def test_profile_windows():
    args = _validate("--profile pt --tensorboard-dir tb")
    assert profile_window(args) == ("local", 2, 3)
    args = _validate("--profile pt-full --profile_steps 5,9 --profile-ranks 0 1 "
                     "--tensorboard-dir tb")
    assert profile_window(args) == ("local", 5, 9) and args.profile_ranks == [0, 1]
    # Megatron-LM: the iterations after --profile-step-start up to --profile-step-end
    args = _validate("--profile pt --profile-step-start 10 --profile-step-end 12 "
                     "--tensorboard-dir tb")
    assert profile_window(args) == ("global", 11, 12)


@pytest.mark.parametrize("flags,words", [
    ("--wandb-project p", ["--wandb-project", "--wandb-save-dir or --save"]),
    ("--wandb-exp-name e", ["--wandb-exp-name", "--save"]),
    ("--profile pt", ["--profile pt", "--tensorboard-dir"]),
    ("--profile pt --profile_steps 3 --tensorboard-dir tb", ["--profile_steps '3'"]),
    ("--profile pt --profile_steps 4,2 --tensorboard-dir tb", ["--profile_steps '4,2'"]),
    ("--profile pt --profile_steps 0,2 --tensorboard-dir tb", ["1 <= first"]),
    ("--profile pt --profile-ranks 2 --tensorboard-dir tb", ["--profile-ranks 2",
                                                            "world size 2"]),
    ("--profile-ranks 0", ["--profile-ranks needs --profile"]),
    ("--profile pt --profile-step-start 3 --tensorboard-dir tb", ["go together"]),
    ("--profile-step-start 1 --profile-step-end 3", ["--profile-step-start needs --profile"]),
    ("--profile pt --profile-step-start 3 --profile-step-end 3 --tensorboard-dir tb",
     ["smaller than --profile-step-end"]),
])
def test_bad_combinations_are_one_line_errors(flags, words):
    with pytest.raises(ArgumentError) as err:
        _validate(flags)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_wandb_with_save_or_dir_validates(capsys):
    assert _validate("--wandb-project p --save ckpt").wandb_project == "p"
    assert _validate("--wandb-exp-name e --wandb-save-dir w").wandb_save_dir == "w"
    for flags in ("--timing-log-level 3", "--timing-log-option median", "--profile nsys"):
        with pytest.raises(SystemExit):
            _validate(flags)
        assert "invalid choice" in capsys.readouterr().err
