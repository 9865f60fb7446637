"""GPTSentencePieceTokenizer, SentencePieceTokenizer and HFTokenizer on real text: ids equal
the libraries' own encode, bad --tokenizer-model files are one-line errors naming the flag
and the file (in build_tokenizer, preprocess_data.py and before initialize_megatron builds
a process group), and preprocess_data.py --append-eod writes the tokenizer's ids.

The SentencePiece model (LLaMA's settings: BPE, byte fallback, split digits, no
normalisation) and the tokenizer.json (byte-level BPE) are trained here on the test corpus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.errors import is_one_line_error
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.tokenizer import TokenizerError, TokenizerFileError

spm = pytest.importorskip("sentencepiece")
hf_tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CORPUS = os.path.join(ROOT, "tests", "data", "corpus_small.jsonl")
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


def corpus_texts() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_sentencepiece(texts: list[str], prefix: str, vocab_size: int = 800, **kw) -> str:
    """A LLaMA-style SentencePiece BPE model of `texts`; returns the .model path."""
    options = dict(
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995, max_sentence_length=1 << 20, minloglevel=2,
    )  # fmt: skip
    options.update(kw)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, **options
    )
    return prefix + ".model"


def train_tokenizer_json(texts: list[str], path: str, vocab_size: int = 800) -> str:
    """A byte-level BPE tokenizer.json of `texts` with <unk> <s> </s> <pad> (ids 0-3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return path


def tokenizer_args(tokenizer_type: str, model: str | None, **kw) -> SimpleNamespace:
    base = dict(
        rank=0, tokenizer_type=tokenizer_type, tokenizer_model=model, vocab_extra_ids=0,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def texts():
    return corpus_texts()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts):
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "llama"))


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, texts):
    return train_tokenizer_json(texts, str(tmp_path_factory.mktemp("hf") / "tokenizer.json"))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _probe_texts(texts, hand_texts, mixed_texts) -> list[str]:
    return [*texts, *hand_texts, *mixed_texts[:500], "<s> </s> <unk> <pad> as plain text"]


# ------------------------------------------------------------------ GPTSentencePieceTokenizer


def test_gpt_sentencepiece_ids_are_sentencepiece_encode(sp_model, texts, hand_texts, mixed_texts):
    tok = build_tokenizer(tokenizer_args("GPTSentencePieceTokenizer", sp_model))
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    probe = _probe_texts(texts, hand_texts, mixed_texts)
    expected = [ref.encode(t) for t in probe]
    assert [tok.tokenize(t) for t in probe] == expected
    assert tok.tokenize_batch(probe) == expected
    assert tok.tokenize_batch([]) == []
    for ids in expected:
        assert tok.detokenize(ids) == ref.decode(ids)
    for text in texts:  # no normalisation and byte fallback: real text comes back as it was
        assert tok.detokenize(np.asarray(tok.tokenize(text))) == text
    dtype = np.uint16
    assert tok.tokenize_batch_bytes(texts[:5], dtype) == [
        np.asarray(ids, dtype).tobytes() for ids in expected[:5]
    ]


def test_gpt_sentencepiece_special_ids_and_vocab(sp_model, capsys):
    args = tokenizer_args("GPTSentencePieceTokenizer", sp_model, tensor_model_parallel_size=2)
    tok = build_tokenizer(args)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    out = capsys.readouterr().out
    assert "> building GPTSentencePieceTokenizer tokenizer ..." in out
    assert " > padded vocab (size: 800) with 224 dummy tokens (new size: 1024)" in out
    assert tok.vocab_size == ref.get_piece_size() == 800 and args.padded_vocab_size == 1024
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (ref.bos_id(), ref.eos_id(), 2, -1)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert (tok.cls, tok.sep, tok.mask) == (-1, -1, -1)
    assert tok.additional_special_tokens_ids is None
    assert len(tok.vocab) == len(tok.inv_vocab) == 800
    assert tok.inv_vocab[2] == "</s>" and tok.vocab["<s>"] == 1 and tok.vocab["<unk>"] == 0
    # Control pieces in text stay text: only --append-eod puts eod into the data.
    assert tok.eod not in tok.tokenize("the end </s> of it")
    assert tok.detokenize([1, *tok.tokenize("Hello"), 2]) == "Hello"


def test_gpt_sentencepiece_pad_and_missing_eos_come_from_the_model(tmp_path, texts):
    model = train_sentencepiece(
        texts[:20], str(tmp_path / "nopad"), vocab_size=400, pad_id=3, eos_id=-1
    )
    tok = build_tokenizer(tokenizer_args("GPTSentencePieceTokenizer", model))
    assert tok.pad == 3 and tok.bos == 1 and tok.eos == -1 and tok.vocab_size == 400
    with pytest.raises(NotImplementedError, match="no eos piece"):
        _ = tok.eod


# ------------------------------------------------------------------ other tokenizers, real text


def test_sentencepiece_tokenizer_ids_on_real_text(sp_model, texts, hand_texts, mixed_texts):
    tok = build_tokenizer(tokenizer_args("SentencePieceTokenizer", sp_model))
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    probe = _probe_texts(texts, hand_texts, mixed_texts)[:-1]  # no "<s>" etc. in the text
    assert tok.tokenize_batch(probe) == [ref.encode(t) for t in probe]
    # The model's <s> </s> are bos/eos; <CLS> <SEP> <EOD> <MASK> <PAD> are appended.
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (1, 2, 802, 804) and tok.vocab_size == 805


def test_hf_tokenizer_ids_are_tokenizers_encode(hf_json, texts, hand_texts, mixed_texts):
    from tokenizers import Tokenizer

    tok = build_tokenizer(tokenizer_args("HFTokenizer", hf_json))
    ref = Tokenizer.from_file(hf_json)
    probe = _probe_texts(texts, hand_texts, mixed_texts)
    expected = [ref.encode(t).ids for t in probe]
    assert [tok.tokenize(t) for t in probe] == expected
    assert tok.tokenize_batch(probe) == expected
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert (tok.eod, tok.bos, tok.pad, tok.vocab_size) == (2, 1, 3, 800)
    folder = build_tokenizer(tokenizer_args("HFTokenizer", os.path.dirname(hf_json)))
    assert folder.tokenize(texts[0]) == expected[0]


# ------------------------------------------------------------------ bad --tokenizer-model


def _bad_files(tmp_path, hf_json, sp_model) -> dict[str, str]:
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    return {
        "missing": str(tmp_path / "no-such.model"),
        "folder": str(tmp_path),
        "garbage": str(garbage),
        "empty": str(empty),
        "tokenizer.json": hf_json,
        "model for HF": sp_model,
    }


@pytest.mark.parametrize(
    "tokenizer_type, case",
    [
        ("GPTSentencePieceTokenizer", "missing"),
        ("GPTSentencePieceTokenizer", "folder"),
        ("GPTSentencePieceTokenizer", "garbage"),
        ("GPTSentencePieceTokenizer", "empty"),
        ("GPTSentencePieceTokenizer", "tokenizer.json"),
        ("SentencePieceTokenizer", "garbage"),
        ("SentencePieceTokenizer", "tokenizer.json"),
        ("HFTokenizer", "missing"),
        ("HFTokenizer", "folder"),
        ("HFTokenizer", "garbage"),
        ("HFTokenizer", "model for HF"),
    ],
)
def test_bad_tokenizer_model_is_one_line_naming_flag_and_file(
    tmp_path, hf_json, sp_model, tokenizer_type, case
):
    path = _bad_files(tmp_path, hf_json, sp_model)[case]
    with pytest.raises(TokenizerFileError) as info:
        build_tokenizer(tokenizer_args(tokenizer_type, path))
    message = str(info.value)
    assert "--tokenizer-model" in message and path in message and "\n" not in message
    assert is_one_line_error(info.value) and isinstance(info.value, FileNotFoundError)


def test_missing_tokenizer_model_flag():
    with pytest.raises(TokenizerError, match="--tokenizer-model is required for --tokenizer-type"):
        build_tokenizer(tokenizer_args("GPTSentencePieceTokenizer", None))


def test_bad_tokenizer_model_stops_initialize_before_process_groups(tmp_path, monkeypatch):
    """initialize_megatron builds the tokenizer before torch.distributed and the model."""
    from megatron import initialize
    from megatron.global_vars import reset_global_variables

    def no_process_group(args):
        raise AssertionError("a process group was set up before the tokenizer was checked")

    monkeypatch.setattr(initialize, "_initialize_distributed", no_process_group)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp_path / "tokenizer.model")
    flags = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", missing,
    ]  # fmt: skip
    try:
        with pytest.raises(TokenizerFileError, match=f"--tokenizer-model not found: {missing}"):
            initialize.initialize_megatron(args_list=flags)
    finally:
        reset_global_variables()


# ------------------------------------------------------------------ preprocess_data.py


def _read_documents(prefix: str) -> list[list[int]]:
    from megatron.data.indexed_dataset import MMapIndexedDataset

    ds = MMapIndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize(
    "tokenizer_type", ["GPTSentencePieceTokenizer", "SentencePieceTokenizer", "HFTokenizer"]
)
def test_preprocess_append_eod_writes_the_tokenizer_ids(
    tool, tmp_path, sp_model, hf_json, texts, tokenizer_type, capsys
):
    model = hf_json if tokenizer_type == "HFTokenizer" else sp_model
    prefix = str(tmp_path / "out")
    argv = [
        "--input", CORPUS, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type,
        "--tokenizer-model", model, "--append-eod", "--workers", "1",
    ]  # fmt: skip
    assert tool.main(argv) == 0, capsys.readouterr().err
    tok = build_tokenizer(tokenizer_args(tokenizer_type, model))
    docs = _read_documents(prefix + "_text_document")
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]
    # A vocabulary under 65500 ids is stored as uint16.
    assert os.path.getsize(prefix + "_text_document.bin") == 2 * sum(map(len, docs))


@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "HFTokenizer"])
def test_preprocess_bad_tokenizer_model_is_one_error_line(
    tool, tmp_path, tokenizer_type, capsys
):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a model\n")
    prefix = str(tmp_path / "out" / "data")
    argv = [
        "--input", CORPUS, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type,
        "--tokenizer-model", str(bad), "--append-eod",
    ]  # fmt: skip
    assert tool.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --tokenizer-model {bad}")
    assert not os.path.exists(tmp_path / "out")  # the folder it created is removed again


def test_preprocess_append_eod_without_eos_piece(tool, tmp_path, texts, capsys):
    model = train_sentencepiece(texts[:20], str(tmp_path / "noeos"), vocab_size=400, eos_id=-1)
    argv = [
        "--input", CORPUS, "--output-prefix", str(tmp_path / "out"),
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model,
        "--append-eod",
    ]  # fmt: skip
    assert tool.main(argv) == 1
    err = capsys.readouterr().err
    assert "--append-eod: GPTSentencePieceTokenizer has no end-of-document token" in err
