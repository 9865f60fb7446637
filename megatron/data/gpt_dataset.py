"""GPT pretraining dataset: fixed-length windows over a shuffled stream of documents.

The documents of a split, repeated for as many epochs as ``num_samples`` needs and
shuffled per epoch (``doc_idx``), form one token stream. Sample k is the seq_length + 1
tokens starting at ``sample_idx[k]`` = (position in doc_idx, token offset); consecutive
samples overlap by one token (the last label of one is the first input of the next).
``shuffle_idx`` permutes the samples. The three indices are cached next to the data as
``{prefix}_{name}_indexmap_{N}ns_{L}sl_{seed}s_{doc,sample,shuffle}_idx.npy``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron import print_rank_0
from megatron.data.dataset_utils import (
    DataPathError,
    build_or_load_caches,
    cache_prefix,
    get_datasets_weights_and_num_samples,
    get_indexed_dataset_,
    get_train_valid_test_split_,
    require_train_documents,
    tokenizer_eod_token,
)

_SPLIT_NAMES = ("train", "valid", "test")


def build_train_valid_test_datasets(
    data_prefix: Sequence[str] | None,
    data_impl: str,
    splits_string: str,
    train_valid_test_num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    skip_warmup: bool,
    train_data_prefix: Sequence[str] | None = None,
    valid_data_prefix: Sequence[str] | None = None,
    test_data_prefix: Sequence[str] | None = None,
    eod_token: int | None | str = "tokenizer",
):
    """(train, valid, test) GPT datasets; a valid/test split with no documents is None.

    ``data_prefix`` is ``[prefix]`` or ``[w0, prefix0, w1, prefix1, ...]`` (blended with
    normalised weights, each dataset asked for ceil(n * w * 1.005) samples) and is cut
    into documents by ``splits_string``. Alternatively ``train/valid/test_data_prefix``
    (``--train-data-path`` etc.) give each split its own, whole, corpora. Asking for
    training samples when a corpus leaves no document to the train split raises
    ``DataPathError``. ``eod_token`` ("tokenizer": the built tokenizer's, see
    ``dataset_utils.tokenizer_eod_token``; None: no check) turns on the check of
    end-of-document tokens at open time.
    """
    if eod_token == "tokenizer":
        eod_token = tokenizer_eod_token()
    opts = dict(data_impl=data_impl, seq_length=seq_length, seed=seed,
                skip_warmup=skip_warmup, eod_token=eod_token)  # fmt: skip
    if isinstance(data_prefix, str):
        data_prefix = [data_prefix]
    if data_prefix:
        if len(data_prefix) == 1:
            return _build_train_valid_test_datasets(
                data_prefix[0], splits_string, train_valid_test_num_samples, **opts
            )
        prefixes, weights, per_dataset = get_datasets_weights_and_num_samples(
            data_prefix, train_valid_test_num_samples
        )
        per_split: list[list] = [[], [], []]
        missing: list[list[str]] = [[], [], []]
        for prefix, num_samples in zip(prefixes, per_dataset):
            datasets = _build_train_valid_test_datasets(prefix, splits_string, num_samples, **opts)
            for i, ds in enumerate(datasets):
                if ds is not None:
                    per_split[i].append(ds)
                else:
                    missing[i].append(prefix)
        return tuple(
            _blend(dsets, weights, n, name, gaps, splits_string)
            for dsets, gaps, n, name in zip(
                per_split, missing, train_valid_test_num_samples, _SPLIT_NAMES
            )
        )
    separate = (train_data_prefix, valid_data_prefix, test_data_prefix)
    if not any(separate):
        raise DataPathError(
            "need --data-path or --train-data-path/--valid-data-path/--test-data-path"
        )
    return tuple(
        _build_dataset(name, [prefix] if isinstance(prefix, str) else prefix, n, **opts)
        if prefix
        else None
        for name, prefix, n in zip(_SPLIT_NAMES, separate, train_valid_test_num_samples)
    )


def build_dataset_group(
    dataset_group_name: str,
    paths: Sequence[str],
    weights: Sequence[float],
    splits: Sequence[str],
    data_impl: str,
    train_valid_test_num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    skip_warmup: bool,
    train_valid_test: str,
    eod_token: int | None | str = "tokenizer",
):
    """One blended dataset for split ``train_valid_test`` ('train' | 'valid' | 'test')
    named ``dataset_group_name``: corpus i contributes the part of its documents that its
    own split string ``splits[i]`` gives that split, with weight ``weights[i]``."""
    if train_valid_test not in _SPLIT_NAMES:
        raise ValueError(
            f"train_valid_test must be one of {_SPLIT_NAMES}, got {train_valid_test!r}"
        )
    if not (len(paths) == len(weights) == len(splits)) or not paths:
        raise ValueError(
            f"dataset group {dataset_group_name}: paths, weights and splits must be non-empty "
            f"and of equal length ({len(paths)}, {len(weights)}, {len(splits)})"
        )
    if eod_token == "tokenizer":
        eod_token = tokenizer_eod_token()
    index = _SPLIT_NAMES.index(train_valid_test)
    flat = [x for w, p in zip(weights, paths) for x in (str(w), p)]
    _, norm_weights, per_dataset = get_datasets_weights_and_num_samples(
        flat, train_valid_test_num_samples
    )
    datasets = []
    for path, split, num_samples in zip(paths, splits, per_dataset):
        indexed_dataset = get_indexed_dataset_(path, data_impl, skip_warmup, eod_token)
        bounds = get_train_valid_test_split_(split, indexed_dataset.sizes.shape[0])
        documents = np.arange(bounds[index], bounds[index + 1], dtype=np.int32)
        if documents.size == 0:
            raise DataPathError(
                f"dataset group {dataset_group_name}: split {split!r} of {path} "
                f"gives no documents to {train_valid_test}"
            )
        name = f"{dataset_group_name}_{train_valid_test}"
        datasets.append(GPTDataset(name, path, documents, indexed_dataset,
                                   num_samples[index], seq_length, seed))  # fmt: skip
    if len(datasets) == 1:
        return datasets[0]
    return _blend(datasets, norm_weights, train_valid_test_num_samples[index], dataset_group_name)


def _blend(datasets, weights, num_samples, name, missing=(), splits_string=None):
    from megatron.data.blendable_dataset import BlendableDataset

    if not datasets:
        return None
    if missing or len(datasets) != len(weights):
        where = f" (--split {splits_string})" if splits_string else ""
        raise DataPathError(
            f"--data-path: the {name} split{where} gets no documents of "
            f"{', '.join(missing) or 'some blended corpora'} but some of the others; give "
            "every blended corpus documents in that split, or none of them"
        )
    return BlendableDataset(datasets, weights, size=num_samples)


def _build_dataset(name, data_prefix, num_samples, data_impl, seq_length, seed, skip_warmup,
                   eod_token):  # fmt: skip
    """A whole corpus (or a weighted list of them) as the one dataset of split ``name``;
    None when the split asks for no samples."""
    if num_samples <= 0:
        return None
    opts = dict(data_impl=data_impl, seq_length=seq_length, seed=seed,
                skip_warmup=skip_warmup, eod_token=eod_token)  # fmt: skip
    if len(data_prefix) == 1:
        prefix = data_prefix[0]
        indexed_dataset = get_indexed_dataset_(prefix, data_impl, skip_warmup, eod_token)
        num_docs = indexed_dataset.sizes.shape[0]
        if num_docs == 0:
            raise DataPathError(
                f"no {'training' if name == 'train' else name} documents: "
                f"--{name}-data-path {prefix} holds 0 documents"
            )
        documents = np.arange(num_docs, dtype=np.int32)
        return GPTDataset(name, prefix, documents, indexed_dataset, num_samples,
                          seq_length, seed)  # fmt: skip
    prefixes, weights, per_dataset = get_datasets_weights_and_num_samples(
        data_prefix, [num_samples]
    )
    datasets = [_build_dataset(name, [p], n[0], **opts) for p, n in zip(prefixes, per_dataset)]
    return _blend(datasets, weights, num_samples, name)


def _build_train_valid_test_datasets(
    data_prefix, splits_string, train_valid_test_num_samples, data_impl, seq_length, seed,
    skip_warmup, eod_token,
):  # fmt: skip
    indexed_dataset = get_indexed_dataset_(data_prefix, data_impl, skip_warmup, eod_token)
    total_num_of_documents = indexed_dataset.sizes.shape[0]
    if train_valid_test_num_samples[0] > 0:
        splits = require_train_documents(data_prefix, splits_string, total_num_of_documents)
    else:
        splits = get_train_valid_test_split_(splits_string, total_num_of_documents)
    print_rank_0(f" > dataset split of {data_prefix}: documents {splits}")

    def build(index: int):
        if splits[index + 1] <= splits[index] or train_valid_test_num_samples[index] <= 0:
            return None
        documents = np.arange(splits[index], splits[index + 1], dtype=np.int32)
        return GPTDataset(_SPLIT_NAMES[index], data_prefix, documents, indexed_dataset,
                          train_valid_test_num_samples[index], seq_length, seed)  # fmt: skip

    return build(0), build(1), build(2)


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{'text': int64 [seq_length + 1]}`` over the documents ``documents``
    (indices into ``indexed_dataset``), at least ``num_samples`` of them."""

    def __init__(
        self,
        name: str,
        data_prefix: str,
        documents: np.ndarray,
        indexed_dataset,
        num_samples: int,
        seq_length: int,
        seed: int,
    ):
        self.name = name
        self.indexed_dataset = indexed_dataset
        documents = np.asarray(documents)
        num_docs = indexed_dataset.sizes.shape[0]
        if documents.size == 0 or documents.min() < 0 or documents.max() >= num_docs:
            raise ValueError(
                f"{data_prefix}: documents of split {name} must be a non-empty subset of "
                f"[0, {num_docs})"
            )
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"{name}: seq_length ({seq_length}) and num_samples "
                             f"({num_samples}) must be positive")  # fmt: skip
        self.doc_idx, self.sample_idx, self.shuffle_idx = _build_index_mappings(
            name, data_prefix, documents, indexed_dataset.sizes, num_samples, seq_length, seed
        )

    def __len__(self) -> int:
        # sample i spans [sample_idx[i], sample_idx[i + 1]]
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> dict:
        idx = int(self.shuffle_idx[idx])
        doc_f, offset_f = (int(x) for x in self.sample_idx[idx])
        doc_l, offset_l = (int(x) for x in self.sample_idx[idx + 1])
        if doc_f == doc_l:
            sample = self.indexed_dataset.get(
                int(self.doc_idx[doc_f]), offset=offset_f, length=offset_l - offset_f + 1
            )
        else:
            parts = [self.indexed_dataset.get(int(self.doc_idx[doc_f]), offset=offset_f)]
            for i in range(doc_f + 1, doc_l):
                parts.append(self.indexed_dataset.get(int(self.doc_idx[i])))
            parts.append(self.indexed_dataset.get(int(self.doc_idx[doc_l]), length=offset_l + 1))
            sample = np.concatenate(parts)
        return {"text": np.asarray(sample, dtype=np.int64)}


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream holds num_samples windows: (E*T - 1) // L >= N."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def _separate_last_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int) -> bool:
    """Megatron's rule: shuffle the last epoch apart from the others when it contributes
    fewer than 80% of an epoch's samples (so a partial epoch does not dilute the
    shuffle of the full ones)."""
    num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    if num_epochs == 1:
        return False
    from_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - from_full_epochs
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    return last_epoch_samples < int(0.80 * samples_per_epoch)


def _build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch) -> np.ndarray:
    """``documents`` repeated num_epochs times, shuffled (the last epoch apart)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(documents.astype(np.int32), num_epochs)
        np_rng.shuffle(doc_idx)
        return doc_idx
    first = _build_doc_idx(documents, num_epochs - 1, np_rng, False)
    last = _build_doc_idx(documents, 1, np_rng, False)
    return np.concatenate((first, last))


def _build_shuffle_idx(num_samples: int, total_size: int, np_rng) -> np.ndarray:
    """Permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    np_rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    np_rng.shuffle(last)
    return np.concatenate((first, last))


def index_cache_paths(
    data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int
) -> list[str]:
    """The doc/sample/shuffle index cache files of one GPT dataset."""
    base = f"{cache_prefix(data_prefix)}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    return [f"{base}_doc_idx.npy", f"{base}_sample_idx.npy", f"{base}_shuffle_idx.npy"]


def _build_index_mappings(name, data_prefix, documents, sizes, num_samples, seq_length, seed):
    """doc_idx [E * D], sample_idx [S + 1, 2], shuffle_idx [S] with S = (E*T - 1) // L,
    T the tokens of one epoch and E the number of epochs; cached (see module doc)."""
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch < 2:
        raise ValueError(f"{data_prefix}: split {name} holds {tokens_per_epoch} tokens, need > 1")
    num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate_last_epoch = _separate_last_epoch(tokens_per_epoch, seq_length, num_samples)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    paths = index_cache_paths(data_prefix, name, num_samples, seq_length, seed)

    def build():
        np_rng = np.random.RandomState(seed=seed)
        doc_idx = _build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch)
        from megatron.data._helpers import get_helpers

        sample_idx = get_helpers().build_sample_idx(
            np.asarray(sizes, dtype=np.int32), doc_idx, seq_length, num_epochs, tokens_per_epoch
        )
        if separate_last_epoch:
            first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        else:
            first = total_samples
        shuffle_idx = _build_shuffle_idx(first, total_samples, np_rng)
        return [doc_idx, sample_idx, shuffle_idx]

    def validate(arrays):
        doc_idx, sample_idx, shuffle_idx = arrays
        expected = {
            paths[0]: (doc_idx.shape, (num_epochs * len(documents),)),
            paths[1]: (sample_idx.shape, (total_samples + 1, 2)),
            paths[2]: (shuffle_idx.shape, (total_samples,)),
        }
        for path, (shape, want) in expected.items():
            if tuple(shape) != want:
                raise ValueError(f"index cache {path} has shape {tuple(shape)}, expected {want}")
        if int(sample_idx[-1, 0]) >= doc_idx.shape[0]:
            raise ValueError(f"index cache {paths[1]} points past the end of {paths[0]}")

    print_rank_0(
        f" > {name}: {tokens_per_epoch} tokens per epoch, {num_epochs} epoch(s), "
        f"{total_samples} samples{' (last epoch shuffled apart)' if separate_last_epoch else ''}"
    )
    return build_or_load_caches(paths, build, validate)
