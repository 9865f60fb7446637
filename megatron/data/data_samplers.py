"""Batch samplers for pretraining: each data-parallel rank gets its micro-batch of every
global step, and training resumes exactly where it stopped (``consumed_samples``)."""

from __future__ import annotations

from typing import Iterator

import torch


def build_pretraining_data_loader(dataset, consumed_samples: int):
    """DataLoader over ``dataset`` for this data-parallel rank, starting after
    ``consumed_samples`` (``--dataloader-type single`` reads the samples in order once,
    ``cyclic`` reshuffles every epoch). None when ``dataset`` is None."""
    if dataset is None:
        return None
    from megatron import get_args, mpu
    from megatron.accelerator import is_gpu

    args = get_args()
    common = dict(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=args.micro_batch_size,
        data_parallel_rank=mpu.get_data_parallel_rank(),
        data_parallel_size=mpu.get_data_parallel_world_size(),
    )
    dataloader_type = getattr(args, "dataloader_type", "single") or "single"
    repeated = bool(getattr(args, "repeated_dataloader", False))
    if repeated and dataloader_type == "single":
        # a resumed run continues inside the current pass over the data
        common["consumed_samples"] = consumed_samples % _samples_per_pass(
            len(dataset), common["micro_batch_size"] * common["data_parallel_size"])
    if dataloader_type == "single":
        batch_sampler = MegatronPretrainingSampler(**common)
    elif dataloader_type == "cyclic":
        batch_sampler = MegatronPretrainingRandomSampler(**common)
    else:
        raise ValueError(f"--dataloader-type must be 'single' or 'cyclic', got {dataloader_type!r}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=args.num_workers,
        pin_memory=is_gpu(),
        # The loader draws a base seed for its workers each time an iterator is made;
        # from its own generator, so that making iterators after a checkpoint's RNG state
        # was restored leaves the training RNG (dropout) exactly where it was saved.
        generator=torch.Generator().manual_seed(getattr(args, "seed", 1234)),
    )
    return RepeatingLoader(loader) if repeated else loader


def _samples_per_pass(total_samples: int, batch: int) -> int:
    """Samples one pass of the in-order sampler reads (the last incomplete batch dropped)."""
    per_pass = (total_samples // batch) * batch
    if per_pass == 0:
        raise ValueError(f"--repeated-dataloader: the dataset holds {total_samples} samples, "
                         f"fewer than one micro-batch over the data-parallel ranks ({batch})")
    return per_pass


class RepeatingLoader:
    """--repeated-dataloader: a data loader that starts over when it runs out.

    Each pass after the first reads the whole dataset again from its first sample (the
    in-order sampler's start is reset to 0; the random sampler moves to its next epoch).
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler
        self.passes = 0  # passes started after the first

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            if not yielded:
                raise ValueError("--repeated-dataloader: a pass over the dataset gave no "
                                 "batch (the dataset is smaller than one micro-batch)")
            self.passes += 1
            # (the random sampler counts its consumed samples itself: its next epoch)
            if isinstance(self.batch_sampler, MegatronPretrainingSampler):
                self.batch_sampler.consumed_samples = 0


def _check(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size) -> None:
    if total_samples <= 0:
        raise ValueError(f"sampler: no samples to draw from (total_samples={total_samples})")
    if micro_batch_size <= 0:
        raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0:
        raise ValueError(f"sampler: data_parallel_size must be positive, got {data_parallel_size}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"sampler: data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})"
        )


class MegatronPretrainingSampler:
    """Samples consumed_samples, consumed_samples + 1, ... in order.

    Global step t takes the next B = micro_batch_size * data_parallel_size indices;
    rank r yields the slice [r * micro_batch_size, (r + 1) * micro_batch_size) of them.
    A last incomplete global batch is dropped unless ``drop_last`` is False; then each
    rank whose slice of it is non-empty yields that slice.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        _check(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"sampler: consumed_samples {consumed_samples} must be in [0, {total_samples}) "
                "(the dataset is exhausted; ask for more --train-samples/--train-iters data)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def get_start_end_idx(self) -> tuple[int, int]:
        start_idx = self.data_parallel_rank * self.micro_batch_size
        return start_idx, start_idx + self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start, end = self.get_start_end_idx()
        batch: list[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                yield batch[start:end]
                batch = []
        # the tail: a rank whose slice is empty yields nothing
        if batch and not self.drop_last and batch[start:end]:
            yield batch[start:end]


class MegatronPretrainingRandomSampler:
    """Shuffled, epoch-seeded sampling that resumes exactly from ``consumed_samples``.

    Each epoch covers the first A = total - (total mod B) samples, B = micro_batch_size
    * data_parallel_size. They are split into data_parallel_size contiguous buckets of
    A / data_parallel_size; rank r walks its bucket in the order of a permutation seeded
    with the epoch number, micro_batch_size at a time. Epoch e = consumed // A, and
    (consumed mod A) / data_parallel_size positions of the permutation are skipped, so
    a restart continues the interrupted sequence. One ``__iter__`` yields the rest of
    the current epoch; iterating again starts the next one.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        _check(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples < 0:
            raise ValueError(f"sampler: consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.micro_batch_times_data_parallel_size
        if total_samples < self.micro_batch_times_data_parallel_size:
            raise ValueError(
                f"sampler: {total_samples} samples cannot fill one global batch of "
                f"{self.micro_batch_times_data_parallel_size} (micro batch x data parallel)"
            )
        if consumed_samples % self.micro_batch_times_data_parallel_size != 0:
            raise ValueError(
                f"sampler: consumed_samples {consumed_samples} is not a multiple of "
                f"micro_batch_size * data_parallel_size = "
                f"{self.micro_batch_times_data_parallel_size}"
            )

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        active_total_samples = self.total_samples - self.last_batch_size
        self.epoch = self.consumed_samples // active_total_samples
        current_epoch_samples = self.consumed_samples % active_total_samples

        bucket_size = active_total_samples // self.data_parallel_size
        bucket_offset = current_epoch_samples // self.data_parallel_size
        start_idx = self.data_parallel_rank * bucket_size

        g = torch.Generator()
        g.manual_seed(self.epoch)
        random_idx = torch.randperm(bucket_size, generator=g).tolist()
        idx_range = [start_idx + x for x in random_idx[bucket_offset:]]

        batch: list[int] = []
        for idx in idx_range:
            batch.append(idx)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.micro_batch_times_data_parallel_size
                yield batch
                batch = []
