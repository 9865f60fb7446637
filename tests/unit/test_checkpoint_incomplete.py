"""Incomplete, damaged and mixed-layout checkpoints are refused by tools/checkpoint_util.py
and tools/merge_mp_partitions.py before anything is written.

The checkpoints are tiny grids written directly with the helpers of
test_checkpoint_reshape.py (their saved args record TP, PP and the padded vocab)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron.checkpoint_reshape import ReshapeError, flatten_state, reshape_checkpoint

from .test_checkpoint_reshape import (
    DIVISIBLE,
    HEADS,
    HIDDEN,
    LAYERS,
    SEQ,
    TRUE_VOCAB,
    _assert_same,
    _full_state,
    _write_source,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ITER = "iter_0000007"
FILE = "model_optim_rng.pt"


def _source(tmp_path, tp: int, pp: int, name: str = "src") -> str:
    folder = str(tmp_path / name)
    _write_source(folder, _full_state(seed=1), tp, pp)
    return folder


def _rank_file(folder: str, rank_dir: str) -> str:
    return os.path.join(folder, ITER, rank_dir, FILE)


def _rewrite(path: str, change) -> None:
    """Load a rank file, let `change` edit the state in place, save it back."""
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def _run_tool(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join("tools", script), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The refusal: exit status 1 and exactly one line on stderr."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _tool_main(script: str):
    """The tool's main(), imported from its file (the command line without a process)."""
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "tools", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _merge_argv(load: str, save: str, tp: int) -> list[str]:
    vocab = os.environ["MEGATRON_VOCAB_DIR"]
    flags = (
        f"--model-type GPT --tensor-model-parallel-size {tp} --pipeline-model-parallel-size 1 "
        f"--tokenizer-type GPT2BPETokenizer --num-layers {LAYERS} --hidden-size {HIDDEN} "
        f"--num-attention-heads {HEADS} --seq-length {SEQ} --max-position-embeddings {SEQ} "
        "--make-vocab-size-divisible-by 4"
    ).split()
    return flags + [
        "--vocab-file",
        os.path.join(vocab, "gpt2-vocab.json"),
        "--merge-file",
        os.path.join(vocab, "gpt2-merges.txt"),
        "--load",
        load,
        "--save",
        save,
    ]


def _convert(src: str, dst, *extra: str) -> str:
    """tools/checkpoint_util.py to TP=1 (or `extra`'s layout); its one error line."""
    argv = ["--load-dir", src, "--save-dir", str(dst), "--true-vocab-size", str(TRUE_VOCAB)]
    return _error_line(_run_tool("checkpoint_util.py", *argv, *extra))


# ----------------------------------------------------------------------------------------
# Through the command lines (one process each)
# ----------------------------------------------------------------------------------------


def test_checkpoint_util_refuses_a_deleted_tensor_rank(tmp_path):
    src = _source(tmp_path, tp=2, pp=1)
    shutil.rmtree(os.path.join(src, ITER, "mp_rank_01"))
    dst = tmp_path / "dst"
    line = _convert(src, dst)
    assert _rank_file(src, "mp_rank_01") in line and "TP=2" in line, line
    assert not dst.exists()


def test_merge_mp_partitions_refuses_a_deleted_tensor_rank(tmp_path, vocab_dir, monkeypatch):
    monkeypatch.setenv("MEGATRON_VOCAB_DIR", vocab_dir)
    src = _source(tmp_path, tp=2, pp=1)
    shutil.rmtree(os.path.join(src, ITER, "mp_rank_01"))
    dst = tmp_path / "merged"
    line = _error_line(_run_tool("merge_mp_partitions.py", *_merge_argv(src, str(dst), tp=1)))
    assert _rank_file(src, "mp_rank_01") in line and "saved args" in line, line
    assert not dst.exists()


def test_checkpoint_util_refuses_a_truncated_rank_file_and_keeps_the_target(tmp_path):
    src = _source(tmp_path, tp=2, pp=2)
    bad = _rank_file(src, "mp_rank_01_001")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("kept")
    line = _convert(src, dst)
    assert bad in line and "unreadable" in line, line
    assert sorted(os.listdir(dst)) == ["notes.txt"]


def test_checkpoint_util_refuses_leftover_rank_folders(tmp_path):
    """A TP=1 x PP=1 checkpoint whose folder also holds mp_rank_01 and mp_rank_00_001."""
    src = _source(tmp_path, tp=1, pp=1)
    for extra in ("mp_rank_01", "mp_rank_00_001"):
        shutil.copytree(os.path.join(src, ITER, "mp_rank_00"), os.path.join(src, ITER, extra))
    dst = tmp_path / "dst"
    line = _convert(src, dst, "--target-tensor-parallel-size", "2")
    assert "mp_rank_01" in line and "mp_rank_00_001" in line and "outside TP=1" in line
    assert not dst.exists()


# ----------------------------------------------------------------------------------------
# The same checks in-process
# ----------------------------------------------------------------------------------------


def _refused(src: str, dst, *patterns: str) -> str:
    with pytest.raises(ReshapeError) as info:
        reshape_checkpoint(src, str(dst), 1, 1, true_vocab_size=TRUE_VOCAB)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    assert "\n" not in message
    assert not os.path.exists(dst)
    return message


def test_missing_pipeline_rank_and_missing_file_are_named(tmp_path):
    src = _source(tmp_path, tp=2, pp=2)
    shutil.rmtree(os.path.join(src, ITER, "mp_rank_00_001"))
    os.remove(_rank_file(src, "mp_rank_01_000"))
    _refused(
        src, tmp_path / "dst", _rank_file(src, "mp_rank_00_001"), _rank_file(src, "mp_rank_01_000")
    )


def test_shard_shapes_must_match_the_saved_args(tmp_path):
    src = _source(tmp_path, tp=2, pp=1)
    path = _rank_file(src, "mp_rank_01")
    word = ("language_model", "embedding", "word_embeddings")

    def halve_vocab(state):
        weight = state["model"][word[0]][word[1]][word[2]]["weight"]
        state["model"][word[0]][word[1]][word[2]]["weight"] = weight[: weight.size(0) // 2]

    _rewrite(path, halve_vocab)
    message = _refused(src, tmp_path / "dst", path, "word_embeddings.weight")
    assert "[14, 24]" in message and "[28, 24]" in message  # padded vocab 56 over 2 ranks


def test_saved_args_that_contradict_the_files_are_refused(tmp_path):
    src = _source(tmp_path, tp=2, pp=1)

    def widen(state):
        state["args"].hidden_size = 2 * HIDDEN

    _rewrite(_rank_file(src, "mp_rank_00"), widen)
    _refused(src, tmp_path / "dst", _rank_file(src, "mp_rank_00"), "the saved args (TP=2)")

    _rewrite(_rank_file(src, "mp_rank_00"), lambda s: setattr(s["args"], "hidden_size", HIDDEN))
    _rewrite(
        _rank_file(src, "mp_rank_01"),
        lambda s: setattr(s["args"], "tensor_model_parallel_size", 4),
    )
    _refused(src, tmp_path / "dst", _rank_file(src, "mp_rank_01"), "(4, 1, 1)")


def test_virtual_pipeline_size_is_taken_from_the_saved_args(tmp_path):
    src = _source(tmp_path, tp=1, pp=2)
    for rank_dir in ("mp_rank_00_000", "mp_rank_00_001"):
        _rewrite(
            _rank_file(src, rank_dir),
            lambda s: setattr(s["args"], "virtual_pipeline_model_parallel_size", 2),
        )
    _refused(src, tmp_path / "dst", "holds 1 model chunk(s), not 2", "virtual PP=2")


def test_checkpoints_without_saved_args_are_inferred_from_folders(tmp_path):
    full = _full_state(seed=1)
    src = _source(tmp_path, tp=2, pp=2)
    for rank_dir in os.listdir(os.path.join(src, ITER)):
        _rewrite(_rank_file(src, rank_dir), lambda s: s.pop("args"))
    summary = reshape_checkpoint(
        src, str(tmp_path / "dst"), 1, 1, true_vocab_size=TRUE_VOCAB, divisible_by=DIVISIBLE
    )
    assert (summary["source_tp"], summary["source_pp"]) == (2, 2)
    model = torch.load(tmp_path / "dst" / ITER / "mp_rank_00" / FILE, weights_only=False)
    _assert_same(flatten_state(model["model"]), full)
    shutil.rmtree(os.path.join(src, ITER, "mp_rank_00_001"))
    _refused(src, tmp_path / "dst2", _rank_file(src, "mp_rank_00_001"), "(rank folders)")


def test_merge_flags_must_match_the_saved_layout(tmp_path, vocab_dir, monkeypatch, capsys):
    monkeypatch.setenv("MEGATRON_VOCAB_DIR", vocab_dir)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    src = _source(tmp_path, tp=2, pp=1)
    dst = tmp_path / "merged"
    assert _tool_main("merge_mp_partitions.py")(_merge_argv(src, str(dst), tp=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TP=2 x PP=1" in err[0] and "saved args" in err[0], err
    assert not dst.exists()


def test_target_folder_is_left_as_it_was_when_a_write_fails(tmp_path, monkeypatch):
    src = _source(tmp_path, tp=1, pp=1)
    kept = tmp_path / "kept"
    (kept / ITER).mkdir(parents=True)
    (kept / "notes.txt").write_text("kept")
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    for dst in (tmp_path / "new", kept):
        calls.clear()
        with pytest.raises(OSError, match="No space"):
            reshape_checkpoint(src, str(dst), 2, 1, true_vocab_size=TRUE_VOCAB)
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(kept)) == [ITER, "notes.txt"] and not os.listdir(kept / ITER)


def test_target_folder_holding_another_layout_is_refused(tmp_path):
    src = _source(tmp_path, tp=1, pp=1)
    dst = tmp_path / "dst"
    stale = dst / ITER / "mp_rank_01"
    stale.mkdir(parents=True)
    with pytest.raises(ReshapeError, match="mp_rank_01 that the target layout does not write"):
        reshape_checkpoint(src, str(dst), 1, 1, true_vocab_size=TRUE_VOCAB)
    assert os.listdir(dst / ITER) == ["mp_rank_01"] and not os.listdir(stale)
    assert not (dst / "latest_checkpointed_iteration.txt").exists()
