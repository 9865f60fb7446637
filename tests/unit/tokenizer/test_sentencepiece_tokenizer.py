"""SentencePieceTokenizer against sentencepiece itself, on a tiny model trained here."""

import random
from types import SimpleNamespace

import pytest

from megatron.tokenizer import build_tokenizer

spm = pytest.importorskip("sentencepiece")

_WORDS = (
    "the cat dog bird sat ran flew on under over a mat tree house quickly slowly "
    "red green blue big small happy 1 2 3 , . !"
).split()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    rng = random.Random(7)
    sentences = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)
    ]
    prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=48,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    return prefix + ".model", sentences


def _build(model_file, extra_ids=0):
    args = SimpleNamespace(
        rank=0,
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=model_file,
        vocab_extra_ids=extra_ids,
        make_vocab_size_divisible_by=8,
        tensor_model_parallel_size=1,
    )
    return build_tokenizer(args), args


def test_ids_match_sentencepiece_and_round_trip(sp_model):
    model_file, sentences = sp_model
    tok, args = _build(model_file)
    ref = spm.SentencePieceProcessor(model_file=model_file)
    for s in sentences[:100] + ["", "the  cat\tsat", "unseen words zzz qq"]:
        ids = tok.tokenize(s)
        assert ids == ref.encode_as_ids(s)
        if s in sentences:
            assert tok.detokenize(ids) == s
    assert tok.tokenize_batch(sentences[:50]) == [ref.encode_as_ids(s) for s in sentences[:50]]
    # 48 model pieces; <unk>,<s>,</s> are the model's; <CLS>,<SEP>,<EOD>,<MASK>,<PAD> are new.
    assert tok.vocab_size == 53 and args.padded_vocab_size == 56
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (48, 49, 50, 51, 52)
    assert tok.bos == ref.bos_id() == 1 and tok.eos == ref.eos_id() == 2
    assert tok.inv_vocab[tok.eod] == "<EOD>" and tok.vocab["<MASK>"] == 51


def test_special_tokens_in_text_and_extra_ids(sp_model):
    model_file, _ = sp_model
    tok, _ = _build(model_file, extra_ids=12)
    ref = spm.SentencePieceProcessor(model_file=model_file)
    assert tok.vocab_size == 53 + 12
    extra = tok.additional_special_tokens_ids
    assert extra == list(range(53, 65)) and tok.inv_vocab[extra[10]] == "<extra_id_10>"
    text = "the cat<extra_id_1>sat<EOD><extra_id_10> on<MASK>"
    ids = tok.tokenize(text)
    expected = (
        ref.encode_as_ids("the cat")
        + [extra[1]]
        + ref.encode_as_ids("sat")
        + [tok.eod, extra[10]]
        + ref.encode_as_ids(" on")
        + [tok.mask]
    )
    assert ids == expected
    assert tok.tokenize_batch([text, "the cat"]) == [expected, ref.encode_as_ids("the cat")]
    # Megatron's layout: each special token is followed by a space and each run of ordinary
    # ids too (even an empty run between two specials).
    assert tok.detokenize(ids) == "the cat <extra_id_1> sat <EOD>  <extra_id_10> on <MASK>"


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer-model not found"):
        _build(str(tmp_path / "none.model"))
