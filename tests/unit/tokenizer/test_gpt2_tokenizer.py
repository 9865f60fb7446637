"""GPT-2 BPE: fixed known ids; each fast backend (tiktoken, Rust `tokenizers`) gives the ids of
the pure-Python reference; backend choice and fallback; round trips."""

import json
import os
import sys

import pytest

from megatron.tokenizer.fast_tokenization import GPT2_TIKTOKEN_PATTERN, gpt2_merge_order_ranks
from megatron.tokenizer.gpt2_tokenization import (
    GPT2_SPLIT_PATTERN,
    GPT2Tokenizer,
    bytes_to_unicode,
    get_pairs,
    read_merges,
    read_vocab,
)
from megatron.tokenizer.tokenizer import _GPT2BPETokenizer


@pytest.fixture(scope="module")
def gpt2_files(vocab_dir):
    return os.path.join(vocab_dir, "gpt2-vocab.json"), os.path.join(vocab_dir, "gpt2-merges.txt")


FAST_BACKENDS = ["tiktoken", "tokenizers"]


@pytest.fixture(scope="module", params=FAST_BACKENDS)
def fast(request, gpt2_files):
    """Each fast backend in turn: tiktoken (the default) and the Rust `tokenizers` BPE."""
    if request.param == "tiktoken":
        pytest.importorskip("tiktoken")
    tok = _GPT2BPETokenizer(*gpt2_files, impl=request.param)
    assert tok.backend == request.param
    return tok


@pytest.fixture(scope="module")
def python(gpt2_files):
    return _GPT2BPETokenizer(*gpt2_files, impl="python")


def test_byte_table_is_a_bijection_onto_printable_chars():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert get_pairs(("a", "b", "c", "b", "c")) == {("a", "b"), ("b", "c"), ("c", "b")}


@pytest.mark.real_vocab
@pytest.mark.parametrize("impl", ["fast", "python"])
def test_known_ids(fast, python, impl):
    tok = fast if impl == "fast" else python
    assert tok.vocab_size == 50257
    assert tok.eod == 50256 and tok.inv_vocab[50256] == "<|endoftext|>"
    assert tok.tokenize("Hello world") == [15496, 995]
    assert tok.tokenize(" Hello") == [18435]
    assert tok.tokenize("Hello, world!") == [15496, 11, 995, 0]
    assert tok.tokenize("\n\n") == [628]
    assert tok.tokenize("") == []
    # '<|endoftext|>' in text is ordinary characters, never the eod id.
    assert tok.eod not in tok.tokenize("<|endoftext|>")
    with pytest.raises(NotImplementedError, match="CLS is not provided for GPT2 BPE"):
        _ = tok.cls


def test_hand_texts_fast_equals_reference(fast, python, hand_texts):
    for text in hand_texts:
        ref = python.tokenize(text)
        assert fast.tokenize(text) == ref, repr(text)
        assert python.detokenize(ref) == text, repr(text)


def test_random_texts_fast_equals_reference(fast, python, mixed_texts):
    ref = [python.tokenize(t) for t in mixed_texts]
    assert fast.tokenize_batch(mixed_texts) == ref
    assert python.tokenize_batch(mixed_texts[:200]) == ref[:200]
    for text, ids in zip(mixed_texts, ref):
        assert fast.detokenize(ids) == text, repr(text)


def test_code_point_sample(fast, python):
    """Every 4th code point of plane 0 and every 41st of planes 1-3, 14 and 15 (an offline
    scan of all of them agreed too), paired up in runs that mix letters, digits, marks,
    spaces and symbols."""
    cps = [cp for cp in range(0, 0x10000, 4) if not 0xD800 <= cp <= 0xDFFF]
    cps += list(range(0x10000, 0x40000, 41)) + list(range(0xE0000, 0x100000, 41))
    texts = []
    for start in range(0, len(cps), 512):
        run = cps[start : start + 512]
        texts.append(" ".join(chr(cp) + chr(run[-1 - i]) for i, cp in enumerate(run)))
    ids = fast.tokenize_batch(texts)
    assert ids == python.tokenize_batch(texts)
    assert [fast.detokenize(x) for x in ids] == texts


def test_every_byte_round_trips(fast, python):
    # All 256 single bytes as text (latin-1) and an emoji cut mid-sequence decode safely.
    text = bytes(range(256)).decode("latin-1")
    ids = fast.tokenize(text)
    assert ids == python.tokenize(text)
    assert fast.detokenize(ids) == text
    emoji_ids = fast.tokenize("👨‍👩‍👧")
    assert fast.detokenize(emoji_ids) == "👨‍👩‍👧"
    assert "\ufffd" in fast.detokenize(emoji_ids[:1])  # partial UTF-8 -> replacement char


@pytest.mark.real_vocab
def test_reference_special_tokens_and_cache(gpt2_files):
    ref = GPT2Tokenizer(*gpt2_files, special_tokens=["<sep>", "<cls>"])
    assert len(ref) == 50257 + 2
    assert ref.convert_tokens_to_ids(["<sep>", "<cls>", "Hello"]) == [50257, 50258, 15496]
    assert ref.decode([15496, 50257, 995]) == "Hello<sep> world"
    assert ref.convert_ids_to_tokens([50258, 995], skip_special_tokens=True) == ["Ġworld"]
    ref.encode("unbelievable unbelievable")
    assert ref.cache["Ġunbelievable"] == ref.bpe("Ġunbelievable")
    assert ref.pre_tokenize("I'll  go") == ["I", "'ll", " ", " go"]


def test_bad_files_give_clear_errors(tmp_path, gpt2_files):
    with pytest.raises(FileNotFoundError, match="--merge-file not found"):
        _GPT2BPETokenizer(gpt2_files[0], str(tmp_path / "missing.txt"))
    bad = tmp_path / "vocab.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="vocab.json: not a JSON vocabulary"):
        _GPT2BPETokenizer(str(bad), gpt2_files[1])
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nĠ t\n\nĠ a b\n")
    with pytest.raises(ValueError, match="merges.txt:4: expected a merge 'a b'"):
        _GPT2BPETokenizer(gpt2_files[0], str(merges))
    with pytest.raises(ValueError, match="tokenizer impl 'rust'"):
        _GPT2BPETokenizer(*gpt2_files, impl="rust")


def test_tiktoken_pattern_splits_like_the_reference(hand_texts, mixed_texts):
    """The regrouped pattern tiktoken runs cuts exactly the reference's pieces."""
    import regex

    assert GPT2_TIKTOKEN_PATTERN.replace("(?:", "", 1).replace(")|", "|", 1) == GPT2_SPLIT_PATTERN
    grouped, reference = regex.compile(GPT2_TIKTOKEN_PATTERN), regex.compile(GPT2_SPLIT_PATTERN)
    for text in hand_texts + mixed_texts:
        assert grouped.findall(text) == reference.findall(text), repr(text)


@pytest.mark.real_vocab
def test_default_is_tiktoken_and_builds_nothing_else(gpt2_files):
    pytest.importorskip("tiktoken")
    tok = _GPT2BPETokenizer(*gpt2_files)
    assert tok.impl == "fast" and tok.backend == "tiktoken"
    assert tok._reference is None and tok._rust is None  # start-up builds one tokenizer
    assert tok.tokenizer.encode("Hello world") == [15496, 995]  # reference, built on demand
    assert tok.inv_vocab[15496] == "Hello" and tok.vocab["Hello"] == 15496


@pytest.mark.real_vocab
def test_without_tiktoken_falls_back_to_tokenizers(gpt2_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now fails
    tok = _GPT2BPETokenizer(*gpt2_files)
    assert tok.backend == "tokenizers" and "tiktoken is not installed" in tok.fallback_reason
    assert tok.tokenize("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="tokenizer impl 'tiktoken': tiktoken is not installed"):
        _GPT2BPETokenizer(*gpt2_files, impl="tiktoken")


def test_lone_surrogate_is_refused_like_the_reference(fast, python):
    # tiktoken alone would replace it with U+FFFD and return ids.
    for tok in (fast, python):
        with pytest.raises(UnicodeEncodeError):
            tok.tokenize("ok \ud800 not ok")


def _toy_files(tmp_path, merges: list[str], vocab_order: list[str]):
    """A tiny byte-level vocabulary: the 256 byte tokens, then `vocab_order`, then eod."""
    tokens = [bytes_to_unicode()[b] for b in range(256)] + vocab_order + ["<|endoftext|>"]
    vocab, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab), str(merge_file)


TOY_TEXTS = ["the then there", " the  thee\n\nthe", "tthhee", "", "e h t"]


def test_toy_vocab_in_merge_order_uses_tiktoken(tmp_path):
    pytest.importorskip("tiktoken")
    files = _toy_files(tmp_path, ["t h", "th e", "Ġ the", "e r"], ["th", "the", "Ġthe", "er"])
    tok = _GPT2BPETokenizer(*files)
    assert tok.backend == "tiktoken" and tok.eod == 260
    ref = _GPT2BPETokenizer(*files, impl="python")
    assert tok.tokenize_batch(TOY_TEXTS) == ref.tokenize_batch(TOY_TEXTS)
    assert tok.tokenize("the") == [257] and tok.tokenize("<|endoftext|>") != [260]


def test_toy_vocab_out_of_merge_order_falls_back(tmp_path):
    """ids that do not follow the merge list would give tiktoken another merge priority."""
    pytest.importorskip("tiktoken")
    files = _toy_files(tmp_path, ["e r", "t h", "th e"], ["th", "the", "er"])
    assert gpt2_merge_order_ranks(read_vocab(files[0]), read_merges(files[1])) is None
    tok = _GPT2BPETokenizer(*files)
    assert tok.backend == "tokenizers"
    ref = _GPT2BPETokenizer(*files, impl="python")
    assert tok.tokenize_batch(TOY_TEXTS) == ref.tokenize_batch(TOY_TEXTS)


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_tokenize_batch_bytes_equals_ids(fast, python, hand_texts, mixed_texts, dtype):
    """The raw-bytes path preprocess_data.py writes from (tiktoken: a uint32 buffer cast to
    the output dtype) holds the reference ids, '<|endoftext|>' in a text included."""
    import numpy as np

    texts = [*hand_texts, *mixed_texts[:300], "a <|endoftext|> b<|endoftext|>", ""]
    ref = python.tokenize_batch(texts)
    for tok in (fast, python):
        got = tok.tokenize_batch_bytes(texts, np.dtype(dtype))
        assert [np.frombuffer(b, dtype=dtype).tolist() for b in got] == ref
    with pytest.raises(UnicodeEncodeError):
        fast.tokenize_batch_bytes(["ok", "lone \ud800 surrogate"], np.dtype(dtype))
