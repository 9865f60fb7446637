"""A run that cannot go on stops at once, non-zero, with one line a user can act on:
an fp16 divergence, a DeepSpeed config that contradicts the flags, a stalled rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..dist_utils import free_port
from .gpt_runs import ROOT, parse_log, run_pretrain, small_vocab_dataset, tiny_gpt_args

pytestmark = pytest.mark.slow


def _null_tokenizer_args(data: str, iters: int) -> list[str]:
    args = tiny_gpt_args(data, "", iters) + ["--tokenizer-type", "NullTokenizer",
                                             "--vocab-size", "128"]
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_diverging_fp16_run_stops_and_writes_no_checkpoint(tmp_path):
    """--lr 1e6 in fp16: the weights overflow to inf within two steps; the run stops with
    NonFiniteLossError (exit 1) instead of skipping every later iteration and saving inf
    weights every --save-interval."""
    data = small_vocab_dataset(str(tmp_path))
    save = tmp_path / "ckpt"
    args = _null_tokenizer_args(data, 40) + [
        "--lr", "1e6", "--min-lr", "0", "--fp16", "--initial-loss-scale", "1024",
        "--save", str(save), "--save-interval", "10", "--log-interval", "10"]
    proc = run_pretrain(args, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert "NonFiniteLossError: iteration 3: the weights are no longer finite" in line, line
    assert "Traceback" not in proc.stderr
    assert not save.exists() or not any(save.iterdir())


def test_deepspeed_optimizer_block_contradicting_lr_is_refused(tmp_path):
    data = small_vocab_dataset(str(tmp_path))
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": 4, "optimizer": '
                      '{"type": "AdamW", "params": {"lr": 0.5}}}')
    args = _null_tokenizer_args(data, 4) + [
        "--deepspeed", "--deepspeed_config", str(config), "--no-pipeline-parallel"]
    proc = run_pretrain(args, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc.stderr).endswith(
        f"DeepSpeedConfigError: --lr 0.001 contradicts optimizer.params.lr 0.5 in {config}")
    assert "number of parameters" not in proc.stdout  # refused before the model is built


_STALL = """
import os, runpy, sys, time
sys.argv[0] = {script!r}
sys.path.insert(0, {root!r})
import megatron.training as training

_update = training.update_num_microbatches
def update(consumed, *args, **kwargs):
    # rank 1 stalls before its second iteration (a slow file system, a stuck reader)
    if os.environ["RANK"] == "1" and training.get_args().iteration == 1:
        time.sleep(120)
    return _update(consumed, *args, **kwargs)
training.update_num_microbatches = update
runpy.run_path({script!r}, run_name="__main__")
"""


def test_stalled_rank_is_named_when_the_collective_times_out(tmp_path):
    data = small_vocab_dataset(str(tmp_path))
    wrapper = tmp_path / "stall.py"
    wrapper.write_text(_STALL.format(script=os.path.join(ROOT, "pretrain_gpt.py"), root=ROOT))
    args = _null_tokenizer_args(data, 6) + ["--eval-iters", "0",
                                            "--distributed-timeout-minutes", "0.25"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(wrapper)]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=110, cwd=ROOT,
                          env=env)
    assert proc.returncode != 0
    rows = parse_log(proc.stdout)
    assert sorted(rows) == [1], proc.stdout[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "DistributedTimeoutError" in ln]
    assert lines, proc.stderr[-4000:]
    assert ("rank 0: a collective in 'iteration 2: train step' timed out after "
            "--distributed-timeout-minutes 0.25; did not answer: rank 1 (still at "
            "'iteration 1: train step')") in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing prefix", "empty train split", "zero blend weight"])
def test_data_errors_stop_before_the_model_is_built(tmp_path, case):
    data = small_vocab_dataset(str(tmp_path))
    args = _null_tokenizer_args(data, 4)
    i = args.index("--data-path")
    expected = {
        "missing prefix": f"DataPathError: --data-path: {data}_typo.idx and {data}_typo.bin "
                          "not found",
        "empty train split": "DataPathError: no training documents: --split 0,50,50 gives "
                             f"the train split 0 of 64 documents of {data}",
        "zero blend weight": f"DataPathError: --data-path: weight '0' of {data}",
    }[case]
    if case == "missing prefix":
        args[i + 1] = data + "_typo"
    elif case == "empty train split":
        args[args.index("--split") + 1] = "0,50,50"
    else:
        args[i + 1:i + 2] = ["0.5", data, "0", data]
    proc = run_pretrain(args, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expected in _last_line(proc.stderr), proc.stderr[-2000:]
    assert "number of parameters" not in proc.stdout
