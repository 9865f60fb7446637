"""pretrain_gpt.py on checkpoint folders a user can get wrong: a lost tracker, --load-tag,
another run's folder given as --save, a tensor-parallel checkpoint loaded at TP=1, and
--keep-last-checkpoints (tiny GPT, CPU, a few iterations per launch)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from .gpt_runs import ROOT, parse_log, preprocess, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow
TRACKER = "latest_checkpointed_iteration.txt"


def _args(data_path: str, vocab_dir: str, iters: int, *extra: str) -> list[str]:
    return tiny_gpt_args(data_path, vocab_dir, iters) + ["--eval-iters", "0", *extra]


def _snapshot(folder: str) -> dict:
    """{relative path: (size, mtime_ns)} of every file under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return found


def _iter_dirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("iter_"))


def _run_id(folder: str) -> str:
    with open(os.path.join(folder, "run_id.txt")) as f:
        return f.read().strip()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _refused(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "iteration        1/" not in proc.stdout, "refused only after training started"
    return out


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, vocab_dir):
    return preprocess(str(tmp_path_factory.mktemp("data")), vocab_dir)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_path, vocab_dir):
    """4 iterations saving every iteration, keeping the last 2."""
    save = str(tmp_path_factory.mktemp("first") / "ckpt")
    proc = run_pretrain(_args(data_path, vocab_dir, 4, "--save", save, "--save-interval", "1",
                              "--keep-last-checkpoints", "2"))
    return parse_log(proc.stdout), save, proc.stdout


def _copy_without_tracker(save: str, dst) -> str:
    shutil.copytree(save, dst)
    os.remove(os.path.join(dst, TRACKER))
    return str(dst)


def test_keep_last_checkpoints(first_run):
    rows, save, stdout = first_run
    assert sorted(rows) == [1, 2, 3, 4]
    with open(os.path.join(save, TRACKER)) as f:
        assert f.read() == "4"
    assert _iter_dirs(save) == ["iter_0000003", "iter_0000004"]
    assert "removed old checkpoint iter_0000002 (--keep-last-checkpoints 2)" in stdout
    assert _run_id(os.path.join(save, "iter_0000003")) == _run_id(
        os.path.join(save, "iter_0000004"))


def test_lost_tracker_is_refused_naming_the_way_out(first_run, data_path, vocab_dir, tmp_path):
    """--load DIR --save DIR on iter_* folders without a tracker used to start from random
    and overwrite them."""
    _, save, _ = first_run
    ckpt = _copy_without_tracker(save, tmp_path / "ckpt")
    before = _snapshot(ckpt)
    proc = run_pretrain(_args(data_path, vocab_dir, 6, "--load", ckpt, "--save", ckpt,
                              "--save-interval", "1"), check=False)
    out = _refused(proc)
    assert (f"CheckpointError: {ckpt} holds checkpoints (iter_0000003, iter_0000004) but no "
            f"{TRACKER}: refusing to start from random over them; the newest complete one is "
            f"iteration 4: resume from it with `echo 4 > {ckpt}/{TRACKER}` or --load-tag "
            "iter_0000004") in out
    assert _snapshot(ckpt) == before


def test_load_tag_resumes_and_cleans_up(first_run, data_path, vocab_dir, tmp_path):
    """--load-tag picks iteration 3 of a folder without tracker; the run rewrites its own
    lineage's iter_0000004 exactly, removes a killed save's leftover and keeps 2."""
    rows, save, _ = first_run
    ckpt = _copy_without_tracker(save, tmp_path / "ckpt")
    lineage = _run_id(os.path.join(ckpt, "iter_0000004"))
    own_file = os.path.join(ckpt, "iter_0000004", "mp_rank_00", "model_optim_rng.pt")
    old_mtime = os.stat(own_file).st_mtime_ns
    leftover = f"{own_file}.tmp.{_dead_pid()}"
    with open(leftover, "wb") as f:
        f.write(b"half a checkpoint")
    proc = run_pretrain(_args(data_path, vocab_dir, 5, "--load", ckpt, "--save", ckpt,
                              "--load-tag", "iter_0000003", "--save-interval", "1",
                              "--keep-last-checkpoints", "2"))
    resumed = parse_log(proc.stdout)
    assert sorted(resumed) == [4, 5], proc.stdout[-3000:]
    for key in ("loss", "lr", "consumed"):
        assert resumed[4][key] == rows[4][key]
    assert not os.path.exists(leftover)
    assert os.stat(own_file).st_mtime_ns != old_mtime
    with open(os.path.join(ckpt, TRACKER)) as f:
        assert f.read() == "5"
    assert _iter_dirs(ckpt) == ["iter_0000004", "iter_0000005"]
    assert {_run_id(os.path.join(ckpt, n)) for n in _iter_dirs(ckpt)} == {lineage}


def test_fresh_run_into_another_runs_folder_is_refused(first_run, data_path, vocab_dir,
                                                       tmp_path):
    """A new run (no --load) given a finished run's folder as --save stops before its
    first step instead of overwriting iter_0000003 and iter_0000004."""
    _, save, _ = first_run
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(save, ckpt)
    before = _snapshot(ckpt)
    proc = run_pretrain(_args(data_path, vocab_dir, 4, "--save", ckpt, "--save-interval", "1"),
                        check=False)
    out = _refused(proc)
    assert (f"--save {ckpt} holds checkpoints of another run newer than iteration 0, where "
            "this run starts (iter_0000003, iter_0000004): refusing to overwrite them; "
            f"resume that run with --load {ckpt}") in out
    assert _snapshot(ckpt) == before


def test_tensor_parallel_checkpoint_at_tp1_names_the_layout(first_run, data_path, vocab_dir,
                                                            tmp_path):
    """A TP=2 checkpoint loaded at TP=1 is named as such (not as a vocabulary size
    mismatch), with a reshape command that works as printed."""
    _, save, _ = first_run
    tp2 = str(tmp_path / "ckpt_tp2")
    subprocess.run([sys.executable, "tools/checkpoint_util.py", "--load-dir", save,
                    "--save-dir", tp2, "--target-tensor-parallel-size", "2"],
                   check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    proc = run_pretrain(_args(data_path, vocab_dir, 6, "--load", tp2), check=False)
    out = _refused(proc)
    assert f"checkpoint {tp2} is TP=2 x PP=1, this run is TP=1 x PP=1: reshape it with" in out
    assert "padded vocab size: checkpoint has" not in out
    command = re.search(r"`(python tools/checkpoint_util.py [^`]*)`", out).group(1)
    assert command == (f"python tools/checkpoint_util.py --load-dir {tp2} --save-dir "
                       f"{tp2}_tp1_pp1 --target-tensor-parallel-size 1 "
                       "--target-pipeline-parallel-size 1")
    subprocess.run([sys.executable, *command.split()[1:]], check=True, capture_output=True,
                   text=True, cwd=ROOT, timeout=300)
    assert os.path.isfile(os.path.join(f"{tp2}_tp1_pp1", "iter_0000004", "mp_rank_00",
                                        "model_optim_rng.pt"))
