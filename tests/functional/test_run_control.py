"""Megatron-DeepSpeed's checkpoint-loading and run-control flags through pretrain_gpt.py:
--load-tag, --reset-iteration, --no-load-lr-state, --skip-train, --exit-on-missing-checkpoint,
--kill-switch-file and --data-cache-path (at two ranks sharing the caches rank 0 builds).

One 8-iteration run saves iterations 6 and 8; the other runs load iteration 6 of it. The
loss a log line reports is computed before that iteration's update, so a run resumed with
the weights, optimizer state, RNG and data position of iteration 6 logs the same loss at
iteration 7 as the first run, whatever its learning rate.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from .gpt_runs import ROOT, launch, parse_log, run_pretrain, small_vocab_dataset, tiny_gpt_args

pytestmark = pytest.mark.slow


def _args(data: str, iters: int) -> list[str]:
    args = tiny_gpt_args(data, "", iters) + ["--tokenizer-type", "NullTokenizer",
                                             "--vocab-size", "128", "--eval-interval", "4",
                                             "--split", "80,10,10"]
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


def _tracker(folder) -> str:
    return (folder / "latest_checkpointed_iteration.txt").read_text().strip()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_control")
    data = small_vocab_dataset(str(tmp))
    save, cache = tmp / "ckpt", tmp / "index-cache"
    proc = run_pretrain(_args(data, 8) + ["--save", str(save), "--save-interval", "6",
                                          "--data-cache-path", str(cache)])
    return tmp, data, save, cache, parse_log(proc.stdout)


def test_data_cache_path_holds_the_index_caches(first_run):
    tmp, data, _, cache, rows = first_run
    assert sorted(rows) == list(range(1, 9))
    beside = glob.glob(f"{data}_*indexmap*")
    assert beside == [], beside
    cached = sorted(os.path.basename(p) for p in glob.glob(str(cache / "*.npy")))
    # doc/sample/shuffle indices of the train, valid and test splits
    assert len(cached) == 9, cached
    assert all(name.startswith("small_text_document_") for name in cached)
    assert not glob.glob(str(cache / "*.tmp.*"))  # written through a rename


def test_load_tag_reset_iteration_and_no_load_lr_state(first_run):
    tmp, data, save, _, first = first_run
    assert _tracker(save) == "8"
    # --load-tag 6 with --reset-iteration: the weights, optimizer and lr state of
    # iteration 6, counted from 0 with no consumed samples
    save2 = tmp / "reset"
    out = run_pretrain(_args(data, 2) + ["--load", str(save), "--load-tag", "6",
                                         "--reset-iteration", "--save", str(save2)]).stdout
    assert "loading checkpoint from" in out and "at iteration 6" in out
    reset = parse_log(out)
    assert sorted(reset) == [1, 2]
    assert [reset[i]["consumed"] for i in (1, 2)] == [8, 16]
    assert reset[1]["lr"] == first[7]["lr"]  # the schedule goes on from step 6
    assert _tracker(save2) == "2"
    # --no-load-lr-state: everything else of iteration 6 loads; the schedule starts over
    out = run_pretrain(_args(data, 8) + ["--load", str(save), "--load-tag", "iter_0000006",
                                         "--no-load-lr-state"]).stdout
    fresh_lr = parse_log(out)
    assert sorted(fresh_lr) == [7, 8]
    assert fresh_lr[7]["consumed"] == 56
    assert fresh_lr[7]["loss"] == first[7]["loss"]  # same weights and data at iteration 7
    assert fresh_lr[7]["lr"] == first[1]["lr"] != first[7]["lr"]  # warmup's first step


def test_skip_train_evaluates_the_loaded_checkpoint(first_run, tmp_path):
    """At two ranks, with a fresh --data-cache-path both ranks read what rank 0 built."""
    _, data, save, _, _ = first_run
    cache, save3 = tmp_path / "cache2", tmp_path / "unused"
    out = launch(2, _args(data, 8) + ["--load", str(save), "--skip-train", "--save",
                                      str(save3), "--data-cache-path", str(cache)])
    assert "skipping training (--skip-train)" in out
    assert parse_log(out) == {}
    assert "validation loss at the end of training for val data" in out
    assert "validation loss at the end of training for test data" in out
    assert not save3.exists() or not any(save3.iterdir())
    assert len(glob.glob(str(cache / "*.npy"))) == 9


def test_exit_on_missing_checkpoint(first_run, tmp_path):
    _, data, _, _, _ = first_run
    missing = tmp_path / "typo"
    proc = run_pretrain(_args(data, 2) + ["--load", str(missing),
                                          "--exit-on-missing-checkpoint"], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"--load {missing} (no such folder)" in line, line
    assert "--exit-on-missing-checkpoint" in line
    assert parse_log(proc.stdout) == {}


def test_kill_switch_file_saves_and_exits(first_run, tmp_path):
    """The file appears while the run trains: it saves the iteration it reached and exits
    0; started with the file present, a run exits before building anything."""
    _, data, _, _, _ = first_run
    switch, save = tmp_path / "STOP", tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py")] + _args(data, 400) + [
        "--kill-switch-file", str(switch), "--save", str(save), "--save-interval", "1000",
        "--eval-interval", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " iteration        2/" in line:
                switch.touch()
        assert proc.wait(timeout=120) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    rows = parse_log(out)
    last = max(rows)
    assert 2 <= last < 400
    assert f"found the kill switch file {switch} at iteration {last}" in out
    assert _tracker(save) == str(last)
    again = run_pretrain(cmd[2:], script=cmd[:2]).stdout
    assert f"found the kill switch file {switch}: exiting" in again
    assert parse_log(again) == {} and "building GPT model" not in again


def test_deepspeed_load_tag_and_reset_iteration(first_run, tmp_path):
    """Under --deepspeed: --load-tag global_step3 with --reset-iteration loads the engine's
    weights, optimizer and lr scheduler of step 3 and counts from 0 (the engine too: its
    next checkpoint is global_step2)."""
    _, data, _, _, _ = first_run
    ds = ["--deepspeed", "--zero-stage", "1"]
    save, save2 = tmp_path / "ds", tmp_path / "ds_reset"
    first = parse_log(run_pretrain(_args(data, 6) + ds + [
        "--save", str(save), "--save-interval", "3"]).stdout)
    assert sorted(first) == list(range(1, 7))
    out = run_pretrain(_args(data, 2) + ds + [
        "--load", str(save), "--load-tag", "global_step3", "--reset-iteration",
        "--save", str(save2)]).stdout
    reset = parse_log(out)
    assert sorted(reset) == [1, 2]
    assert [reset[i]["consumed"] for i in (1, 2)] == [8, 16]
    assert reset[1]["lr"] == first[4]["lr"] != first[1]["lr"]
    assert (save2 / "latest").read_text().strip() == "global_step2"
