"""Checkpoint safety rules on folders written by hand (no process groups): which
checkpoint loads, layouts, disk-full and killed saves, finite weights, run lineage and
--keep-last-checkpoints."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys

import pytest
import torch

from megatron import checkpointing as ckpt
from megatron.checkpointing import (
    CheckpointError,
    CheckpointSpaceError,
    checkpoint_layout,
    checkpoints_to_delete,
    foreign_checkpoints,
    layout_mismatch_error,
    prune_checkpoints,
    remove_stale_temp_files,
    resolve_checkpoint,
)
from megatron.deepspeed_engine import _load_tag, _refuse_untracked
from megatron.errors import NonFiniteLossError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _iter(root, it: int, ranks=("mp_rank_00",), missing=(), run_id=None, name=None):
    """An iter_* folder whose rank folders hold model_optim_rng.pt, except those in
    `missing` (which hold only a save's temporary file)."""
    folder = root / (name or f"iter_{it:07d}")
    for rank in ranks:
        (folder / rank).mkdir(parents=True)
        file = "model_optim_rng.pt.tmp.999999999" if rank in missing else "model_optim_rng.pt"
        (folder / rank / file).write_bytes(b"weights")
    if run_id is not None:
        (folder / "run_id.txt").write_text(run_id + "\n")
    return folder


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------
# which checkpoint loads
# ---------------------------------------------------------------------------------------


def test_iter_folders_without_tracker_are_refused(tmp_path):
    _iter(tmp_path, 2)
    _iter(tmp_path, 4)
    _iter(tmp_path, 6, ranks=("mp_rank_00", "mp_rank_01"), missing=("mp_rank_01",))
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(tmp_path))
    text = _one_line(e)
    assert f"{tmp_path} holds checkpoints (iter_0000002, iter_0000004, iter_0000006)" in text
    assert "no latest_checkpointed_iteration.txt" in text
    assert "the newest complete one is iteration 4" in text
    assert f"`echo 4 > {tmp_path}/latest_checkpointed_iteration.txt`" in text
    assert "--load-tag iter_0000004" in text


def test_untracked_folders_none_complete(tmp_path):
    _iter(tmp_path, 6, ranks=("mp_rank_00", "mp_rank_01"), missing=("mp_rank_01",))
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(tmp_path))
    assert "none of them is complete" in _one_line(e)


def test_fresh_folders_start_from_random(tmp_path):
    assert resolve_checkpoint(str(tmp_path / "absent")) is None
    assert resolve_checkpoint(str(tmp_path)) is None
    # the debris of a first save killed before any file was complete
    _iter(tmp_path, 3, missing=("mp_rank_00",))
    assert resolve_checkpoint(str(tmp_path)) is None


def test_tracker_naming_a_missing_iteration(tmp_path):
    _iter(tmp_path, 2)
    _iter(tmp_path, 4)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(tmp_path))
    text = _one_line(e)
    assert (f"{tmp_path}/latest_checkpointed_iteration.txt names iteration 6 but "
            f"{tmp_path}/iter_0000006 is missing") in text
    assert f"iterations present in {tmp_path}: 2, 4" in text
    assert "reshape" not in text


@pytest.mark.parametrize("tag, want", [("4", (4, False)), ("iter_0000004", (4, False)),
                                       ("iter_4", (4, False)), ("release", (0, True))])
def test_load_tag_overrides_the_tracker(tmp_path, tag, want):
    _iter(tmp_path, 2)
    _iter(tmp_path, 4)
    _iter(tmp_path, 0, name="release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    assert resolve_checkpoint(str(tmp_path), tag) == want


def test_load_tag_that_does_not_exist(tmp_path):
    _iter(tmp_path, 2)
    _iter(tmp_path, 4)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(tmp_path), "7")
    assert _one_line(e) == (f"--load-tag 7: {tmp_path} has no iter_0000007; checkpoints "
                            "there: iter_0000002, iter_0000004")
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(tmp_path), "best")
    assert "--load-tag 'best': expected an iteration" in _one_line(e)


def test_deepspeed_load_tag(tmp_path):
    for step in (2, 4):
        (tmp_path / f"global_step{step}").mkdir()
        (tmp_path / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert _load_tag(str(tmp_path), False, "global_step2") == "global_step2"
    assert _load_tag(str(tmp_path), False, "4") == "global_step4"
    with pytest.raises(CheckpointError) as e:
        _load_tag(str(tmp_path), False, "global_step9")
    assert "checkpoints there: global_step2, global_step4" in _one_line(e)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    with pytest.raises(CheckpointError) as e:
        _load_tag(str(tmp_path), False)
    assert "names iteration 6 but" in _one_line(e)
    assert "iterations present in" in _one_line(e)
    os.remove(tmp_path / "latest_checkpointed_iteration.txt")
    with pytest.raises(CheckpointError) as e:
        _refuse_untracked(str(tmp_path))
    assert "--load-tag global_step4" in _one_line(e)


# ---------------------------------------------------------------------------------------
# parallel layout
# ---------------------------------------------------------------------------------------


def test_checkpoint_layout(tmp_path):
    assert checkpoint_layout(str(_iter(tmp_path, 1))) == (1, 1, True)
    assert checkpoint_layout(str(_iter(tmp_path, 2, ("mp_rank_00", "mp_rank_01")))) == (2, 1, True)
    grid = ("mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001")
    assert checkpoint_layout(str(_iter(tmp_path, 3, grid))) == (2, 2, True)
    assert checkpoint_layout(str(_iter(tmp_path, 4, grid[:3]))) == (2, 2, False)
    assert checkpoint_layout(str(_iter(tmp_path, 5, grid, missing=grid[1:2]))) == (2, 2, False)
    assert checkpoint_layout(str(_iter(tmp_path, 6, ("mp_rank_00", "mp_rank_00_001")))).complete \
        is False
    assert checkpoint_layout(str(tmp_path / "absent")) is None


def test_layout_mismatch_names_the_reshape_command(tmp_path):
    src = str(tmp_path / "ckpt")
    text = str(layout_mismatch_error(src + "/", 2, 1, 1, 1))
    assert text.startswith(f"checkpoint {src}/ is TP=2 x PP=1, this run is TP=1 x PP=1")
    command = (f"python tools/checkpoint_util.py --load-dir {src} --save-dir {src}_tp1_pp1 "
               "--target-tensor-parallel-size 1 --target-pipeline-parallel-size 1")
    assert f"`{command}`" in text
    # the flags are the tool's own
    sys.path.insert(0, ROOT)
    from tools.checkpoint_util import build_parser

    parsed = build_parser().parse_args(command.split()[2:])
    assert (parsed.load_dir, parsed.save_dir) == (src, f"{src}_tp1_pp1")
    assert (parsed.target_tensor_parallel_size, parsed.target_pipeline_parallel_size) == (1, 1)


def _model_args(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                padded_vocab_size=50304, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=1, load="/ckpt")
    base.update(kw)
    return argparse.Namespace(**base)


def test_saved_layout_is_named_before_the_vocab_size():
    saved = _model_args(tensor_model_parallel_size=2, padded_vocab_size=50432)
    with pytest.raises(CheckpointError) as e:
        ckpt.check_checkpoint_args(saved, _model_args())
    text = _one_line(e)
    assert text.startswith("checkpoint /ckpt is TP=2 x PP=1, this run is TP=1 x PP=1")
    assert "padded vocab" not in text
    with pytest.raises(CheckpointError) as e:
        ckpt.check_checkpoint_args(_model_args(hidden_size=96), _model_args())
    assert "--hidden-size: checkpoint has 96, this run has 64" in _one_line(e)


# ---------------------------------------------------------------------------------------
# disk full, killed saves
# ---------------------------------------------------------------------------------------


class _FullDisk:
    """A file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fill_disk_after(monkeypatch, room: int):
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), room),
                        raising=False)


def test_disk_full_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"previous")
    _fill_disk_after(monkeypatch, 4096)
    with pytest.raises(CheckpointSpaceError) as e:
        ckpt._atomic_torch_save({"w": torch.randn(256, 256)}, str(path))
    assert _one_line(e) == f"no space left on device while writing {path}"
    assert e.value.__suppress_context__
    assert os.listdir(path.parent) == ["model_optim_rng.pt"]
    assert path.read_bytes() == b"previous"

    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("2")
    _fill_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointSpaceError):
        ckpt._atomic_write_text(str(tracker), "4")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    assert tracker.read_text() == "2"


def test_other_write_errors_keep_their_type(tmp_path, monkeypatch):
    def broken(obj, f):
        f.write(b"half")
        raise ValueError("cannot pickle")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(ValueError):
        ckpt._atomic_torch_save({}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    rank_dir = tmp_path / "iter_0000002" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    dead = rank_dir / f"model_optim_rng.pt.tmp.{_dead_pid()}"
    live = rank_dir / f"model_optim_rng.pt.tmp.{os.getpid()}"
    tracker_tmp = tmp_path / f"latest_checkpointed_iteration.txt.tmp.{_dead_pid()}"
    keep = [rank_dir / "model_optim_rng.pt", rank_dir / "notes.tmp", live]
    for p in [dead, tracker_tmp, *keep]:
        p.write_bytes(b"x")
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(tracker_tmp)])
    assert all(p.exists() for p in keep)
    assert not dead.exists() and not tracker_tmp.exists()


# ---------------------------------------------------------------------------------------
# finite weights
# ---------------------------------------------------------------------------------------


def _model(bad: float | None = None):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    if bad is not None:
        with torch.no_grad():
            model[1].bias[1] = bad
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named(bad):
    with pytest.raises(NonFiniteLossError) as e:
        ckpt.check_weights_finite([_model(), _model(bad)], 30)
    assert _one_line(e).startswith("iteration 30: parameter model1.1.bias holds NaN or inf")
    ckpt.check_weights_finite([_model()], 30)


def test_save_with_non_finite_weights_writes_nothing(tmp_path, monkeypatch):
    args = argparse.Namespace(save=str(tmp_path), deepspeed=False)
    monkeypatch.setattr(ckpt, "get_args", lambda: args)
    with pytest.raises(NonFiniteLossError) as e:
        ckpt.save_checkpoint(10, [_model(float("nan"))], None, None)
    assert "iteration 10: parameter 1.bias" in _one_line(e)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# run lineage
# ---------------------------------------------------------------------------------------


def test_foreign_checkpoints(tmp_path):
    _iter(tmp_path, 2, run_id="mine")
    _iter(tmp_path, 4, run_id="other")
    _iter(tmp_path, 6)  # written without a run id
    _iter(tmp_path, 8, run_id="other", missing=("mp_rank_00",))  # debris of a killed save
    _iter(tmp_path, 10, run_id="mine")
    (tmp_path / "global_step12").mkdir()
    (tmp_path / "global_step12" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert foreign_checkpoints(str(tmp_path), 0, "mine") == [
        "iter_0000004", "iter_0000006", "global_step12"]
    assert foreign_checkpoints(str(tmp_path), 4, "mine") == ["iter_0000006", "global_step12"]
    assert foreign_checkpoints(str(tmp_path), 0, "other") == [
        "iter_0000002", "iter_0000006", "iter_0000010", "global_step12"]


def test_start_check_refuses_another_runs_newer_checkpoints(tmp_path, monkeypatch):
    _iter(tmp_path, 2, run_id="old")
    _iter(tmp_path, 4, run_id="old")
    args = argparse.Namespace(save=str(tmp_path), iteration=0)
    monkeypatch.setattr(ckpt, "get_args", lambda: args)
    with pytest.raises(CheckpointError) as e:
        ckpt.check_save_folder()
    text = _one_line(e)
    assert text.startswith(f"--save {tmp_path} holds checkpoints of another run newer than "
                           "iteration 0, where this run starts (iter_0000002, iter_0000004)")
    assert f"resume that run with --load {tmp_path}" in text
    args.checkpoint_run_id = "old"
    ckpt.check_save_folder()  # a resume of that run


def test_save_refuses_another_runs_folder(tmp_path):
    other = _iter(tmp_path, 4, run_id="old")
    args = argparse.Namespace(save=str(tmp_path), checkpoint_run_id="new")
    with pytest.raises(CheckpointError) as e:
        ckpt.prepare_save_folder(args, str(other), 4)
    assert _one_line(e).startswith(f"--save {tmp_path} holds checkpoints of another run at "
                                   "iteration 4 or later (iter_0000004): refusing to overwrite")
    assert (other / "run_id.txt").read_text() == "old\n"
    # nor below it: the tracker would then hide the other run's newer checkpoint
    with pytest.raises(CheckpointError):
        ckpt.prepare_save_folder(args, str(tmp_path / "iter_0000003"), 3)
    assert not (tmp_path / "iter_0000003").exists()
    mine = tmp_path / "iter_0000006"
    ckpt.prepare_save_folder(args, str(mine), 6)
    assert (mine / "run_id.txt").read_text() == "new\n"
    args.checkpoint_run_id = "old"
    ckpt.prepare_save_folder(args, str(other), 4)  # the same run may rewrite its own folder


# ---------------------------------------------------------------------------------------
# --keep-last-checkpoints
# ---------------------------------------------------------------------------------------


def test_checkpoints_to_delete():
    assert checkpoints_to_delete([10, 20, 30, 40], None, 40) == []
    assert checkpoints_to_delete([10, 20, 30, 40], 2, 40) == [10, 20]
    assert checkpoints_to_delete([40, 10, 30, 20], 1, 40) == [10, 20, 30]
    assert checkpoints_to_delete([10, 20], 5, 20) == []
    # resumed from 20 over a run that had reached 50: the newer folders are left alone
    assert checkpoints_to_delete([10, 20, 30, 40, 50], 1, 20) == [10]
    assert checkpoints_to_delete([], 2, 10) == []


def test_prune_checkpoints_keeps_others_and_release(tmp_path):
    for it in (1, 2, 3, 4, 5):
        _iter(tmp_path, it, run_id="mine")
    _iter(tmp_path, 0, run_id="other")
    _iter(tmp_path, 0, name="release", run_id="mine")
    removed = prune_checkpoints(str(tmp_path), 5, 2, "mine")
    assert removed == ["iter_0000001", "iter_0000002", "iter_0000003"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000000", "iter_0000004", "iter_0000005",
                                            "release"]
    for step in (1, 2, 3):
        _iter(tmp_path, step, name=f"global_step{step}", run_id="mine")
    removed = prune_checkpoints(str(tmp_path), 3, 1, "mine", ckpt.DS_STEP_RE)
    assert removed == ["global_step1", "global_step2"]


def test_llama_options_are_compared_on_load():
    llama = dict(num_key_value_heads=2, swiglu=True, normalization="rmsnorm",
                 use_rotary_position_embeddings=True, add_position_embedding=False,
                 untie_embeddings_and_output_weights=True, add_bias_linear=False)
    ckpt.check_checkpoint_args(_model_args(**llama), _model_args(**llama))
    ckpt.check_checkpoint_args(_model_args(), _model_args(**llama))  # older args: not recorded
    with pytest.raises(CheckpointError) as e:
        ckpt.check_checkpoint_args(_model_args(**llama),
                                   _model_args(**dict(llama, num_key_value_heads=4,
                                                      normalization="layernorm")))
    text = _one_line(e)
    assert "--num-key-value-heads: checkpoint has 2, this run has 4" in text
    assert "--normalization: checkpoint has rmsnorm, this run has layernorm" in text
