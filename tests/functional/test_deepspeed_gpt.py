"""pretrain_gpt.py --deepspeed on CPU (gloo, fp32) with a tiny GPT, against Megatron's own
path on the same seed.

All two-rank runs share one spawned world (importing torch and DeepSpeed costs more than
the runs): pretrain() is called once per configuration with the Megatron globals reset in
between. Dropout is 0 so that runs with different parallel layouts (data-parallel 2 vs
pipeline 2) see the same numbers. Runs: Megatron DP=2 (the reference), ZeRO-1 (saving
DeepSpeed checkpoints), ZeRO-2 (flags given through a ds_config JSON), ZeRO-3, the
DeepSpeed pipeline (PP=2), MoE (2 experts, expert-parallel 2) with the sequence-length
curriculum, its resume from iteration 5, and Megatron loading the converted ZeRO-1
checkpoint. Tolerance: printed losses (7 significant digits) within a relative 2e-6 for
ZeRO-1/2 and the pipeline (measured: identical, or 1 in the last digit).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from ..dist_utils import run_distributed
from .gpt_runs import ROOT, parse_log, preprocess, pretrain_in_process, run_pretrain

pytestmark = pytest.mark.slow

ITERS = 10
REL_TOL = 2e-6
VALID_RE = re.compile(
    r"validation loss at the end of training for val data \| lm loss value: "
    r"([0-9.E+-]+)"
)
EXTRA_RE = re.compile(
    r"iteration\s+(\d+)/.*?\| moe loss: ([0-9.E+-]+) \| "
    r"curriculum seqlen: (\d+) \|"
)
CURRICULUM = {
    "enabled": True,
    "curriculum_type": "seqlen",
    "min_difficulty": 8,
    "max_difficulty": 32,
    "schedule_type": "fixed_linear",
    "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 8},
}


def _common(data_path: str, vocab_dir: str) -> list[str]:
    return [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--max-position-embeddings",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--lr",
        "0.001",
        "--min-lr",
        "0.0001",
        "--lr-decay-style",
        "cosine",
        "--lr-decay-iters",
        "50",
        "--lr-warmup-iters",
        "5",
        "--train-iters",
        str(ITERS),
        "--weight-decay",
        "0.01",
        "--clip-grad",
        "1.0",
        "--seed",
        "1234",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--vocab-file",
        os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file",
        os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--data-path",
        data_path,
        "--split",
        "949,50,1",
        "--log-interval",
        "1",
        "--eval-interval",
        "1000",
        "--eval-iters",
        "1",
        "--num-workers",
        "0",
    ]


def _run_configs(tmp: str, data_path: str, vocab_dir: str) -> dict:
    """The list of (name, extra flags, step to run before it on rank 0)."""
    ds = ["--deepspeed"]
    zero2_json = os.path.join(tmp, "ds_config_zero2.json")
    moe_json = os.path.join(tmp, "ds_config_moe_cl.json")
    ckpt, moe_ckpt = os.path.join(tmp, "ds_zero1"), os.path.join(tmp, "ds_moe")
    moe = ds + [
        "--deepspeed_config",
        moe_json,
        "--curriculum-learning",
        "--zero-stage",
        "1",
        "--num-experts",
        "2",
        "--moe-expert-parallel-size",
        "2",
    ]
    return {
        "files": {
            zero2_json: {
                "train_micro_batch_size_per_gpu": 2,
                "train_batch_size": 8,
                "gradient_accumulation_steps": 2,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 2, "contiguous_gradients": True},
                "fp16": {"enabled": False},
            },
            moe_json: {"train_micro_batch_size_per_gpu": 2, "curriculum_learning": CURRICULUM},
        },
        "runs": [
            ("megatron", [], None),
            ("zero1", ds + ["--zero-stage", "1", "--save", ckpt, "--save-interval", "5"], None),
            ("zero2", ds + ["--deepspeed_config", zero2_json], None),
            ("zero3", ds + ["--zero-stage", "3"], None),
            ("pipe", ds + ["--zero-stage", "1", "--pipeline-model-parallel-size", "2"], None),
            ("moe", moe + ["--save", moe_ckpt, "--save-interval", "5"], None),
            (
                "moe_resume",
                moe + ["--load", os.path.join(tmp, "ds_moe_5")],
                ("keep_step5", moe_ckpt, os.path.join(tmp, "ds_moe_5")),
            ),
            (
                "converted",
                ["--load", os.path.join(tmp, "converted"), "--no-load-optim", "--no-load-rng"],
                ("convert", os.path.join(ckpt, "global_step10"), os.path.join(tmp, "converted")),
            ),
        ],
    }


def _prepare(step) -> None:
    """Rank 0's file work between two runs."""
    kind, src, dst = step
    if kind == "keep_step5":  # a save folder holding only iteration 5
        os.makedirs(dst, exist_ok=True)
        shutil.copytree(os.path.join(src, "global_step5"), os.path.join(dst, "global_step5"))
        for name, text in (("latest", "global_step5"), ("latest_checkpointed_iteration.txt", "5")):
            with open(os.path.join(dst, name), "w") as f:
                f.write(text)
    elif kind == "convert":
        sys.path.insert(0, ROOT)
        from tools.convert_checkpoint.deepspeed_to_megatron import convert

        convert(src, dst, target_tp=1, target_pp=1)


def _world(rank, world_size, tmp, data_path, vocab_dir):
    """Every two-rank run in one world; returns {name: last rank's stdout}."""
    import torch

    plan = _run_configs(tmp, data_path, vocab_dir)
    if rank == 0:
        for path, config in plan["files"].items():
            with open(path, "w") as f:
                json.dump(config, f)
    logs = {}
    for name, extra, step in plan["runs"]:
        if step is not None and rank == 0:
            _prepare(step)
        logs[name] = pretrain_in_process(_common(data_path, vocab_dir) + extra, "GPT2BPETokenizer")
        torch.distributed.barrier()
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, vocab_dir):
    tmp = str(tmp_path_factory.mktemp("ds"))
    data_path = preprocess(tmp, vocab_dir)
    logs = run_distributed(_world, 2, args=(tmp, data_path, vocab_dir), timeout=420)
    # log lines come from the last rank, checkpoint messages from rank 0
    return {"tmp": tmp, "data_path": data_path, "logs": logs[1], "logs0": logs[0]}


def _losses(stdout: str) -> list[float]:
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(1, ITERS + 1)), stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(1, ITERS + 1)]


def _assert_close(got, want, rel=REL_TOL):
    for i, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= rel * abs(b), f"iteration {i}: {a} vs {b} (rel tol {rel})"


@pytest.mark.parametrize("name", ["zero1", "zero2", "pipe"])
def test_deepspeed_matches_megatron(runs, name):
    """ZeRO-1, ZeRO-2 and DeepSpeed's pipeline engine (PP=2, GPTModelPipe) give
    Megatron's DP=2 losses, learning rates and validation loss."""
    logs = runs["logs"]
    _assert_close(_losses(logs[name]), _losses(logs["megatron"]))
    ours, ref = parse_log(logs[name]), parse_log(logs["megatron"])
    assert [ours[i]["lr"] for i in ours] == [ref[i]["lr"] for i in ref]
    _assert_close(
        [float(VALID_RE.search(logs[name]).group(1))],
        [float(VALID_RE.search(logs["megatron"]).group(1))],
    )


def test_zero3_matches_megatron(runs):
    logs = runs["logs"]
    _assert_close(_losses(logs["zero3"]), _losses(logs["megatron"]), rel=1e-5)


def test_zero3_trains(runs):
    """ZeRO-3 (parameters partitioned by deepspeed.zero.Init) trains: the loss falls."""
    losses = _losses(runs["logs"]["zero3"])
    assert losses[-1] < losses[0]


def test_deepspeed_checkpoint_layout(runs):
    ckpt = os.path.join(runs["tmp"], "ds_zero1")
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "global_step10"
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "10"
    for step in (5, 10):
        names = set(os.listdir(os.path.join(ckpt, f"global_step{step}")))
        assert {
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        } <= names


def test_moe_aux_loss_and_curriculum(runs):
    """2 experts on 2 expert-parallel ranks: the aux loss has its own column (about
    coeff 0.1 x 1 for balanced routing); the sequence length follows fixed_linear from 8
    to 32 over 6 steps in multiples of 8."""
    stdout = runs["logs"]["moe"]
    rows = {
        int(m.group(1)): (float(m.group(2)), int(m.group(3))) for m in EXTRA_RE.finditer(stdout)
    }
    assert sorted(rows) == list(range(1, ITERS + 1)), stdout[-3000:]
    for moe_loss, _ in rows.values():
        assert 0.09 < moe_loss < 0.2
    assert [rows[i][1] for i in range(1, ITERS + 1)] == [8, 16, 16, 24, 24, 32, 32, 32, 32, 32]
    losses = _losses(stdout)
    assert losses[-1] < losses[0]
    names = os.listdir(os.path.join(runs["tmp"], "ds_moe", "global_step5"))
    assert {
        "layer_0_expert_0_mp_rank_00_model_states.pt",
        "layer_0_expert_1_mp_rank_00_model_states.pt",
    } <= set(names)


def test_moe_resume_is_exact(runs):
    """Resumed at iteration 5, iterations 6-10 repeat the uninterrupted run exactly:
    loss, aux loss, learning rate, consumed samples and curriculum length."""
    full, resumed = runs["logs"]["moe"], runs["logs"]["moe_resume"]
    want, got = parse_log(full), parse_log(resumed)
    assert sorted(got) == list(range(6, ITERS + 1)), resumed[-3000:]
    for i in got:
        assert got[i] == want[i], i
    extra = {int(m.group(1)): m.groups()[1:] for m in EXTRA_RE.finditer(full)}
    extra_resumed = {int(m.group(1)): m.groups()[1:] for m in EXTRA_RE.finditer(resumed)}
    assert extra_resumed == {i: extra[i] for i in range(6, ITERS + 1)}


def test_converted_checkpoint_loads_in_megatron(runs):
    """deepspeed_to_megatron.py output loads in pretrain_gpt.py without --deepspeed and
    gives the DeepSpeed run's validation loss at iteration 10."""
    stdout = runs["logs"]["converted"]
    assert "successfully loaded checkpoint" in runs["logs0"]["converted"]
    got = float(VALID_RE.search(stdout).group(1))
    want = float(VALID_RE.search(runs["logs"]["zero1"]).group(1))
    _assert_close([got], [want])
    folder = os.path.join(runs["tmp"], "converted")
    assert os.path.isfile(os.path.join(folder, "iter_0000010", "mp_rank_00", "model_optim_rng.pt"))


def test_convert_to_pipeline_layout(runs, tmp_path):
    """--target_pp 2 splits the layers: one file per stage, the last with the head copy."""
    import torch

    sys.path.insert(0, ROOT)
    from tools.convert_checkpoint.deepspeed_to_megatron import convert

    convert(os.path.join(runs["tmp"], "ds_zero1"), str(tmp_path), target_tp=1, target_pp=2)
    first = torch.load(
        tmp_path / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False
    )["model"]
    last = torch.load(
        tmp_path / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False
    )["model"]
    assert "embedding" in first["language_model"]
    assert set(first["language_model"]["transformer"]) == {
        k for k in first["language_model"]["transformer"] if k.startswith("layers.0.")
    }
    assert "final_layernorm.weight" in last["language_model"]["transformer"]
    assert torch.equal(
        last["word_embeddings_for_head"]["weight"],
        first["language_model"]["embedding"]["word_embeddings"]["weight"],
    )


def test_universal_checkpoint_resumes_at_another_dp_size(runs, vocab_dir, tmp_path):
    """ZeRO-1 at DP=2, iteration 5 -> ds_to_universal -> one rank (DP=1) with
    --universal-checkpoint: iterations 6-10 match the DP=2 run."""
    src = os.path.join(runs["tmp"], "ds_zero1", "global_step5")
    load = tmp_path / "universal"
    load.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            src,
            "--output_folder",
            str(load / "global_step5"),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    (load / "latest_universal").write_text("global_step5")
    proc = run_pretrain(
        _common(runs["data_path"], vocab_dir)
        + ["--deepspeed", "--zero-stage", "1", "--load", str(load), "--universal-checkpoint"],
        timeout=180,
    )
    got = parse_log(proc.stdout)
    assert sorted(got) == list(range(6, ITERS + 1)), proc.stdout[-3000:]
    want = _losses(runs["logs"]["zero1"])[5:]
    _assert_close([float(got[i]["loss"]) for i in range(6, ITERS + 1)], want, rel=1e-5)
