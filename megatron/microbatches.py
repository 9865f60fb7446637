"""Number of micro-batches per iteration: constant, or ramped up with the global batch size."""

from abc import ABC, abstractmethod


def build_num_microbatches_calculator(args):
    if args.rampup_batch_size is None:
        calc = ConstantNumMicroBatches(
            args.global_batch_size, args.micro_batch_size, args.data_parallel_size
        )
        if args.rank == 0:
            print(f"setting number of micro-batches to constant {calc.get()}", flush=True)
        return calc
    if len(args.rampup_batch_size) != 3:
        raise ValueError(
            "--rampup-batch-size expects three values: <start batch size> "
            f"<batch size increment> <ramp-up samples>, got {args.rampup_batch_size}"
        )
    start, increment, samples = (int(v) for v in args.rampup_batch_size)
    if args.rank == 0:
        print(
            f"will use batch size rampup starting from global batch size {start} to global "
            f"batch size {args.global_batch_size} with batch size increments {increment} "
            f"over {samples} samples.",
            flush=True,
        )
    return RampupBatchsizeNumMicroBatches(
        start, increment, samples, args.global_batch_size, args.micro_batch_size,
        args.data_parallel_size,
    )


class NumMicroBatchesCalculator(ABC):
    def __init__(self):
        self.num_micro_batches = None
        self.current_global_batch_size = None

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    @abstractmethod
    def update(self, consumed_samples: int, consistency_check: bool) -> None:
        pass


class ConstantNumMicroBatches(NumMicroBatchesCalculator):
    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int):
        super().__init__()
        micro_times_dp = micro_batch_size * data_parallel_size
        if global_batch_size % micro_times_dp != 0:
            raise ValueError(
                f"--global-batch-size ({global_batch_size}) is not divisible by "
                f"--micro-batch-size ({micro_batch_size}) x data-parallel size "
                f"({data_parallel_size})"
            )
        self.num_micro_batches = global_batch_size // micro_times_dp
        self.current_global_batch_size = global_batch_size

    def update(self, consumed_samples, consistency_check):
        pass


class RampupBatchsizeNumMicroBatches(NumMicroBatchesCalculator):
    """Global batch size grows from `start` by `increment` every
    `rampup_samples / ((global - start) / increment)` consumed samples."""

    def __init__(self, start_batch_size, batch_size_increment, rampup_samples,
                 global_batch_size, micro_batch_size, data_parallel_size):
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        if start_batch_size <= 0 or batch_size_increment <= 0 or rampup_samples < 0:
            raise ValueError(
                f"--rampup-batch-size values must be positive, got start={start_batch_size} "
                f"increment={batch_size_increment} samples={rampup_samples}"
            )
        self.start_batch_size = start_batch_size
        self.global_batch_size = global_batch_size
        diff = global_batch_size - start_batch_size
        if diff < 0 or diff % batch_size_increment != 0:
            raise ValueError(
                f"--global-batch-size ({global_batch_size}) minus the ramp-up start "
                f"({start_batch_size}) must be a non-negative multiple of the increment "
                f"({batch_size_increment})"
            )
        self.batch_size_increment = batch_size_increment
        num_increments = diff // batch_size_increment
        self.rampup_samples_per_increment = (
            rampup_samples / num_increments if num_increments else 0
        )
        self.rampup_samples = rampup_samples
        self.update(0, False)

    def update(self, consumed_samples, consistency_check):
        if consumed_samples > self.rampup_samples or self.rampup_samples_per_increment == 0:
            self.current_global_batch_size = self.global_batch_size
        else:
            steps = int(consumed_samples / self.rampup_samples_per_increment)
            self.current_global_batch_size = min(
                self.start_batch_size + steps * self.batch_size_increment,
                self.global_batch_size,
            )
        if consistency_check and (
            self.current_global_batch_size % self.micro_batch_times_data_parallel_size != 0
        ):
            raise ValueError(
                f"current global batch size ({self.current_global_batch_size}) is not "
                f"divisible by micro-batch-size ({self.micro_batch_size}) times data "
                f"parallel size ({self.data_parallel_size})"
            )
        self.num_micro_batches = max(
            1, self.current_global_batch_size // self.micro_batch_times_data_parallel_size
        )
