"""--use-checkpoint-args: the model flags come from the saved args of the --load checkpoint
before the args are validated (so before any process group or model), for pretrain_gpt.py,
tools/generate_samples_gpt.py and tasks/main.py alike (all parse through parse_args).

In process: checkpoint folders holding only their saved args (Megatron layouts at PP = 1 and
PP = 2, --load-tag, a DeepSpeed folder, older spellings), parsed as each entry point parses.
End to end (slow): pretrain_gpt.py resumes a tiny LLaMA checkpoint with no model-shape and
no tokenizer flags, and its iterations equal those of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex

import pytest
import torch

from megatron.arguments import build_parser, given_dests, parse_args, validate_args
from megatron.checkpointing import (
    CHECKPOINT_RUN_ARGS,
    CHECKPOINT_SHAPE_ARGS,
    CheckpointError,
    load_args_from_checkpoint,
)
from megatron.model.config import TransformerConfig, config_from_args

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHAPE = (
    "--num-layers 3 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 64"
)
LLAMA = (
    "--use-rotary-position-embeddings --rotary-position-embeddings-theta 500000 --swiglu "
    "--normalization rmsnorm --layernorm-epsilon 1e-6 --num-key-value-heads 2 "
    "--ffn-hidden-size 96 --untie-embeddings-and-output-weights --disable-bias-linear"
)
TOKENIZER = "--tokenizer-type NullTokenizer --vocab-size 99"
TRAIN = "--micro-batch-size 2"
DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _saved_args(flags: str, world_size: int = 1) -> argparse.Namespace:
    """The args a run with these flags saves in its checkpoints."""
    args = validate_args(build_parser().parse_args(shlex.split(flags)), world_size=world_size,
                         rank=1)  # fmt: skip
    args.padded_vocab_size = 128
    return args


def _checkpoint(root, args, iteration: int = 5, pp: bool = False, tracker: bool = True,
                with_args: bool = True) -> str:
    """A Megatron checkpoint folder whose rank-0 file holds `args` (and a token weight)."""
    rank = "mp_rank_00_000" if pp else "mp_rank_00"
    folder = os.path.join(str(root), f"iter_{iteration:07d}", rank)
    os.makedirs(folder, exist_ok=True)
    state = {"checkpoint_version": 3.0, "iteration": iteration,
             "model": {"language_model": {"w": torch.zeros(2)}}}  # fmt: skip
    if with_args:
        state["args"] = args
    torch.save(state, os.path.join(folder, "model_optim_rng.pt"))
    if tracker:
        with open(os.path.join(str(root), "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    return str(root)


def _parse(flags: str, extra_args_provider=None, defaults=DEFAULTS) -> argparse.Namespace:
    return parse_args(extra_args_provider, dict(defaults), args_list=shlex.split(flags))


def _error(capsys, flags: str, **kw) -> str:
    with pytest.raises(SystemExit) as exit_:
        _parse(flags, **kw)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _same_model(args, saved) -> None:
    import dataclasses

    # padded_vocab_size: set when the run builds its tokenizer
    ours, theirs = config_from_args(args, padded_vocab_size=128), config_from_args(saved)
    for f in dataclasses.fields(TransformerConfig):
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_model_flags_come_from_the_checkpoint(tmp_path, capsys):
    saved = _saved_args(f"{SHAPE} {LLAMA} {TOKENIZER} {TRAIN}")
    load = _checkpoint(tmp_path, saved)
    args = _parse(f"--use-checkpoint-args --load {load} {TRAIN}")
    dests = [d for d, _ in CHECKPOINT_SHAPE_ARGS] + list(CHECKPOINT_RUN_ARGS)
    for dest in dests:
        assert getattr(args, dest) == getattr(saved, dest), dest
    # pretrain_gpt.py's default tokenizer does not win over the checkpoint's
    assert (args.tokenizer_type, args.vocab_size) == ("NullTokenizer", 99)
    assert (args.num_layers, args.num_key_value_heads, args.rope_theta) == (3, 2, 500000)
    assert args.swiglu and not args.add_bias_linear and args.untie_embeddings_and_output_weights
    assert args.encoder_seq_length == 32 and args.kv_channels == 16
    _same_model(args, saved)
    out = capsys.readouterr().out
    assert f"> --use-checkpoint-args: from {load}/iter_0000005/mp_rank_00/model_optim_rng.pt: " \
           "num_layers=3, hidden_size=64, ffn_hidden_size=96," in out  # fmt: skip
    assert not torch.distributed.is_initialized()


def test_command_line_flags(tmp_path, capsys):
    """Run flags given on the command line win; shape flags must agree with the checkpoint."""
    saved = _saved_args(f"{SHAPE} {LLAMA} {TOKENIZER} {TRAIN}")
    load = _checkpoint(tmp_path, saved)
    args = _parse(f"--use-checkpoint-args --load {load} {TRAIN} --seq-length 16 --hidden-size 64 "
                  "--rotary-position-embeddings-theta 10000 --swiglu")  # fmt: skip
    assert (args.seq_length, args.rope_theta, args.hidden_size) == (16, 10000, 64)
    err = _error(capsys, f"--use-checkpoint-args --load {load} {TRAIN} --hidden-size 128 "
                 "--num-layers 3 --normalization layernorm")  # fmt: skip
    assert "error: --use-checkpoint-args: " in err
    assert "--hidden-size (hidden_size) is 128 on the command line but 64 in the checkpoint" in err
    assert "--normalization (normalization) is layernorm on the command line but rmsnorm" in err
    assert "--num-layers" not in err  # agrees
    gpt = _checkpoint(tmp_path / "gpt", _saved_args(f"{SHAPE} {TOKENIZER} {TRAIN}"))
    err = _error(capsys, f"--use-checkpoint-args --load {gpt} {TRAIN} --swiglu")
    assert "--swiglu (swiglu) is True on the command line but False in the checkpoint" in err


def test_missing_checkpoint_or_args_are_one_line_errors(tmp_path, capsys):
    saved = _saved_args(f"{SHAPE} {TOKENIZER} {TRAIN}")
    err = _error(capsys, f"--use-checkpoint-args {TRAIN}")
    assert "--use-checkpoint-args needs --load" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, f"--use-checkpoint-args --load {empty} {TRAIN}")
    assert f"no checkpoint in --load {empty} ({empty}/latest_checkpointed_iteration.txt" in err
    bare = _checkpoint(tmp_path / "bare", saved, with_args=False)
    err = _error(capsys, f"--use-checkpoint-args --load {bare} {TRAIN}")
    assert "model_optim_rng.pt holds no saved args" in err
    untracked = _checkpoint(tmp_path / "untracked", saved, tracker=False)
    err = _error(capsys, f"--use-checkpoint-args --load {untracked} {TRAIN}")
    assert "but no latest_checkpointed_iteration.txt" in err
    err = _error(capsys, f"--use-checkpoint-args --load {bare} {TRAIN} --load-tag 9")
    assert "--load-tag 9:" in err and "has no iter_0000009" in err
    # without the flag nothing is read: the shape flags are required as before
    err = _error(capsys, f"--load {bare} {TRAIN}")
    assert "--num-layers is required" in err


def test_pipeline_layout_and_load_tag(tmp_path, monkeypatch):
    """TP and PP come from the checkpoint (its mp_rank_00_000 file); --load-tag picks it."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    old = _saved_args(f"{SHAPE} {TOKENIZER} {TRAIN} --pipeline-model-parallel-size 3",
                      world_size=3)  # fmt: skip
    new = _saved_args(f"{SHAPE.replace('--num-layers 3', '--num-layers 4')} {TOKENIZER} "
                      f"{TRAIN} --pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 "
                      "--num-layers-per-virtual-pipeline-stage 1", world_size=4)  # fmt: skip
    _checkpoint(tmp_path, old, iteration=3, pp=True)
    load = _checkpoint(tmp_path, new, iteration=6, pp=True)
    args = _parse(f"--use-checkpoint-args --load {load} {TRAIN}")
    assert (args.num_layers, args.tensor_model_parallel_size) == (4, 2)
    assert (args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size) == (2, 2)
    assert args.data_parallel_size == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = _parse(f"--use-checkpoint-args --load {load} --load-tag 3 {TRAIN}")
    assert (args.num_layers, args.pipeline_model_parallel_size) == (3, 3)
    assert args.tensor_model_parallel_size == 1 and args.virtual_pipeline_model_parallel_size is None


def test_deepspeed_checkpoint(tmp_path):
    """Under --deepspeed the args are DeepSpeed's client state in global_stepN's first
    model-states file, the tag from its `latest` file."""
    saved = _saved_args(f"{SHAPE} {LLAMA} {TOKENIZER} {TRAIN}")
    folder = tmp_path / "global_step7"
    folder.mkdir()
    torch.save({"module": {}, "args": saved, "iteration": 7, "checkpoint_version": 3.0},
               folder / "mp_rank_00_model_states.pt")  # fmt: skip
    (tmp_path / "latest").write_text("global_step7")
    args = _parse(f"--deepspeed --use-checkpoint-args --load {tmp_path} {TRAIN}")
    _same_model(args, saved)
    assert args.tokenizer_type == "NullTokenizer"


def test_entry_points_alike(tmp_path):
    """generate_samples_gpt.py and tasks/main.py parse with their own flags and defaults."""
    spec = importlib.util.spec_from_file_location(
        "generate_samples_gpt_tool", os.path.join(ROOT, "tools", "generate_samples_gpt.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    from tasks.main import get_tasks_args

    saved = _saved_args(f"{SHAPE} {LLAMA} {TOKENIZER} {TRAIN}")
    load = _checkpoint(tmp_path, saved)
    args = _parse(f"--use-checkpoint-args --load {load} {TRAIN} --greedy",
                  extra_args_provider=generate.add_text_generate_args,
                  defaults={"tokenizer_type": "GPT2BPETokenizer", "no_load_rng": True,
                            "no_load_optim": True})  # fmt: skip
    _same_model(args, saved)
    assert args.greedy and args.no_load_optim and args.tokenizer_type == "NullTokenizer"
    args = _parse(f"--use-checkpoint-args --load {load} {TRAIN} --task LAMBADA",
                  extra_args_provider=get_tasks_args)  # fmt: skip
    _same_model(args, saved)
    assert args.task == "LAMBADA"


def test_older_checkpoint_spellings_and_megatron_rule(tmp_path):
    """A checkpoint with disable_bias_linear and (version < 3) model_parallel_size; called
    without a record of the command line, Megatron's rule: flags with a value and no
    default are kept, the rest taken."""
    saved = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=2,
                               max_position_embeddings=16, seq_length=16,
                               disable_bias_linear=True, model_parallel_size=2)  # fmt: skip
    folder = tmp_path / "iter_0000002" / "mp_rank_00"
    folder.mkdir(parents=True)
    torch.save({"args": saved, "checkpoint_version": 2.0, "iteration": 2},
               folder / "model_optim_rng.pt")  # fmt: skip
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    args = build_parser().parse_args(shlex.split(f"--load {tmp_path} --seq-length 8 "
                                                 "--swiglu"))  # fmt: skip
    args, theirs = load_args_from_checkpoint(args)
    assert theirs is not args and theirs.hidden_size == 32
    assert (args.num_layers, args.hidden_size, args.seq_length) == (2, 32, 8)
    assert args.add_bias_linear is False and args.tensor_model_parallel_size == 2
    assert args.swiglu  # the checkpoint does not record it: kept
    with pytest.raises(CheckpointError, match="needs --load"):
        load_args_from_checkpoint(build_parser().parse_args([]))


def test_given_dests():
    parser = build_parser()
    parser.set_defaults(tokenizer_type="GPT2BPETokenizer")
    argv = ["--num-layers", "2", "--swiglu", "--no-position-embedding", "--seq-length=8"]
    assert given_dests(parser, argv) == {"num_layers", "swiglu", "add_position_embedding",
                                         "seq_length"}  # fmt: skip
    args = parser.parse_args([])  # defaults are back
    assert args.tokenizer_type == "GPT2BPETokenizer" and args.add_position_embedding is True
    assert args.num_experts == [1] and args.use_checkpoint_args is False


# ----------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------

E2E_LLAMA = ["--use-rotary-position-embeddings", "--swiglu", "--normalization", "rmsnorm",
             "--num-key-value-heads", "2", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear"]  # fmt: skip
_SHAPE_FLAGS = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                "--max-position-embeddings")  # fmt: skip
_TOKENIZER_FLAGS = ("--vocab-file", "--merge-file", "--tokenizer-type")


def _without(argv: list[str], flags) -> list[str]:
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


@pytest.mark.slow
def test_pretrain_resumes_with_checkpoint_args_only(tmp_path):
    """A tiny LLaMA trains 8 iterations saving at 4 and 8; pretrain_gpt.py with
    --use-checkpoint-args --load-tag 4, no model-shape and no tokenizer flags, gives
    iterations 5-8 identical in loss, learning rate and consumed samples."""
    from tests.functional.gpt_runs import parse_log, run_pretrain, tiny_gpt_args

    base = _without(tiny_gpt_args("unused", "unused", 8), _TOKENIZER_FLAGS + ("--data-path",
                                                                              "--split"))
    base += ["--mock-data", "--eval-iters", "0", "--lr-decay-iters", "8"]
    save = str(tmp_path / "ckpt")
    first = run_pretrain(base + E2E_LLAMA + ["--tokenizer-type", "NullTokenizer",
                                             "--vocab-size", "99", "--save", save,
                                             "--save-interval", "4"])  # fmt: skip
    rows = parse_log(first.stdout)
    assert sorted(rows) == list(range(1, 9)), first.stdout[-3000:]
    resumed = run_pretrain(_without(base, _SHAPE_FLAGS) + [
        "--use-checkpoint-args", "--load", save, "--load-tag", "4"])  # fmt: skip
    out = resumed.stdout
    assert "> --use-checkpoint-args: from " in out and "num_layers=2" in out
    assert "tokenizer_type=NullTokenizer" in out and "swiglu=True" in out
    assert "loading checkpoint from" in out and "at iteration 4" in out
    again = parse_log(out)
    assert sorted(again) == list(range(5, 9)), out[-3000:]
    for it in range(5, 9):
        for key in ("loss", "lr", "consumed"):
            assert again[it][key] == rows[it][key], (it, key, again[it], rows[it])
