"""Data that cannot give a sound training run fails at open time with one line naming the
files or flags: a `.bin` that is not the one the `.idx` describes, end-of-document tokens
in the wrong places, no training documents, bad blend weights, missing files."""

import argparse
import os
import re
import shutil

import numpy as np
import pytest

from megatron.data import dataset_utils, gpt_dataset
from megatron.data import indexed_dataset as ix
from megatron.data.dataset_utils import DataPathError, check_data_paths

EOD = 999


def write(prefix, docs, impl="mmap", dtype=np.uint16):
    """Write `docs` (each a list of items, each a list of ids) with the real builder."""
    if impl == "mmap":
        builder = ix.MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    else:
        builder = ix.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        for item in doc:
            builder.add_item(np.asarray(item, dtype=np.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def docs_of(num_docs, seed=0, eod=None, max_len=40):
    """Random one-item documents over ids [0, 998); each ends with `eod` when given."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(num_docs):
        tokens = rng.randint(0, EOD - 1, size=rng.randint(3, max_len)).tolist()
        docs.append([tokens + ([eod] if eod is not None else [])])
    return docs


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------- .bin size


@pytest.mark.parametrize("impl", ["mmap", "lazy", "cached"])
def test_a_larger_bin_of_another_dataset_is_rejected(tmp_path, impl):
    fmt = "mmap" if impl == "mmap" else "lazy"
    small = write(str(tmp_path / "small"), docs_of(5, seed=1), fmt)
    big = write(str(tmp_path / "big"), docs_of(9, seed=2), fmt)
    shutil.copyfile(big + ".bin", small + ".bin")
    with pytest.raises(ix.IndexedDatasetError) as err:
        ix.make_dataset(small, impl, skip_warmup=True)
    message = one_line(err)
    assert small + ".bin" in message and small + ".idx" in message
    assert "more than" in message and "different datasets" in message


@pytest.mark.parametrize("impl", ["mmap", "lazy"])
def test_a_truncated_bin_names_both_files(tmp_path, impl):
    prefix = write(str(tmp_path / "d"), docs_of(4), impl)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(ix.IndexedDatasetError) as err:
        ix.make_dataset(prefix, impl, skip_warmup=True)
    message = one_line(err)
    assert message.startswith(prefix + ".bin: truncated data file") and prefix + ".idx" in message


def test_one_extra_token_per_document_is_named(tmp_path):
    """Sizes that leave out each document's eod while the .bin holds it."""
    prefix = str(tmp_path / "d")
    docs = docs_of(6, eod=EOD)
    with open(prefix + ".bin", "wb") as f:
        for (tokens,) in docs:
            f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    with open(prefix + ".idx", "wb") as f:
        sizes = np.array([len(t) - 1 for (t,) in docs])
        ix.MMapIndexedDataset.Index.write_index(f, np.uint16, sizes, np.arange(7))
    with pytest.raises(ix.IndexedDatasetError, match="one token more per document"):
        ix.make_dataset(prefix, "mmap", skip_warmup=True)


def test_merging_refuses_a_larger_bin(tmp_path):
    small = write(str(tmp_path / "small"), docs_of(3, seed=1))
    big = write(str(tmp_path / "big"), docs_of(8, seed=2))
    shutil.copyfile(big + ".bin", small + ".bin")
    with ix.MMapIndexedDatasetBuilder(str(tmp_path / "out.bin"), dtype=np.uint16) as builder:
        with pytest.raises(ix.IndexedDatasetError, match=re.escape(small + ".idx")):
            builder.merge_file_(small)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.tmp").exists()


def test_an_exact_bin_and_an_empty_dataset_open(tmp_path):
    assert len(ix.make_dataset(write(str(tmp_path / "d"), docs_of(4)), "mmap", True)) == 4
    assert len(ix.make_dataset(write(str(tmp_path / "e"), []), "mmap", True)) == 0


# ----------------------------------------------------------------------- eod placement


def recut(prefix, docs, out):
    """`out`: the data of `prefix` under an index whose documents are cut elsewhere (the same
    number of tokens, so the sizes match)."""
    sizes = np.array([len(t) for (t,) in docs])
    rolled = np.roll(sizes, 1)  # same total, every boundary moved
    with open(out + ".idx", "wb") as f:
        ix.MMapIndexedDataset.Index.write_index(f, np.uint16, rolled, np.arange(len(docs) + 1))
    shutil.copyfile(prefix + ".bin", out + ".bin")
    return out


def test_an_index_cutting_eod_documents_elsewhere_is_rejected(tmp_path):
    docs = docs_of(40, eod=EOD)
    good = write(str(tmp_path / "good"), docs)
    bad = recut(good, docs, str(tmp_path / "bad"))
    ix.check_document_ends(ix.make_dataset(good, "mmap", True), good, EOD)
    with pytest.raises(ix.IndexedDatasetError) as err:
        ix.check_document_ends(ix.make_dataset(bad, "mmap", True), bad, EOD)
    message = one_line(err)
    assert bad + ".idx" in message and bad + ".bin" in message
    assert "does not end with it" in message
    # the GPT builder runs the check when it knows the eod
    with pytest.raises(ix.IndexedDatasetError, match="does not describe"):
        gpt_dataset.build_train_valid_test_datasets(
            [bad], "mmap", "1", [10, 0, 0], 8, 1, True, eod_token=EOD
        )


@pytest.mark.parametrize("kind", ["no_eod", "merged", "few_eod", "sentences", "lazy"])
def test_valid_corpora_pass_the_eod_check(tmp_path, kind):
    prefix = str(tmp_path / kind)
    impl = "lazy" if kind == "lazy" else "mmap"
    if kind == "no_eod":  # written without --append-eod: no eod anywhere
        docs = docs_of(30)
    elif kind == "merged":  # a corpus with eod merged with one without
        docs = docs_of(20, eod=EOD) + docs_of(20, seed=3)
    elif kind == "few_eod":  # synthetic ids that hit the eod id inside a few documents
        docs = docs_of(30, seed=4)
        for d in (2, 9):
            docs[d][0][1] = EOD
    elif kind == "sentences":  # sentence items, the eod ends each document's last one
        docs = [[[1, 2, 3], [4, 5], [6, EOD]] for _ in range(10)]
    else:
        docs = docs_of(12, eod=EOD)
    write(prefix, docs, impl)
    ix.check_document_ends(ix.make_dataset(prefix, impl, True), prefix, EOD)


def test_the_lazy_format_is_checked_too(tmp_path):
    docs = docs_of(20, eod=EOD)
    prefix = write(str(tmp_path / "lazy"), docs, "lazy")
    dataset = ix.make_dataset(prefix, "lazy", True)
    dataset.data_offsets[1:] = np.cumsum(np.roll([len(t) for (t,) in docs], 1))
    with pytest.raises(ix.IndexedDatasetError, match="does not end with it"):
        ix.check_document_ends(dataset, prefix, EOD)


@pytest.mark.real_vocab
def test_the_eod_comes_from_a_tokenizer_that_text_cannot_produce(monkeypatch, vocab_dir):
    from megatron import global_vars
    from megatron.tokenizer import build_tokenizer

    def tokenizer(**kw):
        args = argparse.Namespace(rank=1, make_vocab_size_divisible_by=128,
                                  tensor_model_parallel_size=1, **kw)  # fmt: skip
        return build_tokenizer(args)

    gpt2 = tokenizer(tokenizer_type="GPT2BPETokenizer",
                     vocab_file=os.path.join(vocab_dir, "gpt2-vocab.json"),
                     merge_file=os.path.join(vocab_dir, "gpt2-merges.txt"))  # fmt: skip
    monkeypatch.setattr(global_vars, "_GLOBAL_TOKENIZER", gpt2)
    assert dataset_utils.tokenizer_eod_token() == gpt2.eod == 50256
    # ids are text to the NullTokenizer: its eod can come from the input, so no check
    monkeypatch.setattr(global_vars, "_GLOBAL_TOKENIZER", tokenizer(tokenizer_type="NullTokenizer",
                                                                    vocab_size=100))
    assert dataset_utils.tokenizer_eod_token() is None
    monkeypatch.setattr(global_vars, "_GLOBAL_TOKENIZER", None)
    assert dataset_utils.tokenizer_eod_token() is None


# ----------------------------------------------------------------- training documents


@pytest.fixture
def corpus(tmp_path):
    return write(str(tmp_path / "corpus_text_document"), docs_of(12, eod=EOD))


def test_no_training_documents_from_the_split(corpus):
    with pytest.raises(DataPathError) as err:
        gpt_dataset.build_train_valid_test_datasets([corpus], "mmap", "0,50,50", [16, 4, 4], 8,
                                                    1, True)  # fmt: skip
    assert one_line(err) == (
        f"no training documents: --split 0,50,50 gives the train split 0 of 12 documents "
        f"of {corpus}"
    )
    # evaluation only (no training samples asked for) is fine
    train, valid, test = gpt_dataset.build_train_valid_test_datasets(
        [corpus], "mmap", "0,50,50", [0, 4, 4], 8, 1, True
    )
    assert train is None and valid is not None and test is not None


def test_a_zero_weight_split_gets_no_documents():
    """The rounding error goes to the first split of positive weight: never a training
    document out of --split 0,50,50, never a negative boundary."""
    split = dataset_utils.get_train_valid_test_split_
    assert split("0,50,50", 69) == [0, 0, 35, 69]
    assert split("0,50,50", 3) == [0, 0, 1, 3]
    assert split("0,1,0", 5) == [0, 0, 5, 5]
    # a positive train weight keeps the usual boundaries
    assert split("949,50,1", 69) == [0, 66, 69, 69]
    assert split("1,1,1", 10) == [0, 4, 7, 10]


def test_no_training_documents_in_an_empty_corpus(tmp_path):
    empty = write(str(tmp_path / "empty"), [])
    with pytest.raises(DataPathError, match=f"train split 0 of 0 documents of {re.escape(empty)}"):
        gpt_dataset.build_train_valid_test_datasets([empty], "mmap", "1", [8, 0, 0], 8, 1, True)
    with pytest.raises(DataPathError, match=f"--train-data-path {re.escape(empty)} holds 0"):
        gpt_dataset.build_train_valid_test_datasets(
            None, "mmap", "1", [8, 0, 0], 8, 1, True, train_data_prefix=[empty]
        )


def test_blends_name_the_corpus_without_training_documents(corpus, tmp_path):
    other = write(str(tmp_path / "other"), docs_of(12, seed=5, eod=EOD))
    with pytest.raises(DataPathError, match=f"0 of 12 documents of {re.escape(corpus)}"):
        gpt_dataset.build_train_valid_test_datasets(
            ["0.5", corpus, "0.5", other], "mmap", "0,1,1", [16, 4, 4], 8, 1, True
        )
    with pytest.raises(DataPathError) as err:
        gpt_dataset.build_train_valid_test_datasets(
            ["0.5", corpus, "0", other], "mmap", "1", [16, 0, 0], 8, 1, True
        )
    assert one_line(err) == (
        f"--data-path: weight '0' of {other} must be a positive number "
        "(leave out a corpus instead of giving it weight 0)"
    )


def test_bert_and_t5_builders_need_training_documents(tmp_path):
    prefix = write(str(tmp_path / "bert"), [[[5, 6, 7], [8, 9]] for _ in range(10)])
    with pytest.raises(DataPathError, match="--split 0,50,50 gives the train split 0 of 10"):
        dataset_utils.build_train_valid_test_datasets(
            [prefix], "mmap", "0,50,50", [8, 2, 2], 16, 0.15, 0.1, 1, True
        )


# ------------------------------------------------------------------- check_data_paths


def flags(**kw):
    base = dict(data_path=None, train_data_path=None, valid_data_path=None,
                test_data_path=None, split="969, 30, 1", data_impl="infer",
                train_iters=10, train_samples=None)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_check_data_paths_accepts_good_flags(corpus, tmp_path):
    other = write(str(tmp_path / "other"), docs_of(12, seed=5, eod=EOD))
    check_data_paths(flags(data_path=[corpus]), eod_token=EOD)
    check_data_paths(flags(data_path=["0.3", corpus, "0.7", other]))
    check_data_paths(flags(train_data_path=[corpus], valid_data_path=["1", other, "2", corpus]))
    check_data_paths(flags())  # no data flags: a provider that needs none
    check_data_paths(flags(data_path=[corpus], split="0,50,50", train_iters=0))


CHECK_CASES = [
    ("missing_bin", "--data-path: {p}.bin not found (dataset prefix {p})"),
    ("suffix", "--data-path: {p}.bin.idx and {p}.bin.bin not found (dataset prefix "
               "{p}.bin); give the prefix without .bin: {p}"),
    ("zero_weight", "--data-path: weight '0' of {p} must be a positive number"),
    ("bad_weight", "--data-path: weight 'heavy' of {p} must be a positive number"),
    ("odd_list", "--data-path: weighted list ['1', '{p}', '2'] must alternate"),
    ("split", "no training documents: --split 0,50,50 gives the train split 0 of 12 "
              "documents of {p}"),
    ("train_path", "no training documents: --train-data-path {e} holds 0 documents"),
    ("samples", "no training documents: --split 0,1 gives the train split 0"),
]  # fmt: skip


@pytest.mark.parametrize("case,expected", CHECK_CASES, ids=[c for c, _ in CHECK_CASES])
def test_check_data_paths_errors(corpus, tmp_path, case, expected):
    empty = write(str(tmp_path / "empty"), [])
    args = {
        "missing_bin": flags(data_path=[corpus]),
        "suffix": flags(data_path=[corpus + ".bin"]),
        "zero_weight": flags(data_path=["1", empty, "0", corpus]),
        "bad_weight": flags(valid_data_path=["heavy", corpus]),
        "odd_list": flags(data_path=["1", corpus, "2"]),
        "split": flags(data_path=["1", corpus], split="0,50,50"),
        "train_path": flags(train_data_path=[empty]),
        "samples": flags(data_path=[corpus], split="0,1", train_iters=None, train_samples=64),
    }[case]
    if case == "missing_bin":
        os.remove(corpus + ".bin")
    if case == "bad_weight":
        expected = expected.replace("--data-path", "--valid-data-path")
    with pytest.raises(DataPathError) as err:
        check_data_paths(args, eod_token=None)
    assert one_line(err).startswith(expected.format(p=corpus, e=empty))


def test_check_data_paths_opens_the_files(corpus, tmp_path):
    docs = docs_of(40, eod=EOD)
    good = write(str(tmp_path / "good"), docs)
    bad = recut(good, docs, str(tmp_path / "bad"))
    with pytest.raises(ix.IndexedDatasetError, match="does not end with it"):
        check_data_paths(flags(data_path=[bad]), eod_token=EOD)
    with open(corpus + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ix.IndexedDatasetError, match=re.escape(corpus + ".idx")):
        check_data_paths(flags(test_data_path=[corpus]))
