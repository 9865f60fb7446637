"""build_tokenizer dispatch, vocab padding, NullTokenizer, and the torch-free import."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron.tokenizer import build_tokenizer, vocab_size_with_padding
from megatron.tokenizer.tokenizer import _NullTokenizer, _vocab_size_with_padding

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _args(**kw):
    base = dict(
        rank=0,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
        vocab_file=None,
        merge_file=None,
        tokenizer_model=None,
        vocab_extra_ids=0,
        vocab_size=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "orig, divisible_by, tp, expected",
    [
        (50257, 128, 1, 50304),
        (50257, 128, 2, 50432),
        (50257, 128, 8, 51200),
        (30524, 128, 1, 30592),
        (256, 128, 2, 256),
        (1, 1, 1, 1),
        (7, 1, 3, 9),
    ],
)
def test_vocab_size_with_padding(orig, divisible_by, tp, expected, capsys):
    assert vocab_size_with_padding(orig, divisible_by, tp) == expected
    assert capsys.readouterr().out == (
        f" > padded vocab (size: {orig}) with {expected - orig} dummy tokens "
        f"(new size: {expected})\n"
    )
    assert vocab_size_with_padding(orig, divisible_by, tp, log=False) == expected
    assert capsys.readouterr().out == ""


def test_vocab_size_with_padding_rejects_bad_values():
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        vocab_size_with_padding(100, 0, 1)
    args = _args(make_vocab_size_divisible_by=64, tensor_model_parallel_size=4, rank=1)
    assert _vocab_size_with_padding(257, args) == 512


def test_null_tokenizer_via_build(capsys):
    args = _args(tokenizer_type="NullTokenizer", vocab_size=1000)
    tok = build_tokenizer(args)
    out = capsys.readouterr().out
    assert "> building NullTokenizer tokenizer ..." in out
    assert " > padded vocab (size: 1001) with 23 dummy tokens (new size: 1024)" in out
    assert args.padded_vocab_size == 1024
    assert tok.vocab_size == 1001 and tok.eod == 1000
    assert tok.tokenize("5 17  999\n0\t1000") == [5, 17, 999, 0, 1000]
    assert tok.detokenize([5, 17, 0]) == "5 17 0"
    assert tok.tokenize_batch(["1 2", ""]) == [[1, 2], []]
    assert tok.cls == -1 and tok.sep == -1 and tok.mask == -1
    assert tok.vocab["7"] == 7 and tok.inv_vocab[1000] == "1000"
    with pytest.raises(ValueError, match="'x' is not an integer id"):
        tok.tokenize("1 x 2")
    with pytest.raises(ValueError, match="id 1001 outside"):
        tok.tokenize("1001")
    with pytest.raises(ValueError, match="--vocab-size must be >= 1"):
        _NullTokenizer(0)


def test_build_errors_name_the_flag():
    with pytest.raises(ValueError, match="--vocab-file is required for --tokenizer-type Bert"):
        build_tokenizer(_args(tokenizer_type="BertWordPieceLowerCase"))
    with pytest.raises(ValueError, match="--merge-file is required"):
        build_tokenizer(_args(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json"))
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        build_tokenizer(_args(tokenizer_type="SentencePieceTokenizer"))
    with pytest.raises(ValueError, match="--vocab-size is required"):
        build_tokenizer(_args(tokenizer_type="NullTokenizer"))
    with pytest.raises(NotImplementedError, match="--tokenizer-type Foo is not implemented"):
        build_tokenizer(_args(tokenizer_type="Foo"))


@pytest.mark.real_vocab
def test_build_gpt2_and_bert(vocab_dir, capsys):
    args = _args(
        tokenizer_type="GPT2BPETokenizer",
        tensor_model_parallel_size=2,
        rank=3,
        vocab_file=os.path.join(vocab_dir, "gpt2-vocab.json"),
        merge_file=os.path.join(vocab_dir, "gpt2-merges.txt"),
    )
    tok = build_tokenizer(args)
    assert capsys.readouterr().out == ""  # only rank 0 prints
    assert args.padded_vocab_size == 50432 and tok.eod == 50256 and tok.impl == "fast"
    args = _args(
        tokenizer_type="BertWordPieceCase",
        tokenizer_impl="python",
        vocab_extra_ids=3,
        vocab_file=os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
    )
    tok = build_tokenizer(args)
    assert tok.impl == "python" and tok.name == "BERT Upper Case"
    assert tok.vocab_size == 30522 + 2 + 3 and args.padded_vocab_size == 30592


@pytest.mark.real_vocab
def test_import_does_not_load_torch_or_backends(vocab_dir):
    """Importing megatron.tokenizer, and building/using a GPT-2 tokenizer, stays torch-free;
    sentencepiece is only imported by the SentencePiece type, and the GPT-2 default builds
    neither the Rust `tokenizers` pipeline nor the pure-Python reference."""
    code = f"""
import sys
import megatron.tokenizer
from megatron.tokenizer import build_tokenizer
from types import SimpleNamespace
loaded = [m for m in ("torch", "tokenizers", "sentencepiece", "regex") if m in sys.modules]
assert not loaded, loaded
args = SimpleNamespace(rank=0, tokenizer_type="GPT2BPETokenizer", make_vocab_size_divisible_by=128,
    tensor_model_parallel_size=1, vocab_file={os.path.join(vocab_dir, "gpt2-vocab.json")!r},
    merge_file={os.path.join(vocab_dir, "gpt2-merges.txt")!r})
tok = build_tokenizer(args)
assert tok.tokenize("Hello world") == [15496, 995]
loaded = [m for m in ("torch", "sentencepiece", "tokenizers") if m in sys.modules]
assert not loaded, loaded  # GPT-2 builds tiktoken only
assert tok.backend == "tiktoken" and tok._reference is None
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_hf_tokenizer(tmp_path, capsys):
    """A tiny WordLevel tokenizer.json with a BOS post-processor and a tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5, "!": 6}
    hf = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>", "<pad>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save(str(tmp_path / "tokenizer.json"))

    args = _args(
        tokenizer_type="HFTokenizer",
        tokenizer_model=str(tmp_path / "tokenizer.json"),
        make_vocab_size_divisible_by=4,
    )
    tok = build_tokenizer(args)
    assert args.padded_vocab_size == 8 and tok.vocab_size == 7
    assert tok.tokenize("hello world !") == [1, 4, 5, 6]
    assert tok.tokenize("hello mars") == [1, 4, 0]
    assert tok.tokenize_batch(["world", "hello"]) == [[1, 5], [1, 4]]
    assert tok.detokenize([4, 5, 2]) == "hello world </s>"
    assert (tok.eod, tok.pad, tok.bos) == (2, 3, 1)
    assert tok.vocab["world"] == 5 and tok.inv_vocab[6] == "!"

    # A folder works too; tokenizer_config.json overrides the guessed eos.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    tok = build_tokenizer(_args(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path)))
    assert tok.eod == 3
    with pytest.raises(NotImplementedError, match="CLS is not provided for HFTokenizer"):
        _ = tok.cls
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a `tokenizers` tokenizer.json"):
        build_tokenizer(
            _args(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path / "bad.json"))
        )
