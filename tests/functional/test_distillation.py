"""pretrain_gpt.py --kd: a smaller student learns from a tiny teacher checkpoint that
pretrain_gpt.py trained first; the KD term (its own log column) falls."""

from __future__ import annotations

import os
import re

import pytest

from .gpt_runs import ROOT, preprocess, run_pretrain, tiny_gpt_args

VOCAB_DIR = os.environ.get("MEGATRON_VOCAB_DIR")
pytestmark = pytest.mark.skipif(
    not VOCAB_DIR or not os.path.isfile(os.path.join(VOCAB_DIR or "", "gpt2-vocab.json")),
    reason="MEGATRON_VOCAB_DIR with the GPT-2 vocabulary is not set",
)

KD_RE = re.compile(r"iteration\s+(\d+)/.*?\| lm loss: ([0-9.E+-]+) \|.*?kd loss: ([0-9.E+-]+) \|")


def _with(args: list[str], **flags) -> list[str]:
    """args with flags (dest-style names) replaced or added."""
    out = list(args)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def test_student_learns_from_teacher_checkpoint(tmp_path):
    data = preprocess(str(tmp_path), VOCAB_DIR)
    teacher_dir = str(tmp_path / "teacher")
    teacher = _with(tiny_gpt_args(data, VOCAB_DIR, train_iters=30), save=teacher_dir,
                    save_interval=30, eval_interval=100, hidden_dropout=0.0,
                    attention_dropout=0.0)
    run_pretrain(teacher)
    assert os.path.isfile(os.path.join(teacher_dir, "latest_checkpointed_iteration.txt"))

    # student: 1 layer of width 32; the teacher is the 2 x 64 model above
    student = _with(tiny_gpt_args(data, VOCAB_DIR, train_iters=30), num_layers=1,
                    hidden_size=32, num_attention_heads=2, eval_interval=100, lr=0.003)
    student += ["--kd", "--load-teacher", teacher_dir, "--num-layers-teacher", "2",
                "--hidden-size-teacher", "64", "--num-attention-heads-teacher", "4",
                "--kd-temp", "2.0", "--kd-beta-ce", "1.0", "--kd-alpha-ce", "0.5"]
    proc = run_pretrain(student)
    out = proc.stdout
    assert "distillation teacher loaded at iteration 30" in out
    rows = {int(i): (float(lm), float(kd)) for i, lm, kd in KD_RE.findall(out)}
    assert sorted(rows) == list(range(1, 31)), out[-3000:]
    kd = [rows[i][1] for i in range(1, 31)]
    assert all(v > 0 for v in kd)
    first, last = sum(kd[:5]) / 5, sum(kd[-5:]) / 5
    assert last < 0.85 * first, kd  # measured: 0.75 x
    # the LM loss of the student falls too; validation runs the student alone
    assert rows[30][0] < rows[1][0]
    assert re.search(r"validation loss at the end of training for val data \| lm loss value: ",
                     out)
    assert "kd loss value" not in out
    assert re.search(r"iteration\s+30/.*number of nan iterations:\s+0 \|", out)

    # a shape that does not match the teacher's checkpoint is an error naming the flag
    bad = _with(student, num_layers_teacher=3, train_iters=1)
    proc = run_pretrain(bad, check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert f"--load-teacher {teacher_dir}: " in err
    assert "--num-layers-teacher: checkpoint has 2, this run has 3" in err


MOS_RE = re.compile(r"iteration\s+(\d+)/.*?\| mos loss: ([0-9.E+-]+) \|.*?moe loss: ([0-9.E+-]+) \|")


def test_mixture_of_students_from_deepspeed_moe_teacher(tmp_path):
    """--mos as examples_deepspeed/MoE/*_MoS.sh: an MoE student under DeepSpeed learns from
    an MoE teacher saved by DeepSpeed (experts in their own files)."""
    data = preprocess(str(tmp_path), VOCAB_DIR)
    ds = ["--deepspeed", "--deepspeed_config",
          os.path.join(ROOT, "examples", "ds_config_gpt_zero1.json"), "--zero-stage", "1",
          "--no-pipeline-parallel", "--expert-interval", "2", "--topk", "1",
          "--disable-moe-token-dropping", "--eval-interval", "100"]
    teacher_dir = str(tmp_path / "teacher")
    run_pretrain(_with(tiny_gpt_args(data, VOCAB_DIR, train_iters=4), save=teacher_dir,
                       save_interval=4) + ds + ["--num-experts", "4"])
    assert any("expert" in name for name in os.listdir(os.path.join(teacher_dir,
                                                                     "global_step4")))
    student = _with(tiny_gpt_args(data, VOCAB_DIR, train_iters=3), hidden_size=32,
                    num_attention_heads=2) + ds
    student += ["--num-experts", "2", "--mos", "--load-teacher", teacher_dir,
                "--num-layers-teacher", "2", "--hidden-size-teacher", "64",
                "--num-attention-heads-teacher", "4", "--num-experts-teacher", "4"]
    out = run_pretrain(student).stdout
    assert "distillation teacher loaded at iteration 4" in out
    rows = {int(i): (float(mos), float(moe)) for i, mos, moe in MOS_RE.findall(out)}
    assert sorted(rows) == [1, 2, 3] and all(mos > 0 for mos, _ in rows.values()), out[-3000:]
    assert "kd loss" not in out and "mos loss value" not in out


def test_tensor_parallel_student_equals_serial(tmp_path):
    """The teacher checkpoint reshaped to TP=2 by tools/checkpoint_util.py: a TP=2 student
    (torchrun, 2 CPU ranks) logs the LM and KD losses of the TP=1 student (rel 1e-5: the
    printed digits and the order of the vocabulary sums)."""
    import subprocess
    import sys

    from .gpt_runs import launch

    data = preprocess(str(tmp_path), VOCAB_DIR)
    tp1, tp2 = str(tmp_path / "teacher"), str(tmp_path / "teacher_tp2")
    # vocabulary padded to 50304 at TP=1 and TP=2 alike
    common = ["--make-vocab-size-divisible-by", "64", "--use-cpu-initialization"]
    run_pretrain(_with(tiny_gpt_args(data, VOCAB_DIR, train_iters=4), save=tp1,
                       save_interval=4, eval_interval=100) + common)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint_util.py"),
                    "--model-type", "GPT", "--load-dir", tp1, "--save-dir", tp2,
                    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size",
                    "1"], check=True, capture_output=True, cwd=ROOT)

    def student(teacher: str, tp: int) -> list[str]:
        return _with(tiny_gpt_args(data, VOCAB_DIR, train_iters=3), num_layers=1,
                     hidden_size=32, num_attention_heads=2, eval_interval=100,
                     hidden_dropout=0.0, attention_dropout=0.0) + common + [
            "--kd", "--load-teacher", teacher, "--num-layers-teacher", "2",
            "--hidden-size-teacher", "64", "--num-attention-heads-teacher", "4",
            "--kd-temp", "2.0", "--tensor-model-parallel-size", str(tp)]

    serial = {int(i): (float(lm), float(kd))
              for i, lm, kd in KD_RE.findall(run_pretrain(student(tp1, 1)).stdout)}
    parallel = {int(i): (float(lm), float(kd))
                for i, lm, kd in KD_RE.findall(launch(2, student(tp2, 2)))}
    assert sorted(serial) == sorted(parallel) == [1, 2, 3]
    for i in serial:
        for a, b in zip(parallel[i], serial[i]):
            assert abs(a - b) <= 1e-5 * abs(b), (i, parallel[i], serial[i])
