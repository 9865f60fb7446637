"""DeepSpeed activation checkpointing (--partition-activations and friends) gives the
same losses as Megatron's own recompute, dropout included."""

from __future__ import annotations

import os

import pytest

from .gpt_runs import ROOT, parse_log, run_pretrain, small_vocab_dataset, tiny_gpt_args

pytestmark = pytest.mark.slow


def _args(data: str) -> list[str]:
    args = tiny_gpt_args(data, "", 4) + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--eval-iters", "0",
        "--deepspeed", "--deepspeed_config",
        os.path.join(ROOT, "examples", "ds_config_gpt_zero1.json"), "--zero-stage", "1",
        "--checkpoint-activations"]
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


def test_partitioned_activation_checkpointing_matches(tmp_path):
    data = small_vocab_dataset(str(tmp_path))
    plain = parse_log(run_pretrain(_args(data)).stdout)
    partitioned = parse_log(run_pretrain(_args(data) + [
        "--deepspeed-activation-checkpointing", "--partition-activations",
        "--contigious-checkpointing", "--synchronize-each-layer"]).stdout)
    assert sorted(plain) == sorted(partitioned) == [1, 2, 3, 4]
    for it in plain:
        assert partitioned[it]["loss"] == plain[it]["loss"], (it, plain, partitioned)
