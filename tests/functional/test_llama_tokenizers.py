"""LLaMA-style tokenizers end to end, run as a user runs them.

tools/preprocess_data.py --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model
tokenizer.model --append-eod on the small corpus, then pretrain_gpt.py trains a tiny LLaMA
(RoPE, SwiGLU, RMSNorm) on it; an HFTokenizer tokenizer.json corpus trains too; and
--mock-data trains with the NullTokenizer and no data files. Four subprocesses in all; the
tokenizer model and tokenizer.json are trained here on the corpus.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset

from ..unit.tokenizer.test_gpt_sentencepiece import (
    corpus_texts,
    train_sentencepiece,
    train_tokenizer_json,
)
from .gpt_runs import CORPUS, ROOT, parse_log, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

ITERS = 20
LLAMA_FLAGS = [
    "--use-rotary-position-embeddings", "--swiglu", "--normalization", "rmsnorm",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
]  # fmt: skip
_TOKENIZER_FLAGS = ("--vocab-file", "--merge-file", "--tokenizer-type")


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """args less each of `flags` and its value."""
    out = list(args)
    for flag in flags:
        index = out.index(flag)
        del out[index : index + 2]
    return out


def _train_args(data_path: str | None, tokenizer: list[str], iters: int = ITERS) -> list[str]:
    """tiny_gpt_args with these tokenizer flags (no GPT-2 files) and, for None, no data."""
    args = _without(tiny_gpt_args(data_path or "unused", "unused", iters), _TOKENIZER_FLAGS)
    if data_path is None:
        args = _without(args, ("--data-path", "--split"))
    return args + tokenizer


def _losses(stdout: str, iters: int = ITERS) -> list[float]:
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(1, iters + 1)), stdout[-3000:]
    losses = [float(rows[i]["loss"]) for i in range(1, iters + 1)]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(corpus_texts(), str(tmp_path_factory.mktemp("spm") / "tokenizer"))


@pytest.fixture(scope="module")
def sp_corpus(tmp_path_factory, sp_model):
    """The small corpus preprocessed by the tool with GPTSentencePieceTokenizer."""
    prefix = str(tmp_path_factory.mktemp("sp_data") / "llama")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
         "--input", CORPUS, "--output-prefix", prefix, "--dataset-impl", "mmap",
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
         "--append-eod", "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return prefix + "_text_document"


def test_preprocess_writes_sentencepiece_ids_and_eos(sp_corpus, sp_model):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    ds = MMapIndexedDataset(sp_corpus)
    texts = corpus_texts()
    assert len(ds) == len(texts) and ds.dtype == np.uint16
    for i, text in enumerate(texts):
        assert ds[i].tolist() == ref.encode(text) + [ref.eos_id()]


def test_pretrain_llama_on_sentencepiece_data(sp_corpus, sp_model):
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]
    proc = run_pretrain(_train_args(sp_corpus, tokenizer) + LLAMA_FLAGS)
    assert " > padded vocab (size: 800) with 96 dummy tokens (new size: 896)" in proc.stdout
    losses = _losses(proc.stdout)
    assert abs(losses[0] - math.log(800)) < 0.5, losses  # starts near uniform over 800 ids
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert "validation loss at the end of training for val data" in proc.stdout


def test_pretrain_on_hf_tokenizer_json_data(tmp_path):
    """HFTokenizer: tokenizer.json preprocessed with --append-eod (in this process), trained."""
    import importlib.util

    tok_json = train_tokenizer_json(corpus_texts(), str(tmp_path / "tokenizer.json"))
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_tool", os.path.join(ROOT, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    try:
        spec.loader.exec_module(tool)
        prefix = str(tmp_path / "hf")
        assert tool.main(["--input", CORPUS, "--output-prefix", prefix, "--append-eod",
                          "--tokenizer-type", "HFTokenizer", "--tokenizer-model", tok_json]) == 0
    finally:
        del sys.modules[spec.name]
    data = prefix + "_text_document"
    assert all(MMapIndexedDataset(data)[i][-1] == 2 for i in range(3))  # </s> ends each doc
    tokenizer = ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(tmp_path)]
    losses = _losses(run_pretrain(_train_args(data, tokenizer, 10)).stdout, 10)
    assert losses[-1] < losses[0], losses


def test_pretrain_on_mock_data():
    tokenizer = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "99", "--mock-data"]
    proc = run_pretrain(_train_args(None, tokenizer, 6))
    assert "> building mock GPT datasets (random tokens over 100 ids, seed 1234)" in proc.stdout
    losses = _losses(proc.stdout, 6)
    # Uniform random tokens over 99 ids: nothing to learn below ln(99).
    assert all(abs(x - math.log(99)) < 0.6 for x in losses), losses
    assert "validation loss at the end of training for val data" in proc.stdout
