"""Accuracy of a fine-tuned model on each --valid-data file, after every epoch.

Every example of every file is scored once: micro-batch k of a file (consecutive
examples, the last one shorter) goes to data-parallel rank k % DP, and the correct and
total counts are summed over the data-parallel group, so the accuracy is the same at any
data-parallel size. Printed on the last rank, Megatron's lines (epochs counted from 0,
-1 for evaluation only):

     > |epoch: 0| metrics for dev-matched: correct / total = 41 / 48 = 85.4167 %, ...
     >> |epoch: 0| overall: correct / total = 80 / 96 = 83.3333 %
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from megatron import get_args, is_last_rank, mpu, print_rank_last
from megatron.accelerator import current_device

from .finetune_utils import collate, process_batch


def shard_batches(num_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> list[list[int]]:
    """This data-parallel rank's micro-batches of sample indices (module docstring)."""
    starts = range(0, num_samples, micro_batch_size)
    return [list(range(s, min(s + micro_batch_size, num_samples)))
            for k, s in enumerate(starts) if k % dp_size == dp_rank]


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Examples whose argmax over logits [b, n] equals their label [b]."""
    return int((torch.argmax(logits, dim=-1) == labels).sum().item())


def calculate_correct_answers(name: str, model, dataset, epoch: int) -> tuple[int, int]:
    """(correct, total) of `dataset` over all data-parallel ranks; prints its line."""
    args = get_args()
    start = time.time()
    for chunk in model:
        chunk.eval()
    batches = shard_batches(len(dataset), args.micro_batch_size,
                            mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size())
    counts = torch.zeros(2, dtype=torch.long, device=current_device())  # correct, total
    with torch.no_grad():
        for indices in batches:
            tokens, types, labels, padding_mask = process_batch(collate(dataset, indices))
            logits = model[0](tokens, padding_mask, tokentype_ids=types)  # [b, n]
            counts[0] += count_correct(logits, labels)
            counts[1] += labels.numel()
    for chunk in model:
        chunk.train()
    torch.distributed.all_reduce(counts, group=mpu.get_data_parallel_group())
    correct, total = (int(v) for v in counts.tolist())
    percent = 100.0 * correct / max(total, 1)
    print_rank_last(
        f" > |epoch: {epoch}| metrics for {name}: correct / total = {correct} / {total} = "
        f"{percent:.4f} %, elapsed time (sec): {time.time() - start:.3f}"
    )
    return correct, total


def accuracy_func_provider(single_dataset_provider: Callable) -> Callable:
    """callback(model, epoch) printing the accuracy of each --valid-data file and the
    overall one; single_dataset_provider(path) -> that file's dataset (with a
    dataset_name). Returns {name: (correct, total)} as well."""
    args = get_args()
    datasets = [single_dataset_provider(path) for path in args.valid_data]

    def metrics_func(model, epoch: int) -> dict:
        print_rank_last("calculating metrics ...")
        results = {}
        for dataset in datasets:
            results[dataset.dataset_name] = calculate_correct_answers(
                dataset.dataset_name, model, dataset, epoch)
        correct = sum(c for c, _ in results.values())
        total = sum(t for _, t in results.values())
        if is_last_rank():
            percent = 100.0 * correct / max(total, 1)
            print(f" >> |epoch: {epoch}| overall: correct / total = {correct} / {total} = "
                  f"{percent:.4f} %", flush=True)
        return results

    return metrics_func
