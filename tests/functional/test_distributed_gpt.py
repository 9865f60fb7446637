"""Parallel equals serial: pretrain_gpt.py under torchrun / torch.distributed.launch on CPU
gloo ranks gives the single-process per-iteration losses, and checkpoints move between
parallel layouts.

Every run is a tiny GPT (tests/functional/gpt_runs.tiny_gpt_args, with 4 layers so that
PP=2 can hold 2 virtual stages of 1 layer) in fp32 with dropout 0, global batch 8,
10 iterations, one thread per rank. The padded vocabulary is kept at
50304 for every TP (--make-vocab-size-divisible-by 128 / TP), so all layouts train the
same model. Parallelism changes only the order of floating-point reductions (row-parallel
partial sums, data-parallel gradient sums, micro-batch accumulation), so losses agree to
fp32 rounding: the printed 7-digit losses (training, and validation through the
forward-only schedules) must match within REL_TOL relative.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from .gpt_runs import ROOT, launch, parse_log, preprocess, tiny_gpt_args

# several launches per test; each launch has its own RUN_TIMEOUT
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ITERS = 10
REL_TOL = 2e-5
RUN_TIMEOUT = 240  # seconds per launch; a hang is a failure
SEQUENCE_PARALLEL = ["--sequence-parallel"]
VALID_RE = re.compile(r" validation loss at [^|]*\| lm loss value: ([0-9.E+-]+) \|")


def _layout_flags(
    data_path: str,
    vocab_dir: str,
    tp: int = 1,
    pp: int = 1,
    extra: list[str] | None = None,
    iters: int = ITERS,
) -> list[str]:
    args = tiny_gpt_args(data_path, vocab_dir, iters)
    args[args.index("--hidden-dropout") + 1] = "0"
    args[args.index("--attention-dropout") + 1] = "0"
    args[args.index("--eval-interval") + 1] = "10"  # forward-only schedules run too
    args[args.index("--eval-iters") + 1] = "1"
    args[args.index("--num-layers") + 1] = "4"
    args += [
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--make-vocab-size-divisible-by",
        str(128 // tp),
    ]
    return args + (extra or [])


def _launch(
    nproc: int, args: list[str], launcher: str = "torchrun", script: str = "pretrain_gpt.py"
) -> str:
    return launch(nproc, args, launcher=launcher, script=script, timeout=RUN_TIMEOUT)


def _losses(stdout: str, first: int = 1, last: int = ITERS) -> list[float]:
    """Training losses of iterations first..last, then every validation loss printed."""
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(first, last + 1)), stdout[-3000:]
    valid = [float(v) for v in VALID_RE.findall(stdout)]
    assert valid, stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(first, last + 1)] + valid


def _assert_close(name: str, got: list[float], ref: list[float]) -> float:
    """Per-iteration relative difference within REL_TOL; returns the largest one."""
    diffs = [abs(g - r) / abs(r) for g, r in zip(got, ref)]
    print(f"{name}: max relative loss difference {max(diffs):.2e}")
    assert len(got) == len(ref) and max(diffs) <= REL_TOL, (name, got, ref, diffs)
    return max(diffs)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, vocab_dir):
    return preprocess(str(tmp_path_factory.mktemp("data")), vocab_dir)


@pytest.fixture(scope="module")
def serial(data_path, vocab_dir):
    """The single-process reference losses (2 micro-batches of 4)."""
    losses = _losses(_launch(1, _layout_flags(data_path, vocab_dir)))
    assert losses[-1] < losses[0] - 0.3, losses  # it trains
    return losses


@pytest.fixture(scope="module")
def tp2(data_path, vocab_dir):
    return _losses(_launch(2, _layout_flags(data_path, vocab_dir, tp=2)))


def test_tensor_parallel(serial, tp2):
    _assert_close("TP=2", tp2, serial)


def test_pipeline_parallel_1f1b_with_launch(data_path, vocab_dir, serial):
    """PP=2, 4 micro-batches of 2 (warm-up, steady state and cool-down), started by
    torch.distributed.launch, which passes --local-rank."""
    flags = _layout_flags(data_path, vocab_dir, pp=2, extra=["--micro-batch-size", "2"])
    _assert_close("PP=2", _losses(_launch(2, flags, launcher="launch")), serial)


def test_data_parallel_local_ddp(data_path, vocab_dir, serial):
    flags = _layout_flags(data_path, vocab_dir, extra=["--DDP-impl", "local"])
    _assert_close("DP=2 local DDP", _losses(_launch(2, flags)), serial)


def test_interleaved_pipeline(data_path, vocab_dir, serial):
    """PP=2 x 2 virtual stages of 1 layer each; 4 micro-batches (steady state runs)."""
    flags = _layout_flags(
        data_path,
        vocab_dir,
        pp=2,
        extra=["--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "2"],
    )
    _assert_close("PP=2 x 2 virtual stages", _losses(_launch(2, flags)), serial)


@pytest.fixture(scope="module")
def tp2_pp2_run(data_path, vocab_dir, tmp_path_factory):
    """TP=2 x PP=2 with --sequence-parallel (p2p messages [s/tp, b, h]) and
    --tp-comm-overlap, saving at iteration 5: (losses, save dir, stdout)."""
    save = str(tmp_path_factory.mktemp("tp2pp2"))
    flags = _layout_flags(
        data_path,
        vocab_dir,
        tp=2,
        pp=2,
        extra=SEQUENCE_PARALLEL + ["--tp-comm-overlap", "--save", save, "--save-interval", "5"],
    )
    out = _launch(4, flags)
    return _losses(out), save, out


def test_tp2_pp2_sequence_parallel(tp2_pp2_run, serial, tp2):
    """On gloo the --tp-comm-overlap GEMMs run their all-gather / reduce-scatter unfused
    (and say so) and train the same model; plain sequence parallelism end to end is
    tests/functional/test_t5_training.py's."""
    losses, _, out = tp2_pp2_run
    assert "> tp-comm-overlap: no CUDA device; each sequence-parallel GEMM" in out, out[-3000:]
    _assert_close("TP=2 x PP=2 sequence parallel", losses, serial)
    _assert_close("TP=2 x PP=2 sequence parallel vs TP=2", losses, tp2)


def test_tp2_pp2_block_recompute_distributed(data_path, vocab_dir, serial):
    """Megatron's recompute flags at TP=2 x PP=2: on each stage (2 layers) the first layer
    is recomputed from its input, split across the TP ranks, and the second stored."""
    recompute = [
        "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "1", "--distribute-saved-activations",
    ]
    out = _launch(4, _layout_flags(data_path, vocab_dir, tp=2, pp=2, extra=recompute))
    _assert_close("TP=2 x PP=2 block recompute", _losses(out), serial)


def test_tp2_pp2_dp2_torch_ddp_scatter_gather(data_path, vocab_dir, serial):
    """8 ranks, launched by torch.distributed.launch; --DDP-impl torch with 2 micro-batches
    per rank (two forwards before the first backward on stage 0) and
    --scatter-gather-tensors-in-pipeline (each TP rank sends 1/tp of every message)."""
    flags = _layout_flags(
        data_path,
        vocab_dir,
        tp=2,
        pp=2,
        extra=[
            "--DDP-impl",
            "torch",
            "--micro-batch-size",
            "2",
            "--scatter-gather-tensors-in-pipeline",
        ],
    )
    _assert_close("TP=2 x PP=2 x DP=2 torch DDP", _losses(_launch(8, flags, "launch")), serial)


def test_checkpoint_moves_between_layouts(tp2_pp2_run, data_path, vocab_dir, tmp_path):
    """The TP=2 x PP=2 checkpoint of iteration 5, resumed as is, merged to TP=1 by
    merge_mp_partitions.py, and reshaped to TP=1 x PP=2 by checkpoint_util.py, gives the
    same losses for iterations 6-7 (model weights only: --no-load-optim --no-load-rng)."""
    _, save, _ = tp2_pp2_run
    src = tmp_path / "iter5"
    src.mkdir()
    shutil.copytree(os.path.join(save, "iter_0000005"), src / "iter_0000005")
    (src / "latest_checkpointed_iteration.txt").write_text("5")
    assert sorted(n for n in os.listdir(src / "iter_0000005") if n.startswith("mp_rank")) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    resume = ["--no-load-optim", "--no-load-rng"]

    def run(nproc, tp, pp, load, extra=()):
        flags = _layout_flags(
            data_path,
            vocab_dir,
            tp=tp,
            pp=pp,
            iters=7,
            extra=["--load", str(load)] + resume + list(extra),
        )
        return _losses(_launch(nproc, flags), first=6, last=7)

    original = run(4, 2, 2, src, SEQUENCE_PARALLEL)

    merged = tmp_path / "merged"
    vocab = [os.path.join(vocab_dir, "gpt2-vocab.json"), os.path.join(vocab_dir, "gpt2-merges.txt")]
    _tool(
        [
            "tools/merge_mp_partitions.py",
            "--model-type",
            "GPT",
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--target-pipeline-model-parallel-size",
            "1",
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            vocab[0],
            "--merge-file",
            vocab[1],
            "--num-layers",
            "4",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "32",
            "--max-position-embeddings",
            "32",
            "--make-vocab-size-divisible-by",
            "128",
            "--load",
            str(src),
            "--save",
            str(merged),
        ],
        env={"WORLD_SIZE": "2"},
    )
    assert os.listdir(merged / "iter_0000005") == ["mp_rank_00"]
    _assert_close("merged to TP=1", run(1, 1, 1, merged), original)

    reshaped = tmp_path / "tp1pp2"
    _tool(
        [
            "tools/checkpoint_util.py",
            "--model-type",
            "GPT",
            "--load-dir",
            str(src),
            "--save-dir",
            str(reshaped),
            "--target-tensor-parallel-size",
            "1",
            "--target-pipeline-parallel-size",
            "2",
            "--vocab-file",
            vocab[0],
            "--merge-file",
            vocab[1],
        ]
    )
    assert sorted(os.listdir(reshaped / "iter_0000005")) == ["mp_rank_00_000", "mp_rank_00_001"]
    _assert_close("reshaped to TP=1 x PP=2", run(2, 1, 2, reshaped), original)


def _tool(argv: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(
        [sys.executable] + argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=dict(os.environ, **(env or {})),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
