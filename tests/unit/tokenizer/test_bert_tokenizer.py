"""BERT WordPiece: known ids of the uncased vocabulary, fast == pure-Python reference."""

import os

import pytest

from megatron.tokenizer.bert_tokenization import BasicTokenizer, WordpieceTokenizer
from megatron.tokenizer.tokenizer import _BertWordPieceTokenizer


@pytest.fixture(scope="module")
def vocab_file(vocab_dir):
    return os.path.join(vocab_dir, "bert-large-uncased-vocab.txt")


@pytest.fixture(scope="module")
def pairs(vocab_file):
    """{(lower_case): (fast, python)} tokenizers over the uncased vocabulary."""
    return {
        lower: (
            _BertWordPieceTokenizer(vocab_file, lower, impl="fast"),
            _BertWordPieceTokenizer(vocab_file, lower, impl="python"),
        )
        for lower in (True, False)
    }


# Ids as published for bert-base/large-uncased (line numbers of vocab.txt, from 0).
KNOWN = [
    ("Jim Henson was a puppeteer", [3958, 27227, 2001, 1037, 13997, 11510]),
    ("HeLLo, World!", [7592, 1010, 2088, 999]),
    ("unaffable", [14477, 20961, 3468]),
    ("the i a's", [1996, 1045, 1037, 1005, 1055]),
    ("Café naïve 中文", [7668, 15743, 1746, 1861]),
    ("\x00\ufffd", []),
]


@pytest.mark.real_vocab
@pytest.mark.parametrize("impl", ["fast", "python"])
def test_known_ids_and_special_tokens(pairs, impl):
    tok = pairs[True][0] if impl == "fast" else pairs[True][1]
    assert tok.impl == impl
    for text, ids in KNOWN:
        assert tok.tokenize(text) == ids, text
    assert (tok.pad, tok.cls, tok.sep, tok.mask) == (0, 101, 102, 103)
    assert tok.vocab["[UNK]"] == 100 and tok.inv_vocab[1996] == "the"
    # [BOS]/[EOS] are appended after the 30522 file tokens, as in Megatron.
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (30522, 30523, 30524)
    assert tok.tokenize("[CLS] x") == [1031, 18856, 2015, 1033, 1060]  # plain text
    with pytest.raises(NotImplementedError, match="EOD is not provided for BERT Lower Case"):
        _ = tok.eod


@pytest.mark.real_vocab
def test_extra_ids_and_decoding(vocab_file):
    tok = _BertWordPieceTokenizer(vocab_file, lower_case=True, vocab_extra_ids=100)
    assert tok.vocab_size == 30524 + 100
    assert tok.additional_special_tokens_ids == list(range(30524, 30624))
    assert tok.inv_vocab[30524 + 99] == "<extra_id_99>"
    ids = tok.tokenize("Jim Henson wasn't a puppeteer, was he?")
    assert tok.detokenize(ids) == "jim henson wasn't a puppeteer, was he?"
    assert tok.decode_token_ids([101] + ids[:8] + [0, 0]) == " jim henson wasn ' t a puppeteer"


def test_reference_pieces():
    basic = BasicTokenizer(do_lower_case=True)
    assert basic.tokenize(" \tHeLLo!how  \n Are yoU?  ") == ["hello", "!", "how", "are", "you", "?"]
    assert basic.tokenize("Ünïcödé 中文x") == ["unicode", "中", "文", "x"]
    assert BasicTokenizer(do_lower_case=False).tokenize("HäLLo!") == ["HäLLo", "!"]
    vocab = {t: i for i, t in enumerate(["[UNK]", "want", "##want", "##ed", "wa", "un", "##un"])}
    wp = WordpieceTokenizer(vocab, max_input_chars_per_word=10)
    assert wp.tokenize("unwanted wanted unwantedx") == [
        "un",
        "##want",
        "##ed",
        "want",
        "##ed",
        "[UNK]",
    ]
    assert wp.tokenize("un" * 6) == ["[UNK]"]  # 12 chars > 10
    assert wp.tokenize("un" * 5) == ["un", "##un", "##un", "##un", "##un"]


@pytest.mark.parametrize("lower", [True, False])
def test_hand_and_random_texts_fast_equals_reference(pairs, lower, hand_texts, mixed_texts):
    fast, python = pairs[lower]
    extra = ["ж" * 200 + " " + "ж" * 201, "é" * 150, "ΟΔΟΣ οδός Σ", "x\ue000y \U000e0001z"]
    texts = hand_texts + extra + mixed_texts
    ref = [python.tokenize(t) for t in texts]
    assert fast.tokenize_batch(texts) == ref
    for text, ids in zip(hand_texts + extra, ref):
        assert fast.tokenize(text) == ids, repr(text)


# Code points where the Rust crates' Unicode tables differ from Python's (found by an
# exhaustive scan of planes 0-3 and 14): the gate must send them to the reference.
_TABLE_DIFFERENCES = [
    0x061D,
    0x0890,
    0x08CA,
    0x0C77,
    0x166D,
    0x1734,
    0x2E52,
    0xE000,
    0xF8FF,
    0x1144B,
    0x11A3F,
    0x13430,
    0x1E95E,
    0x2B820,
    0xF0000,
    0x03A3,
]


@pytest.mark.parametrize("lower", [True, False])
def test_code_point_sample_fast_equals_reference(pairs, lower):
    """Every 97th code point of planes 0-2 and the known table differences, each inside a
    word, between words and doubled."""
    fast, python = pairs[lower]
    cps = [cp for cp in range(0, 0x30000, 97) if not 0xD800 <= cp <= 0xDFFF]
    texts = [f"Ab{chr(cp)}cD {chr(cp)}{chr(cp)} z" for cp in cps + _TABLE_DIFFERENCES]
    assert fast.tokenize_batch(texts) == [python.tokenize(t) for t in texts]


def test_fast_path_is_used_for_common_scripts(pairs):
    fast = pairs[True][0]
    gate = fast._fast.gate
    for text in (
        "Hello, world! It's 3.14 €.",
        "Café naïve résumé",
        "中文测试 日本語 한국어",
        "Привет мир",
        "مرحبا بالعالم",
        "हिन्दी",
        "ภาษาไทย",
        "emoji 😀 👍🏽",
    ):
        assert gate.is_safe(text), text
    # Characters on which the Rust tables differ fall back to the reference.
    assert not gate.is_safe("private \ue000 use")
    assert not gate.is_safe("ΟΔΟΣ")  # final-sigma rule of str.lower()
    assert pairs[False][0]._fast.gate.is_safe("ΟΔΟΣ")  # cased: no lower-casing
