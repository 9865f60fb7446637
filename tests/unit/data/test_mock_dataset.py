"""--mock-data: random-token GPT datasets, the flag's parsing, and pretrain_gpt.py's
datasets provider choosing them (no data files, no process group)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data.mock_dataset import MockGPTDataset, build_mock_train_valid_test_datasets

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_samples_have_the_gpt_format_and_skip_eod():
    ds = MockGPTDataset("train", 50, seq_length=16, vocab_size=11, seed=3, eod=10)
    assert len(ds) == 50
    samples = [ds[i]["text"] for i in range(len(ds))]
    for s in samples:
        assert s.dtype == np.int64 and s.shape == (17,)
    ids = np.concatenate(samples)
    assert ids.min() == 0 and ids.max() == 9  # eod (10) never drawn, every other id is
    assert len(np.unique(ids)) == 10
    middle = MockGPTDataset("train", 400, 16, vocab_size=11, seed=3, eod=4)
    drawn = np.unique(np.concatenate([middle[i]["text"] for i in range(400)]))
    assert drawn.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert ds[-1]["text"].tolist() == ds[49]["text"].tolist()
    with pytest.raises(IndexError, match="train mock sample 50 out of range"):
        ds[50]


def test_deterministic_per_seed_split_and_index():
    a = MockGPTDataset("train", 20, 8, 100, seed=1234)
    b = MockGPTDataset("train", 1000, 8, 100, seed=1234)
    order = [7, 3, 19, 0, 7]
    assert [a[i]["text"].tolist() for i in order] == [b[i]["text"].tolist() for i in order]
    other_seed = MockGPTDataset("train", 20, 8, 100, seed=1235)
    valid = MockGPTDataset("valid", 20, 8, 100, seed=1234)
    assert a[0]["text"].tolist() != other_seed[0]["text"].tolist()
    assert a[0]["text"].tolist() != valid[0]["text"].tolist()
    assert a[0]["text"].tolist() != a[1]["text"].tolist()


def test_build_three_splits():
    train, valid, test = build_mock_train_valid_test_datasets([40, 8, 0], 32, 50, seed=5, eod=49)
    assert (len(train), len(valid), test) == (40, 8, None)
    assert train[0]["text"].shape == (33,) and int(train[0]["text"].max()) < 49


def test_bad_sizes():
    with pytest.raises(ValueError, match="--seq-length must be >= 1"):
        MockGPTDataset("train", 1, 0, 10, seed=0)
    with pytest.raises(ValueError, match="has no id but eod"):
        MockGPTDataset("train", 1, 4, 1, seed=0, eod=0)


# ------------------------------------------------------------------ flags


@pytest.fixture(scope="module")
def parser():
    from megatron.arguments import build_parser

    return build_parser()


def test_mock_data_flag(parser):
    args = parser.parse_args(["--mock-data"])
    assert args.mock_data is True and args.data_path is None
    args = parser.parse_args(["--data-path", "corpus_text_document"])
    assert args.mock_data is False and args.data_path == ["corpus_text_document"]


def test_mock_data_and_data_path_together_is_an_error(parser, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--data-path", "corpus", "--mock-data"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]
    assert "--mock-data" in err[0] and "--data-path" in err[0]


def test_check_data_paths_accepts_mock_data_without_data_path(parser):
    from megatron.data.dataset_utils import check_data_paths

    args = parser.parse_args(["--mock-data", "--train-iters", "10"])
    check_data_paths(args, eod_token=None)


# ------------------------------------------------------------------ pretrain_gpt's provider


@pytest.fixture
def provider(monkeypatch):
    """pretrain_gpt.train_valid_test_datasets_provider with args and tokenizer set."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron import global_vars
    from megatron.tokenizer.tokenizer import _NullTokenizer

    def use(**flags):
        base = dict(mock_data=True, seq_length=16, seed=7, data_path=None,
                    train_data_path=None, valid_data_path=None, test_data_path=None)
        base.update(flags)
        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", SimpleNamespace(**base))
        monkeypatch.setattr(global_vars, "_GLOBAL_TOKENIZER", _NullTokenizer(100))
        return pretrain_gpt.train_valid_test_datasets_provider

    return use


def test_provider_builds_mock_datasets(provider):
    train, valid, test = provider()([64, 16, 8])
    assert (len(train), len(valid), len(test)) == (64, 16, 8)
    ids = np.concatenate([train[i]["text"] for i in range(64)])
    assert train[0]["text"].shape == (17,) and ids.max() == 99  # NullTokenizer eod is 100
    again, _, _ = provider()([64, 16, 8])
    assert again[5]["text"].tolist() == train[5]["text"].tolist()


def test_provider_errors_name_the_flags(provider):
    from megatron.data.dataset_utils import DataPathError

    with pytest.raises(DataPathError, match="--mock-data and --train-data-path both given"):
        provider(train_data_path=["corpus"])([8, 0, 0])
    with pytest.raises(DataPathError, match="give --data-path .* or --mock-data"):
        provider(mock_data=False)([8, 0, 0])
