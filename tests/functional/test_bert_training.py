"""End-to-end BERT: tools/preprocess_data.py --split-sentences with the uncased WordPiece
vocabulary, then pretrain_bert.py on a tiny BERT (CPU, fp32, dropout 0, one thread).

The run logs 'lm loss' and 'sop loss', learns, resumes from its iteration-10
checkpoint to the same per-iteration losses, and trains to the same losses with
tensor parallelism 2 on two gloo ranks (the padded vocabulary is kept at 30592 for both
layouts with --make-vocab-size-divisible-by 128 / TP).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from .gpt_runs import CORPUS, ROOT, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERS = 20
TP_ITERS = 5
REL_TOL = 2e-5
BERT_RE = re.compile(
    r" iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \|.*?learning rate: (\S+) \|"
    r" global batch size:\s+\d+ \| lm loss: (\S+) \| sop loss: (\S+) \|"
)
VALID_RE = re.compile(
    r" validation loss at iteration 20 \| lm loss value: (\S+) \|.*?sop loss value"
)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, vocab_dir):
    """The small corpus, one sentence per item (Punkt trained on the input when NLTK's
    English model is not installed)."""
    out = tmp_path_factory.mktemp("bert_data")
    prefix = str(out / "my-bert")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
         "--input", CORPUS, "--output-prefix", prefix,
         "--vocab-file", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
         "--dataset-impl", "mmap", "--tokenizer-type", "BertWordPieceLowerCase",
         "--split-sentences"],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "NLTK_DATA": str(out / "no_nltk_data")},
    )  # fmt: skip
    return prefix + "_text_sentence"


def tiny_bert_args(data_path: str, vocab_dir: str, tp: int = 1) -> list[str]:
    """The Megatron BERT command for a 2-layer, hidden-64 BERT on 64-token samples."""
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--micro-batch-size", "4", "--global-batch-size", "8",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--train-iters", str(ITERS),
        "--data-path", data_path,
        "--vocab-file", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
        "--data-impl", "mmap", "--split", "949,50,1",
        "--lr", "0.002", "--min-lr", "0.0001", "--lr-decay-style", "linear",
        "--lr-decay-iters", str(ITERS), "--weight-decay", "1e-2", "--clip-grad", "1.0",
        "--lr-warmup-fraction", ".01",
        "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "1",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
        "--num-workers", "0",
        "--tensor-model-parallel-size", str(tp),
        "--make-vocab-size-divisible-by", str(128 // tp),
    ]  # fmt: skip


def run_bert(args: list[str], nproc: int = 1, timeout: float = 240) -> str:
    """pretrain_bert.py as a user runs it (torchrun for several ranks); returns stdout.
    The run is a new session, killed whole on timeout."""
    return launch(nproc, args, script="pretrain_bert.py", timeout=timeout)


def parse_bert_log(stdout: str) -> dict[int, dict]:
    """{iteration: {'consumed', 'lr', 'lm', 'sop'}} (loss values as printed)."""
    return {
        int(m.group(1)): {"consumed": m.group(2), "lr": m.group(3), "lm": m.group(4),
                          "sop": m.group(5)}
        for m in BERT_RE.finditer(stdout)
    }  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_path, vocab_dir):
    """20 iterations, saving at 10 and 20."""
    save = str(tmp_path_factory.mktemp("bert_ckpt"))
    out = run_bert(tiny_bert_args(data_path, vocab_dir) + ["--save", save, "--save-interval", "10"])
    return parse_bert_log(out), save, out


@pytest.mark.real_vocab
def test_trains_and_logs_lm_and_sop_loss(full_run):
    rows, save, out = full_run
    assert sorted(rows) == list(range(1, ITERS + 1)), out[-3000:]
    lm = [float(rows[i]["lm"]) for i in range(1, ITERS + 1)]
    sop = [float(rows[i]["sop"]) for i in range(1, ITERS + 1)]
    # a fresh model predicts ~uniformly over the 30522 WordPieces and the 2 orders
    assert 9.5 < lm[0] < 11.0 and 0.5 < sop[0] < 0.9, (lm[0], sop[0])
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 0.5, lm
    assert all(0.0 < s < 1.5 for s in sop), sop
    assert VALID_RE.search(out), out[-3000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    for it in (10, 20):
        path = os.path.join(save, f"iter_{it:07d}", "mp_rank_00", "model_optim_rng.pt")
        assert os.path.isfile(path)


@pytest.mark.real_vocab
def test_checkpoint_holds_bert_keys(full_run):
    import torch

    _, save, _ = full_run
    path = os.path.join(save, "iter_0000010", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = state["model"]
    assert set(model) == {"language_model", "lm_head", "binary_head"}
    assert set(model["language_model"]) == {"embedding", "transformer", "pooler"}
    assert model["lm_head"]["bias"].shape == (30592,)
    assert model["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (30592, 64)
    assert model["binary_head"]["weight"].shape == (2, 64)


def test_resume_is_exact(full_run, data_path, vocab_dir, tmp_path):
    """Resuming at iteration 10 gives iterations 11-20 the uninterrupted run's losses."""
    rows, save, _ = full_run
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(os.path.join(save, "iter_0000010"), ckpt / "iter_0000010")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    out = run_bert(tiny_bert_args(data_path, vocab_dir) + ["--load", str(ckpt)])
    resumed = parse_bert_log(out)
    assert sorted(resumed) == list(range(11, ITERS + 1)), out[-3000:]
    for it in range(11, ITERS + 1):
        assert resumed[it] == rows[it], (it, resumed[it], rows[it])


def test_tensor_parallel_2_equals_serial(full_run, data_path, vocab_dir):
    """TP=2 on two gloo ranks: the lm head's vocabulary-split logits, bias and cross
    entropy and the split attention/MLP give the TP=1 losses to fp32 rounding."""
    rows, _, _ = full_run
    args = tiny_bert_args(data_path, vocab_dir, tp=2) + ["--exit-interval", str(TP_ITERS)]
    _assert_first_iterations_match(run_bert(args, nproc=2), rows)


def _assert_first_iterations_match(out: str, rows: dict, rel_tol: float = REL_TOL) -> None:
    other = parse_bert_log(out)
    assert sorted(other) == list(range(1, TP_ITERS + 1)), out[-3000:]
    for it in range(1, TP_ITERS + 1):
        assert other[it]["lr"] == rows[it]["lr"], (it, other[it], rows[it])
        for key in ("lm", "sop"):
            a, b = float(other[it][key]), float(rows[it][key])
            assert abs(a - b) <= rel_tol * abs(b), (it, key, a, b)


def test_pipeline_parallel_2_equals_serial(full_run, data_path, vocab_dir):
    """PP=2 (one layer per stage; the last stage holds the head and its copy of the
    tied embeddings) under Megatron's 1F1B schedule gives the PP=1 losses."""
    rows, _, _ = full_run
    args = tiny_bert_args(data_path, vocab_dir) + [
        "--pipeline-model-parallel-size", "2", "--exit-interval", str(TP_ITERS)]  # fmt: skip
    _assert_first_iterations_match(run_bert(args, nproc=2), rows)


def test_deepspeed_zero1_equals_megatron(full_run, data_path, vocab_dir):
    """--deepspeed (ZeRO stage 1, the engine's own optimizer step and clipping) trains
    the same BertModel to Megatron's losses."""
    rows, _, _ = full_run
    args = tiny_bert_args(data_path, vocab_dir) + [
        "--deepspeed", "--zero-stage", "1", "--exit-interval", str(TP_ITERS)]  # fmt: skip
    _assert_first_iterations_match(run_bert(args), rows, rel_tol=1e-5)


def test_sequence_parallel_equals_serial(full_run, data_path, vocab_dir):
    """TP=2 with --sequence-parallel (the pooler gathers the sequence back first) and with
    --tp-comm-overlap gives the TP=1 losses."""
    rows, _, _ = full_run
    args = tiny_bert_args(data_path, vocab_dir, tp=2) + [
        "--sequence-parallel", "--tp-comm-overlap", "--exit-interval", str(TP_ITERS)]  # fmt: skip
    _assert_first_iterations_match(run_bert(args, nproc=2), rows)
