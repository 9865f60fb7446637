"""Random-token GPT datasets for `--mock-data`: training without any data files.

Each sample is ``{"text": int64 array of seq_length + 1 ids}``, the GPT dataset's sample
format. Sample ``i`` of a split depends only on (seed, split, i): the same seed gives the
same samples in any order of access, on any rank and in any worker. Ids are drawn
uniformly from ``[0, vocab_size)`` except ``eod``, so no sample holds an end-of-document
token and masks and position ids are those of one long document. Needs numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SPLIT_NAMES = ("train", "valid", "test")


class MockGPTDataset:
    """`num_samples` random samples of `seq_length` + 1 ids in [0, vocab_size) \\ {eod}."""

    def __init__(self, name: str, num_samples: int, seq_length: int, vocab_size: int,
                 seed: int, eod: int | None = None):
        _check_sizes(num_samples, seq_length, vocab_size, eod)
        self.name = name
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.eod = eod if eod is not None and 0 <= eod < vocab_size else None
        self._split = _SPLIT_NAMES.index(name) if name in _SPLIT_NAMES else len(_SPLIT_NAMES)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not -self.num_samples <= idx < self.num_samples:
            raise IndexError(f"{self.name} mock sample {idx} out of range({self.num_samples})")
        idx %= self.num_samples
        rng = np.random.default_rng([self.seed, self._split, idx])
        return {"text": self._draw(rng)}

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        size = self.seq_length + 1
        if self.eod is None:
            return rng.integers(0, self.vocab_size, size=size, dtype=np.int64)
        ids = rng.integers(0, self.vocab_size - 1, size=size, dtype=np.int64)
        ids[ids >= self.eod] += 1  # skip the eod id
        return ids


def _check_sizes(num_samples: int, seq_length: int, vocab_size: int, eod: int | None) -> None:
    if num_samples < 0:
        raise ValueError(f"--mock-data: number of samples must be >= 0, got {num_samples}")
    if seq_length < 1:
        raise ValueError(f"--mock-data: --seq-length must be >= 1, got {seq_length}")
    usable = vocab_size - (1 if eod is not None and 0 <= eod < vocab_size else 0)
    if usable < 1:
        raise ValueError(
            f"--mock-data: the tokenizer's vocabulary ({vocab_size}) has no id but eod to draw"
        )


def build_mock_train_valid_test_datasets(
    train_valid_test_num_samples: Sequence[int],
    seq_length: int,
    vocab_size: int,
    seed: int,
    eod: int | None = None,
) -> tuple[MockGPTDataset | None, ...]:
    """(train, valid, test) mock datasets of the asked sizes; a split asked for 0 samples
    is None, as a GPT split with no documents is."""
    return tuple(
        MockGPTDataset(name, n, seq_length, vocab_size, seed, eod) if n > 0 else None
        for name, n in zip(_SPLIT_NAMES, train_valid_test_num_samples)
    )
