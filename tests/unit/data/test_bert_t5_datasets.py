"""BERT and T5 datasets: sample structure, masking statistics, span sentinels."""

import os
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data import dataset_utils
from megatron.data.bert_dataset import BertDataset
from megatron.data.dataset_utils import (
    MaskingVocab,
    build_train_valid_test_datasets,
    create_masked_lm_predictions,
    create_tokens_and_token_types,
    truncate_segments,
)
from megatron.data.indexed_dataset import (
    data_file_path,
    index_file_path,
    make_builder,
    make_dataset,
)
from megatron.data.t5_dataset import T5Dataset

PAD, CLS, SEP, MASK, BOS, EOS = 0, 1, 2, 3, 4, 5
SENTINELS = tuple(range(6, 16))
WORD_STARTS = range(16, 60)  # "wN" pieces; 60..99 are "##N" continuations
INV_VOCAB = {
    PAD: "[PAD]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]", BOS: "<s>", EOS: "</s>",
    **{i: f"<extra_id_{i - 6}>" for i in SENTINELS},
    **{i: f"w{i}" for i in WORD_STARTS},
    **{i: f"##{i}" for i in range(60, 100)},
}  # fmt: skip
VOCAB = MaskingVocab(
    vocab_id_list=list(INV_VOCAB),
    vocab_id_to_token_dict=INV_VOCAB,
    cls_id=CLS,
    sep_id=SEP,
    mask_id=MASK,
    pad_id=PAD,
    bos_id=BOS,
    eos_id=EOS,
    sentinel_ids=SENTINELS,
)


def words_sentence(rng, num_words):
    """A sentence of whole words: a start piece followed by 0-2 '##' pieces each."""
    out = []
    for _ in range(num_words):
        out.append(int(rng.randint(16, 60)))
        out += rng.randint(60, 100, size=rng.randint(0, 3)).tolist()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.RandomState(0)
    prefix = str(tmp_path_factory.mktemp("bert") / "corpus_text_sentence")
    builder = make_builder(data_file_path(prefix), "mmap", vocab_size=100)
    for _ in range(30):
        for _ in range(rng.randint(2, 7)):
            builder.add_item(np.array(words_sentence(rng, rng.randint(2, 6))))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix, make_dataset(prefix, "mmap", skip_warmup=True)


def restore(sample):
    """The token ids before masking: masked positions get their labels back."""
    text = sample["text"].copy()
    mask = sample["loss_mask"] == 1
    text[mask] = sample["labels"][mask]
    return text


def test_bert_sample_structure(corpus):
    prefix, indexed = corpus
    ds = BertDataset("train", indexed, prefix, None, 200, 0.15, 32, 0.1, 1234, True, vocab=VOCAB)
    assert len(ds) >= 200  # whole passes over the documents until 200 are reached
    assert os.path.exists(prefix + "_train_indexmap_200mns_29msl_0.10ssp_1234s.npy")
    is_random = []
    for idx in range(len(ds)):
        s = ds[idx]
        n = int(s["padding_mask"].sum())
        assert all(s[k].shape == (32,) and s[k].dtype == np.int64
                   for k in ("text", "types", "labels", "loss_mask", "padding_mask"))  # fmt: skip
        assert np.array_equal(s["padding_mask"], (np.arange(32) < n).astype(np.int64))
        assert (s["text"][n:] == PAD).all() and (s["types"][n:] == PAD).all()
        assert np.array_equal(s["loss_mask"], (s["labels"] != -1).astype(np.int64))
        k = int(np.argmax(s["types"][:n]))  # first position of segment B
        assert k > 2 and (s["types"][k:n] == 1).all() and (s["types"][:k] == 0).all()
        text = restore(s)
        assert text[0] == CLS and text[k - 1] == SEP and text[n - 1] == SEP
        assert s["loss_mask"][[0, k - 1, n - 1]].sum() == 0  # specials are never targets
        start, end, _ = (int(x) for x in ds.samples_mapping[idx])
        original = np.concatenate([indexed[i] for i in range(start, end)]).tolist()
        a, b = text[1 : k - 1].tolist(), text[k : n - 1].tolist()
        if not s["truncated"]:
            assert (b + a if s["is_random"] else a + b) == original
        is_random.append(s["is_random"])
    assert 0.3 < np.mean(is_random) < 0.7
    # the same index gives the same sample
    assert all(np.array_equal(ds[5][k], ds[5][k]) for k in ("text", "labels"))


def test_masking_statistics_and_whole_words():
    rng = np.random.RandomState(1)
    np_rng = np.random.RandomState(2)
    masked = total = kept = to_mask = 0
    for _ in range(150):
        tokens = [CLS] + words_sentence(rng, 40)[:126] + [SEP]
        out, positions, labels, _, spans = create_masked_lm_predictions(
            tokens, VOCAB.vocab_id_list, INV_VOCAB, 0.15, CLS, SEP, MASK, 0.15 * 128, np_rng
        )
        assert positions == sorted(positions) and [tokens[p] for p in positions] == labels
        unmasked = set(range(len(tokens))) - set(positions)
        assert all(out[i] == tokens[i] for i in unmasked)
        # whole-word masking: a '##' piece is masked exactly when its word start is
        for p in range(1, len(tokens) - 1):
            if INV_VOCAB[tokens[p]].startswith("##"):
                assert (p in positions) == (p - 1 in positions)
        masked += len(positions)
        total += len(tokens)
        to_mask += sum(out[p] == MASK for p in positions)
        kept += sum(out[p] == tokens[p] for p in positions)
        assert max(len(sp.index) for sp in spans) <= 3 * 3  # at most 3 words of <= 3 pieces
    assert abs(masked / total - 0.15) < 0.01
    assert abs(to_mask / masked - 0.8) < 0.03
    # 10% unchanged plus the random replacements that hit the same id (1/100 of 10%)
    assert abs(kept / masked - 0.101) < 0.02


def test_segment_helpers():
    tokens, types = create_tokens_and_token_types([7, 8], [9], CLS, SEP)
    assert tokens == [CLS, 7, 8, SEP, 9, SEP] and types == [0, 0, 0, 0, 1, 1]
    a, b = list(range(10)), list(range(20, 24))
    assert truncate_segments(a, b, 10, 4, 9, np.random.RandomState(0))
    assert len(a) == 5 and len(b) == 4  # the longer segment is shortened
    assert a in [list(range(i, i + 5)) for i in range(6)]  # ends trimmed, order kept


def test_t5_sample_sentinels_and_lengths(corpus):
    prefix, indexed = corpus
    ds = T5Dataset("train", indexed, prefix, None, 100, 0.15, 40, 16, 0.1, 5, vocab=VOCAB)
    spans_seen = []
    for idx in range(len(ds)):
        s = ds[idx]
        assert s["text_enc"].shape == (40,) and s["text_dec"].shape == (16,)
        assert s["enc_mask"].shape == (40, 40) and s["dec_mask"].shape == (16, 16)
        assert s["enc_dec_mask"].shape == (16, 40) and s["labels"].shape == (16,)
        enc, dec, labels = s["text_enc"].tolist(), s["text_dec"].tolist(), s["labels"]
        m = int(s["loss_mask"].sum())
        ne = int(np.sum(s["enc_mask"][0])) if enc[0] != PAD else 0
        assert dec[0] == BOS and (np.array(dec[m:]) == PAD).all()
        assert labels[:m - 1].tolist() == dec[1:m] and labels[m - 1] == EOS  # fmt: skip
        assert (labels[m:] == -1).all() and (np.array(enc[ne:]) == PAD).all()
        used = [t for t in enc if t in SENTINELS]
        assert used == list(SENTINELS[: len(used)])  # in order, from <extra_id_0>
        assert [t for t in dec if t in SENTINELS] == used
        # putting the spans back into the encoder input gives the original tokens
        spans, cur = {}, None
        for t in dec[1:m]:
            if t in SENTINELS:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in enc[:ne] for x in (spans[t] if t in SENTINELS else [t])]
        start, end, target = (int(x) for x in ds.samples_mapping[idx])
        original = np.concatenate([indexed[i] for i in range(start, end)]).tolist()
        assert rebuilt == original[:target]
        assert s["truncated"] == int(len(original) > target)
        assert np.array_equal(s["dec_mask"], np.tril(s["dec_mask"]))
        assert s["enc_dec_mask"][:m, :ne].all() and s["enc_dec_mask"].sum() == m * ne
        spans_seen.append(sum(len(v) for v in spans.values()) / len(rebuilt))
    assert 0.08 < np.mean(spans_seen) < 0.2


def test_build_train_valid_test_bert_and_t5(corpus, tmp_path):
    prefix, _ = corpus
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "mmap", "80,20,0", [50, 10, 0], 24, 0.15, 0.1, 3, True,
        binary_head=True, dataset_type="standard_bert", vocab=VOCAB,
    )  # fmt: skip
    assert test is None and len(train) >= 50 and len(valid) >= 10
    bounds = dataset_utils.get_train_valid_test_split_("80,20,0", 30)
    first_valid_sentence = int(train.indexed_dataset.doc_idx[bounds[1]])
    assert int(np.min(valid.samples_mapping[:, 0])) >= first_valid_sentence
    assert int(np.max(train.samples_mapping[:, 1])) <= first_valid_sentence
    assert valid[0]["text"].shape == (24,)

    t5_train, _, _ = build_train_valid_test_datasets(
        ["1", prefix, "1", prefix], "mmap", "100,0,0", [20, 0, 0], 40, 0.15, 0.1, 3, True,
        max_seq_length_dec=16, dataset_type="t5", vocab=VOCAB,
    )  # fmt: skip
    assert len(t5_train) == 20 and t5_train[0]["text_dec"][0] == BOS
    with pytest.raises(ValueError, match="dataset_type"):
        build_train_valid_test_datasets([prefix], "mmap", "1", [1, 0, 0], 24, 0.15, 0.1, 3,
                                        True, dataset_type="ict")  # fmt: skip


def test_vocab_from_tokenizer_and_sentinel_check(corpus):
    tok = SimpleNamespace(
        inv_vocab=INV_VOCAB, cls=CLS, sep=SEP, mask=MASK, pad=PAD, bos_token_id=BOS,
        eos_token_id=EOS, additional_special_tokens_ids=list(SENTINELS),
    )  # fmt: skip
    assert MaskingVocab.from_tokenizer(tok) == VOCAB
    prefix, indexed = corpus
    no_sentinels = MaskingVocab(list(INV_VOCAB), INV_VOCAB, CLS, SEP, MASK, PAD, BOS, EOS)
    with pytest.raises(ValueError, match="--vocab-extra-ids"):
        T5Dataset("train", indexed, prefix, None, 10, 0.15, 40, 16, 0.1, 5, vocab=no_sentinels)
