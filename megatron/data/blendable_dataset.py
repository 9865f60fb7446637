"""A weighted mixture of datasets (``--data-path 0.3 a 0.7 b``)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from megatron import print_rank_0


class BlendableDataset(torch.utils.data.Dataset):
    """Sample i of the blend is sample ``dataset_sample_index[i]`` of dataset
    ``dataset_index[i]``.

    Assignment is greedy and deterministic (``helpers.build_blending_indices``): sample i
    goes to the dataset d whose count lags furthest behind w_d * i, so after any prefix
    of n samples dataset d holds within about one sample of w_d * n, and each dataset is
    read in its own order 0, 1, 2, ... ``size`` defaults to the sum of the dataset
    lengths (Megatron's choice); pass the number of samples training needs to keep the
    blend within every dataset.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int | None = None,
    ):
        if not datasets or len(datasets) != len(weights):
            raise ValueError(
                f"BlendableDataset: {len(datasets)} datasets but {len(weights)} weights"
            )
        if len(datasets) > 256:  # dataset_index is uint8
            raise ValueError(f"BlendableDataset: at most 256 datasets, got {len(datasets)}")
        weights = np.array(weights, dtype=np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"BlendableDataset: weights {weights.tolist()} must be >= 0, sum > 0")
        self.datasets = list(datasets)
        self.weights = weights / weights.sum()
        self.size = int(sum(len(d) for d in datasets) if size is None else size)

        start = time.time()
        self.dataset_index = np.zeros(self.size, dtype=np.uint8)  # [size]
        self.dataset_sample_index = np.zeros(self.size, dtype=np.int64)  # [size]
        from megatron.data._helpers import get_helpers
        from megatron.data.dataset_utils import global_rank

        get_helpers().build_blending_indices(
            self.dataset_index,
            self.dataset_sample_index,
            self.weights,
            len(self.datasets),
            self.size,
            global_rank() == 0,
        )
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise ValueError(
                    f"BlendableDataset: the blend of {self.size} samples needs {count} from "
                    f"dataset {d} (weight {self.weights[d]:.4f}) but it has only {len(dataset)}"
                )
        print_rank_0(
            f" > blended {len(self.datasets)} datasets into {self.size} samples "
            f"({time.time() - start:.2f} s)"
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        dataset_idx = self.dataset_index[idx]
        sample_idx = self.dataset_sample_index[idx]
        return self.datasets[dataset_idx][int(sample_idx)]
