"""pretrain_t5.py run as a user runs it: the small corpus preprocessed with
--split-sentences and the BERT uncased vocabulary, then a tiny T5 (2+2 layers, h 64,
encoder 64 / decoder 32 tokens, --vocab-extra-ids 100) trained for 20 iterations.

Checks: the loss falls; resuming from the iteration-10 checkpoint gives iterations
11-20 identical to the uninterrupted run; the checkpoint holds Megatron's T5 keys; and
the same run on two CPU ranks at --tensor-model-parallel-size 2 gives the TP=1 losses
(to fp32 rounding of the 7 printed digits). Dropout is 0 so TP layouts train the same
function.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from .gpt_runs import CORPUS, ROOT, launch, parse_log, rel_close, run_pretrain

ITERS = 20
TP_ITERS = 5
REL_TOL = 2e-5
SCRIPT = [sys.executable, os.path.join(ROOT, "pretrain_t5.py")]


def preprocess_t5(tmp_dir: str, vocab_dir: str) -> str:
    """Sentence-split the small corpus with BertWordPieceLowerCase; return the prefix.
    NLTK_DATA points at an empty folder so every machine uses the same offline fallback
    (Punkt trained on the input) whatever nltk data it has installed."""
    prefix = os.path.join(tmp_dir, "my-t5")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
         "--input", CORPUS, "--output-prefix", prefix,
         "--vocab", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
         "--dataset-impl", "mmap", "--tokenizer-type", "BertWordPieceLowerCase",
         "--split-sentences"],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, NLTK_DATA=os.path.join(tmp_dir, "no_nltk_data")),
    )  # fmt: skip
    return prefix + "_text_sentence"


def tiny_t5_args(data_path: str, vocab_dir: str, train_iters: int = ITERS) -> list[str]:
    """Megatron's T5 example flags, shrunk to a model that trains in ~0.5 s a step."""
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--kv-channels", "16", "--ffn-hidden-size", "256",
        "--encoder-seq-length", "64", "--decoder-seq-length", "32",
        "--max-position-embeddings", "64",
        "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", str(train_iters), "--lr-decay-iters", str(ITERS),
        "--data-path", data_path,
        "--vocab-file", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
        "--data-impl", "mmap", "--split", "949,50,1",
        "--lr", "0.002", "--min-lr", "0.0002", "--lr-decay-style", "linear",
        "--lr-warmup-fraction", ".01", "--weight-decay", "1e-2", "--clip-grad", "1.0",
        "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "1",
        "--vocab-extra-ids", "100", "--seed", "1234", "--num-workers", "0",
        "--hidden-dropout", "0", "--attention-dropout", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, vocab_dir):
    """(data path, log rows, save dir) of the uninterrupted 20-iteration run, saving at 10."""
    tmp = tmp_path_factory.mktemp("t5")
    data_path = preprocess_t5(str(tmp), vocab_dir)
    save = str(tmp / "ckpt")
    proc = run_pretrain(
        tiny_t5_args(data_path, vocab_dir) + ["--save", save, "--save-interval", "10"],
        script=SCRIPT,
    )
    rows = parse_log(proc.stdout)
    assert sorted(rows) == list(range(1, ITERS + 1)), proc.stdout[-3000:]
    return data_path, rows, save


@pytest.mark.real_vocab
def test_loss_falls(t5_run):
    _, rows, _ = t5_run
    losses = [float(rows[it]["loss"]) for it in range(1, ITERS + 1)]
    # a fresh model predicts the ~30.7k-token vocabulary about uniformly: ln(30720) ~ 10.3
    assert 9.8 < losses[0] < 10.8, losses
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert all(rows[it]["skipped"] == 0 and rows[it]["nan"] == 0 for it in rows)


@pytest.mark.real_vocab
def test_checkpoint_has_megatron_t5_keys(t5_run):
    _, _, save = t5_run
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    path = os.path.join(save, "iter_0000010", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = state["model"]
    assert set(model) == {"language_model", "lm_head"}
    assert set(model["language_model"]) == {"embedding", "encoder", "decoder"}
    # BERT's 30522 pieces + [BOS], [EOS] + 100 sentinels, padded to a multiple of 128
    assert model["lm_head"]["bias"].shape == (30720,)
    embedding = model["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert embedding.shape == (30720, 64)
    assert "layers.1.inter_attention.key_value.weight" in model["language_model"]["decoder"]


def test_resume_is_exact(t5_run, vocab_dir, tmp_path):
    data_path, rows, save = t5_run
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(os.path.join(save, "iter_0000010"), ckpt / "iter_0000010")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    proc = run_pretrain(tiny_t5_args(data_path, vocab_dir) + ["--load", str(ckpt)], script=SCRIPT)
    resumed = parse_log(proc.stdout)
    assert sorted(resumed) == list(range(11, ITERS + 1)), proc.stdout[-3000:]
    for it in range(11, ITERS + 1):
        for key in ("loss", "lr", "consumed"):
            assert resumed[it][key] == rows[it][key], (it, key, resumed[it], rows[it])


@pytest.mark.parametrize("extra", [[], ["--sequence-parallel"]], ids=["tp", "sequence-parallel"])
def test_tensor_parallel_2_equals_1(t5_run, vocab_dir, extra):
    """TP=2, and TP=2 with the encoder's and decoder's norms and dropout split along their
    sequences (the cross attention's key/value GEMM gathers the split encoder output),
    give the TP=1 losses."""
    data_path, rows, _ = t5_run
    args = tiny_t5_args(data_path, vocab_dir, TP_ITERS) + [
        "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64",
    ] + extra  # fmt: skip
    stdout = launch(2, args, script="pretrain_t5.py", timeout=240)
    tp_rows = parse_log(stdout)
    assert sorted(tp_rows) == list(range(1, TP_ITERS + 1)), stdout[-3000:]
    for it in range(1, TP_ITERS + 1):
        got, ref = float(tp_rows[it]["loss"]), float(rows[it]["loss"])
        assert rel_close(got, ref, REL_TOL), (it, got, ref)


def test_pipeline_parallel_is_refused(t5_run, vocab_dir):
    data_path, _, _ = t5_run
    args = tiny_t5_args(data_path, vocab_dir, 2) + ["--pipeline-model-parallel-size", "2"]
    proc = run_pretrain(args, timeout=60, check=False, script=SCRIPT, extra_env={"WORLD_SIZE": "2"})
    assert proc.returncode != 0
    assert "--pipeline-model-parallel-size (2) must be 1 for T5" in proc.stdout + proc.stderr
