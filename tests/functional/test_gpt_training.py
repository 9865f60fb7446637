"""End-to-end runs of pretrain_gpt.py on a tiny GPT (CPU, fp32, one thread).

The golden losses in golden/gpt_tiny_50.json were produced by this code on CPU in fp32;
the printed 7-significant-digit values must match within GOLDEN_REL_TOL (fp32 on one CPU
thread is deterministic on one machine; CPUs with other vector units round differently). Set MEGATRON_UPDATE_GOLDEN=1 to rewrite the file after an intended change.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .gpt_runs import (
    ROOT,
    parse_log,
    preprocess,
    run_pretrain,
    small_vocab_dataset,
    tiny_gpt_args,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "gpt_tiny_50.json")
GOLDEN_REL_TOL = 1e-5  # per iteration, relative (7 printed digits are ~1e-7 apart)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, vocab_dir):
    return preprocess(str(tmp_path_factory.mktemp("data")), vocab_dir)


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, data_path, vocab_dir):
    """50 iterations, saving every 10 (the resume test starts from these checkpoints)."""
    save = str(tmp_path_factory.mktemp("golden_ckpt"))
    proc = run_pretrain(tiny_gpt_args(data_path, vocab_dir, 50)
                        + ["--save", save, "--save-interval", "10"])
    return parse_log(proc.stdout), save, proc.stdout


@pytest.mark.real_vocab
def test_golden_losses(golden_run):
    rows, _, stdout = golden_run
    assert sorted(rows) == list(range(1, 51)), stdout[-3000:]
    losses = [rows[i]["loss"] for i in range(1, 51)]
    if os.environ.get("MEGATRON_UPDATE_GOLDEN") == "1" or not os.path.exists(GOLDEN):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"lm loss": losses}, f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)["lm loss"]
    # Exact on the machine that wrote the file; another CPU's kernels (AVX2 or AVX-512
    # paths of the same op) may round the last printed digit differently.
    worst = max(abs(float(a) - float(b)) / abs(float(b)) for a, b in zip(losses, golden))
    assert len(losses) == len(golden) and worst <= GOLDEN_REL_TOL, (worst, losses, golden)
    # the model learns: the last ten iterations average well below the first ten
    first = sum(float(v) for v in losses[:10]) / 10
    last = sum(float(v) for v in losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert " validation loss at iteration 50 | lm loss value: " in stdout


def test_checkpoint_layout(golden_run):
    _, save, _ = golden_run
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "50"
    for it in (10, 20, 30, 40, 50):
        assert os.path.isfile(os.path.join(save, f"iter_{it:07d}", "mp_rank_00",
                                           "model_optim_rng.pt"))
    leftovers = [n for _, _, files in os.walk(save) for n in files if ".tmp" in n]
    assert leftovers == []


def test_resume_is_exact(golden_run, data_path, vocab_dir, tmp_path):
    """Resuming from iteration 10 gives iterations 11-20 identical in loss, lr and
    consumed samples to the uninterrupted run."""
    rows, save, _ = golden_run
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(os.path.join(save, "iter_0000010"), ckpt / "iter_0000010")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    proc = run_pretrain(tiny_gpt_args(data_path, vocab_dir, 20) + ["--load", str(ckpt)])
    resumed = parse_log(proc.stdout)
    assert sorted(resumed) == list(range(11, 21)), proc.stdout[-3000:]
    for it in range(11, 21):
        for key in ("loss", "lr", "consumed"):
            assert resumed[it][key] == rows[it][key], (it, key, resumed[it], rows[it])


def test_corrupt_tracker_is_an_error(golden_run, data_path, vocab_dir, tmp_path):
    _, save, _ = golden_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(save, ckpt)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    tracker.write_text("5O\x00")
    proc = run_pretrain(tiny_gpt_args(data_path, vocab_dir, 60) + ["--load", str(ckpt)],
                        check=False)
    assert proc.returncode != 0
    assert f"corrupt checkpoint tracker {tracker}" in proc.stdout + proc.stderr
    assert "iteration        1/" not in proc.stdout


def test_changed_hidden_size_is_an_error(golden_run, data_path, vocab_dir):
    _, save, _ = golden_run
    args = tiny_gpt_args(data_path, vocab_dir, 60) + ["--load", save]
    args[args.index("--hidden-size") + 1] = "96"
    args[args.index("--num-attention-heads") + 1] = "4"
    proc = run_pretrain(args, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "--hidden-size: checkpoint has 64, this run has 96" in out, out[-3000:]


KILL_MIDWAY = r"""
import os, runpy, sys, torch
import megatron.checkpointing as ckpt
_save = torch.save
calls = {"n": 0}
def dying_save(obj, f, *a, **k):
    calls["n"] += 1
    if calls["n"] == 2:          # the second checkpoint: write half of it, then die
        import io
        buf = io.BytesIO(); _save(obj, buf, *a, **k)
        data = buf.getvalue(); f.write(data[: len(data) // 2]); f.flush()
        os._exit(9)
    return _save(obj, f, *a, **k)
ckpt.torch.save = dying_save
sys.argv = ["pretrain_gpt.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["MEGATRON_ROOT"], "pretrain_gpt.py"), run_name="__main__")
"""


def test_save_killed_midway_keeps_previous_checkpoint(data_path, vocab_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    args = tiny_gpt_args(data_path, vocab_dir, 20) + ["--save", save, "--save-interval", "5",
                                                      "--eval-iters", "0"]
    proc = run_pretrain(args, check=False, extra_env={"MEGATRON_ROOT": ROOT},
                        script=[sys.executable, "-c", KILL_MIDWAY])
    assert proc.returncode == 9, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "5"
    assert not os.path.exists(os.path.join(save, "iter_0000010", "mp_rank_00",
                                           "model_optim_rng.pt"))
    # the previous checkpoint loads and training continues from it
    proc = run_pretrain(tiny_gpt_args(data_path, vocab_dir, 8) + ["--load", save,
                                                                  "--eval-iters", "0"])
    assert sorted(parse_log(proc.stdout)) == [6, 7, 8]


def test_nan_loss_stops_naming_the_iteration(data_path, vocab_dir, tmp_path):
    """A learning rate of 1e30 drives the weights to inf: the log line of that step shows
    the parameter norm and the run stops there, naming the iteration."""
    args = tiny_gpt_args(data_path, vocab_dir, 10) + ["--save", str(tmp_path / "c"),
                                                      "--save-interval", "100"]
    args[args.index("--lr") + 1] = "1e30"
    args[args.index("--clip-grad") + 1] = "0"
    args[args.index("--lr-warmup-iters") + 1] = "0"
    proc = run_pretrain(args, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    rows = parse_log(proc.stdout)
    # the log line of the step that made the weights inf shows it, and the run stops there
    last = max(rows)
    assert f"NonFiniteLossError: iteration {last}: the parameter norm is inf" in out, out[-3000:]
    assert "params norm: inf" in proc.stdout
    assert not os.path.exists(tmp_path / "c" / "latest_checkpointed_iteration.txt")


def test_fp16_overflow_skips_and_backs_off(tmp_path):
    """An initial loss scale of 2^24 overflows fp16 gradients: the iterations are skipped
    and counted and, with --hysteresis 2, the scale halves on every overflow after the
    first, until the gradients fit and training proceeds."""
    data = small_vocab_dataset(str(tmp_path))
    args = tiny_gpt_args(data, "", 20) + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--fp16", "--initial-loss-scale", str(2 ** 24), "--hysteresis", "2",
        "--loss-scale-window", "1000", "--eval-iters", "0"]
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i:i + 2]
    proc = run_pretrain(args)
    rows = parse_log(proc.stdout)
    scales = [rows[i]["scale"] for i in range(1, 21)]
    skipped = [rows[i]["skipped"] for i in range(1, 21)]
    assert 0 in skipped, (scales, skipped)
    first_ok = skipped.index(0)
    assert first_ok >= 2, (scales, skipped)
    assert skipped[:first_ok] == [1] * first_ok
    assert all(rows[i]["loss"] is None for i in range(1, first_ok + 1))
    # overflow 1 spends the hysteresis, then every overflow halves the scale
    assert scales[0] == 2.0 ** 24
    for i in range(1, first_ok):
        assert scales[i] == scales[i - 1] / 2, scales
    assert all(s == 0 for s in skipped[first_ok:])
    assert all(float(rows[i]["loss"]) > 0 for i in range(first_ok + 1, 21))


def test_sigterm_saves_and_exits_zero(data_path, vocab_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    args = tiny_gpt_args(data_path, vocab_dir, 100000) + [
        "--save", save, "--save-interval", "100000", "--exit-signal-handler",
        "--eval-iters", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt.py")] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env)
    lines = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "iteration        3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=240)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        it = int(f.read())
    assert it >= 3
    assert os.path.isfile(os.path.join(save, f"iter_{it:07d}", "mp_rank_00",
                                       "model_optim_rng.pt"))
    assert "exiting on signal" in text


def test_sample_based_run_tensorboard_and_exit_interval(data_path, vocab_dir, tmp_path):
    """--train-samples with sample-based warmup/decay, TensorBoard logs, --exit-interval
    saving before it exits, and a resume that finishes the sample budget."""
    save, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    args = tiny_gpt_args(data_path, vocab_dir, 0)
    i = args.index("--train-iters")
    del args[i:i + 2]
    for flag in ("--lr-decay-iters", "--lr-warmup-iters"):
        i = args.index(flag)
        del args[i:i + 2]
    args += ["--train-samples", "80", "--lr-decay-samples", "80", "--lr-warmup-samples", "16",
             "--save", save, "--load", save, "--eval-iters", "0", "--tensorboard-dir", tb]
    proc = run_pretrain(args + ["--exit-interval", "4"])
    rows = parse_log(proc.stdout)
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["lr"] == "5.000E-04"  # warmup: 8 of 16 samples -> half the peak lr
    assert "exiting program at iteration 4" in proc.stdout
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "4"
    events = [n for n in os.listdir(tb) if n.startswith("events.out.tfevents")]
    assert events, os.listdir(tb)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3, 4]
    assert "learning-rate" in acc.Tags()["scalars"]

    proc = run_pretrain(args)
    rows = parse_log(proc.stdout)
    assert sorted(rows) == list(range(5, 11))
    assert rows[10]["consumed"] == 80
