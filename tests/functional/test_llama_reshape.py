"""End to end: a tiny LLaMA checkpoint moves between parallel layouts.

The model is tests/functional/test_llama_training.py's (RoPE, SwiGLU, RMSNorm, 4 heads /
2 key/value heads, untied output layer, no linear biases, dropout 0, fp32) on a random-
token corpus with the NullTokenizer: 100 ids + eod, padded to 128 rows for TP=1 and
TP=2 alike (--make-vocab-size-divisible-by 64), so every layout trains the same model
and the 27 padding rows (trained logits the softmax sees) travel unchanged.

All runs share one spawned world of 4 gloo ranks (pretrain() once per run, Megatron's
globals reset in between); rank 0 runs the converters between runs:

  megatron     TP=2 x PP=2 trains 4 iterations and saves;
               TP=2 x PP=2 resumes it for iterations 5-7 (--no-load-optim --no-load-rng);
               tools/checkpoint_util.py reshapes it to TP=1 x PP=1;
               TP=1 (DP=4) resumes that for iterations 5-7, same flags.
  deepspeed    ZeRO-1 at TP=2 (DP=2) trains 7 iterations, saving at 4;
               ds_to_universal converts iteration 4 (SwiGLU's dense_h_to_4h joined as two
               sub-parameters, the output layer as a vocabulary parameter);
               ZeRO-1 at TP=1 (DP=4) resumes it with --universal-checkpoint for 5-7.

A layout change only reorders floating-point sums, so the resumed losses equal the TP=2
ones within the tolerances of the GPT tests: 2e-5 relative for the Megatron layouts
(test_distributed_gpt.py), 1e-5 for the universal checkpoint (test_deepspeed_gpt.py). A
SwiGLU gate/up split or a GQA group cut wrongly would change the loss by far more. The
universal resume is at TP=1, so a wrong join in ds_to_universal is not undone by the
same mistake when the weights are split again.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..dist_utils import run_distributed
from .gpt_runs import ROOT, parse_log, pretrain_in_process, small_vocab_dataset, tiny_gpt_args
from .test_llama_training import LLAMA_FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAVED, ITERS = 4, 7
MEGATRON_TOL, UNIVERSAL_TOL = 2e-5, 1e-5


def _flags(data_path: str, tp: int, pp: int, iters: int, extra: list[str]) -> list[str]:
    args = tiny_gpt_args(data_path, "", iters)
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i : i + 2]
    args[args.index("--micro-batch-size") + 1] = "2"  # DP=4 x 2 = the global batch 8
    args[args.index("--num-layers") + 1] = "4"
    return args + LLAMA_FLAGS + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
        "--make-vocab-size-divisible-by", "64",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
    ] + extra  # fmt: skip


def _tool(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable] + argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, f"{argv[:3]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _reshape(save: str, dst: str) -> None:
    _tool(["tools/checkpoint_util.py", "--load-dir", save, "--save-dir", dst,
           "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1"])  # fmt: skip


def _to_universal(save: str, dst: str) -> None:
    os.makedirs(dst)
    _tool(["-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", os.path.join(save, f"global_step{SAVED}"),
           "--output_folder", os.path.join(dst, f"global_step{SAVED}"),
           "--num_extract_workers", "1", "--num_merge_workers", "1"])  # fmt: skip
    with open(os.path.join(dst, "latest_universal"), "w") as f:
        f.write(f"global_step{SAVED}")


def _plan(tmp: str, data: str) -> list:
    """(name, flags, rank 0's step before the run) in order."""
    ckpt, tp1 = os.path.join(tmp, "tp2pp2"), os.path.join(tmp, "tp1")
    ds, universal = os.path.join(tmp, "ds_tp2"), os.path.join(tmp, "universal")
    weights_only = ["--no-load-optim", "--no-load-rng"]
    zero1 = ["--deepspeed", "--zero-stage", "1"]
    return [
        ("save", _flags(data, 2, 2, SAVED, ["--save", ckpt]), None),
        ("tp2pp2", _flags(data, 2, 2, ITERS, ["--load", ckpt] + weights_only), None),
        ("tp1", _flags(data, 1, 1, ITERS, ["--load", tp1] + weights_only), (_reshape, ckpt, tp1)),
        ("ds_tp2", _flags(data, 2, 1, ITERS, zero1 + ["--save", ds, "--save-interval", "4"]), None),
        (
            "ds_tp1",
            _flags(data, 1, 1, ITERS, zero1 + ["--load", universal, "--universal-checkpoint"]),
            (_to_universal, ds, universal),
        ),
    ]


def _world(rank, world_size, tmp, data):
    import torch

    logs = {}
    for name, flags, step in _plan(tmp, data):
        if step is not None and rank == 0:
            step[0](*step[1:])
        torch.distributed.barrier()
        logs[name] = pretrain_in_process(flags, "NullTokenizer")
        torch.distributed.barrier()
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("llama_reshape"))
    data = small_vocab_dataset(tmp, vocab_size=100)
    logs = run_distributed(_world, 4, args=(tmp, data), timeout=600)
    # log lines come from the last rank, checkpoint messages from rank 0
    return {"tmp": tmp, "logs": logs[-1], "logs0": logs[0]}


def _losses(stdout: str, first: int, last: int = ITERS) -> list[float]:
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(first, last + 1)), stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(first, last + 1)]


def _assert_close(got: list[float], want: list[float], rel: float) -> None:
    for i, (a, b) in enumerate(zip(got, want), start=SAVED + 1):
        assert abs(a - b) <= rel * abs(b), f"iteration {i}: {a} vs {b} (rel tol {rel})"


def test_reshaped_to_tp1_resumes_like_tp2_pp2(runs):
    """checkpoint_util.py TP=2 x PP=2 -> TP=1 x PP=1: one rank file holding the untied
    output layer and no head copy; resumed at TP=1 it gives the TP=2 x PP=2 resume's
    losses for iterations 5-7, and both start where training left off."""
    import torch

    logs = runs["logs"]
    want = _losses(logs["tp2pp2"], SAVED + 1)
    _assert_close(_losses(logs["tp1"], SAVED + 1), want, MEGATRON_TOL)
    for name, load in (("tp2pp2", "tp2pp2"), ("tp1", "tp1")):
        folder = os.path.join(runs["tmp"], load)
        assert (
            f"successfully loaded checkpoint from {folder} at iteration {SAVED}"
            in (runs["logs0"][name])
        )
    folder = os.path.join(runs["tmp"], "tp1", f"iter_{SAVED:07d}")
    assert os.listdir(folder) == ["mp_rank_00"]
    state = torch.load(os.path.join(folder, "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert (state["args"].tensor_model_parallel_size, state["args"].swiglu) == (1, True)
    model = state["model"]
    assert sorted(model) == ["language_model"]
    assert sorted(model["language_model"]) == ["embedding", "output_layer", "transformer"]
    assert model["language_model"]["output_layer"]["weight"].shape == (128, 64)
    qkv = model["language_model"]["transformer"]["layers.3.self_attention.query_key_value.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)


def test_universal_checkpoint_from_tp2_resumes_at_tp1(runs):
    """ZeRO-1 at TP=2 -> ds_to_universal -> ZeRO-1 at TP=1 with --universal-checkpoint:
    iterations 5-7 repeat the TP=2 run's (optimizer state included)."""
    logs = runs["logs"]
    want = _losses(logs["ds_tp2"], 1)[SAVED:]
    _assert_close(_losses(logs["ds_tp1"], SAVED + 1), want, UNIVERSAL_TOL)
    folder = os.path.join(runs["tmp"], "universal")
    assert (
        f"successfully loaded checkpoint from {folder} at iteration {SAVED}"
        in (runs["logs0"]["ds_tp1"])
    )
    zero = os.path.join(runs["tmp"], "universal", f"global_step{SAVED}", "zero")
    names = os.listdir(zero)
    assert "language_model.output_layer.weight" in names
    assert "language_model.transformer.layers.0.mlp.dense_h_to_4h.weight" in names
