"""Fine-tuning loop of the BERT tasks (RACE, MNLI, QQP): epochs over a task dataset on
top of megatron.training's setup_model_and_optimizer and train_step.

Data order. Epoch e visits the training examples in the permutation drawn from a
generator seeded with --seed + e. Each step takes the next global batch of
B = micro-batch x data-parallel size x micro-batches examples; chunk j (of
--micro-batch-size consecutive examples) is micro-batch j // DP of data-parallel rank
j % DP, so the same --global-batch-size gives the same batches (and the same losses, to
rounding) at any data-parallel size. The incomplete last batch of an epoch is dropped,
or, with --keep-last, split evenly over the ranks and micro-batches (padded with the
epoch's first examples to a multiple of DP x micro-batches). A resume at iteration i
starts epoch i // steps-per-epoch at its step i % steps-per-epoch: the same batches, and
with the checkpoint's RNG state the same losses, as the uninterrupted run.

Every tensor-parallel rank reads its data-parallel rank's batches itself (no broadcast);
pipeline parallelism and DeepSpeed are not supported here.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Callable, Sequence

import torch

from megatron import get_args, get_num_microbatches, get_timers, mpu, print_rank_0, print_rank_last
from megatron.accelerator import current_device
from megatron.checkpointing import check_save_folder, load_checkpoint, save_checkpoint
from megatron.training import evaluate_and_print_results, setup_model_and_optimizer, train_step
from megatron.utils import average_losses_across_data_parallel_group, calc_params_l2_norm

from .data_utils import TaskDataError

SCRIPT = "tasks/main.py"
BERT_TOKENIZERS = ("BertWordPieceLowerCase", "BertWordPieceCase")


def exit_with(problem: str) -> None:
    sys.exit(f"{SCRIPT}: error: {problem}")


def check_finetune_args(args) -> None:
    """Exit with one line naming the flag of a setting fine-tuning cannot run with."""
    task = args.task
    problem = None
    if args.epochs is None:
        problem = f"--task {task} needs --epochs N (0: evaluate --valid-data only)"
    elif args.epochs < 0:
        problem = f"--epochs must be >= 0, got {args.epochs}"
    elif args.tokenizer_type not in BERT_TOKENIZERS:
        problem = (
            f"--task {task} fine-tunes a BERT model and needs --tokenizer-type "
            f"BertWordPieceLowerCase or BertWordPieceCase (got {args.tokenizer_type}); "
            "GPT models are not supported on the classification tasks (as in Megatron)"
        )
    elif args.epochs > 0 and not args.train_data:
        problem = f"--task {task} with --epochs {args.epochs} needs --train-data"
    elif not args.valid_data:
        problem = f"--task {task} needs --valid-data (one or more)"
    elif args.pipeline_model_parallel_size > 1:
        problem = (
            "--pipeline-model-parallel-size > 1 is not supported for fine-tuning; use "
            "tensor and data parallelism"
        )
    elif getattr(args, "deepspeed", False):
        problem = "--deepspeed is not supported for fine-tuning; train without it"
    elif args.rampup_batch_size is not None:
        problem = "--rampup-batch-size is not supported for fine-tuning"
    elif args.epochs == 0 and args.load is None and args.pretrained_checkpoint is None:
        problem = "--epochs 0 (evaluation) needs --load or --pretrained-checkpoint"
    if problem is not None:
        exit_with(problem)
    for path in list(args.train_data or []) + list(args.valid_data):
        if not os.path.exists(path):
            exit_with(f"{path}: no such file or directory")


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation seeded with seed + epoch."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def steps_per_epoch(num_samples: int, global_batch_size: int, keep_last: bool) -> int:
    """Optimizer steps in one epoch (the incomplete last batch counts with keep_last)."""
    full, rest = divmod(num_samples, global_batch_size)
    return full + (1 if keep_last and rest else 0)


def epoch_batches(
    num_samples: int,
    epoch: int,
    seed: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
    num_microbatches: int,
    keep_last: bool,
) -> list[list[list[int]]]:
    """This data-parallel rank's steps of epoch `epoch`: for each step its micro-batches,
    each a list of example indices (the module docstring gives the layout)."""
    order = epoch_permutation(num_samples, seed, epoch)
    chunks_per_step = dp_size * num_microbatches
    global_batch = micro_batch_size * chunks_per_step
    steps = []
    for step in range(steps_per_epoch(num_samples, global_batch, keep_last)):
        batch = order[step * global_batch:(step + 1) * global_batch]
        if len(batch) < global_batch:  # the last, incomplete batch (keep_last)
            padded = -(-len(batch) // chunks_per_step) * chunks_per_step
            batch = batch + [order[i % num_samples] for i in range(padded - len(batch))]
        size = len(batch) // chunks_per_step
        chunks = [batch[j * size:(j + 1) * size] for j in range(chunks_per_step)]
        steps.append([chunks[m * dp_size + dp_rank] for m in range(num_microbatches)])
    return steps


def collate(dataset, indices: Sequence[int]) -> dict:
    """Stack the samples' arrays: 'text', 'types', 'padding_mask' [b, s] ([b, c, s] for
    multiple choice), 'label' and 'uid' [b]."""
    items = [dataset[i] for i in indices]
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = torch.stack([torch.from_numpy(v) for v in values])
    return batch


def process_batch(batch: dict) -> tuple[torch.Tensor, ...]:
    """(tokens, token types, labels, padding mask) on this rank's device."""
    device = current_device()
    tokens = batch["text"].long().to(device)  # [b, s] or [b, c, s]
    types = batch["types"].long().to(device)
    labels = batch["label"].long().to(device)  # [b]
    padding_mask = batch["padding_mask"].long().to(device)  # 1 = token
    return tokens, types, labels, padding_mask


def cross_entropy_loss_func(labels: torch.Tensor, output_tensor: torch.Tensor):
    """Mean cross entropy of logits [b, n] against labels [b]; 'lm loss' for the log
    (Megatron's name) is its data-parallel mean."""
    loss = torch.nn.functional.cross_entropy(output_tensor.contiguous().float(), labels)
    averaged = average_losses_across_data_parallel_group([loss])
    return loss, {"lm loss": averaged[0]}


def cross_entropy_forward_step(data_iterator, model):
    """Forward one micro-batch (a collated dict from the iterator)."""
    timers = get_timers()
    timers("batch-generator").start()
    tokens, types, labels, padding_mask = process_batch(next(data_iterator))
    timers("batch-generator").stop()
    output_tensor = model(tokens, padding_mask, tokentype_ids=types)  # [b, n]
    return output_tensor, partial(cross_entropy_loss_func, labels)


def _cycle(iterable_factory: Callable):
    while True:
        yield from iterable_factory()


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def load_pretrained_checkpoint(model, optimizer) -> None:
    """--pretrained-checkpoint's model weights (neither optimizer nor RNG state, counters
    not restored), then the optimizer's fp32 master copies refreshed from them."""
    args = get_args()
    saved = (args.load, args.finetune, args.no_load_rng, args.no_load_optim)
    args.load, args.finetune = args.pretrained_checkpoint, True
    args.no_load_rng = args.no_load_optim = True
    try:
        load_checkpoint(model, None, None)
    except ValueError as e:  # the model's own check: not a BERT checkpoint, wrong keys
        exit_with(f"--pretrained-checkpoint {args.pretrained_checkpoint}: {e}")
    finally:
        args.load, args.finetune, args.no_load_rng, args.no_load_optim = saved
    if optimizer is not None:
        optimizer.reload_model_params()


def _save(iteration: int, model, optimizer, lr_scheduler, state: dict) -> None:
    if state.get("last_saved") == iteration:
        return
    save_checkpoint(iteration, model, optimizer, lr_scheduler)
    state["last_saved"] = iteration


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def _log_line(args, iteration: int, total: int, epoch: int, elapsed_ms: float, lr: float,
              losses: dict, loss_scale: float, grad_norm, params_norm, skipped: int,
              nan: int) -> str:
    """The training log line (DESIGN.md's columns that apply to fine-tuning)."""
    s = f" iteration {iteration:8d}/{total:8d} | epoch: {epoch + 1:3d} |"
    s += f" consumed samples: {args.consumed_train_samples:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {lr:.3E} |"
    s += f" global batch size: {args.global_batch_size:5d} |"
    for key, value in losses.items():
        s += f" {key}: {value:.6E} |"
    s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    if params_norm is not None:
        s += f" params norm: {params_norm:.3f} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    return s


class _Interval:
    """Loss sums and counts between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, float] = {}
        self.iters = self.skipped = self.nan = 0
        self.start = time.time()

    def add(self, losses: dict, skipped: int, got_nan: bool) -> None:
        self.iters += 1
        self.skipped += skipped
        self.nan += int(got_nan)
        if not skipped:
            for key, value in losses.items():
                self.losses[key] = self.losses.get(key, 0.0) + float(value)

    def averages(self) -> dict:
        counted = max(1, self.iters - self.skipped)
        return {k: v / counted for k, v in self.losses.items()}


def _train(model, optimizer, lr_scheduler, forward_step, train_dataset, valid_iterator,
           end_of_epoch_callback, iters_per_epoch: int) -> None:
    """The epochs from args.iteration on (module docstring), saving each epoch's end."""
    args = get_args()
    for chunk in model:
        chunk.train()
    dp_size = mpu.get_data_parallel_world_size()
    dp_rank = mpu.get_data_parallel_rank()
    iteration = args.iteration
    start_epoch, start_step = divmod(iteration, iters_per_epoch)
    interval = _Interval()
    save_state = {"last_saved": iteration if args.load else None}
    for epoch in range(start_epoch, args.epochs):
        print_rank_0(f"working on epoch {epoch + 1} ...")
        steps = epoch_batches(len(train_dataset), epoch, args.seed, args.micro_batch_size,
                              dp_size, dp_rank, get_num_microbatches(), args.keep_last)
        full_batch = args.micro_batch_size * dp_size * get_num_microbatches()
        for step, micro_batches in enumerate(steps):
            if epoch == start_epoch and step < start_step:
                continue
            batches = iter([collate(train_dataset, mb) for mb in micro_batches])
            out = train_step(forward_step, batches, model, optimizer, lr_scheduler)
            losses, skipped, grad_norm = out[0], out[1], out[2]
            got_nan = bool(out[4]) if len(out) > 4 else False
            iteration += 1
            args.iteration = iteration
            remaining = len(train_dataset) - step * full_batch
            args.consumed_train_samples += min(full_batch, remaining)
            interval.add(losses, skipped, got_nan)
            if iteration % args.log_interval == 0:
                params_norm = calc_params_l2_norm(model) if args.log_params_norm else None
                elapsed_ms = (time.time() - interval.start) * 1000.0 / interval.iters
                print_rank_last(_log_line(
                    args, iteration, args.train_iters, epoch, elapsed_ms,
                    float(optimizer.param_groups[0]["lr"]), interval.averages(),
                    float(optimizer.get_loss_scale()), grad_norm, params_norm,
                    interval.skipped, interval.nan))
                interval.reset()
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                _save(iteration, model, optimizer, lr_scheduler, save_state)
            if valid_iterator is not None and iteration % args.eval_interval == 0:
                evaluate_and_print_results(f"iteration {iteration}", forward_step,
                                           valid_iterator, model, iteration, False)
            if args.exit_interval and iteration % args.exit_interval == 0:
                if args.save:
                    _save(iteration, model, optimizer, lr_scheduler, save_state)
                torch.distributed.barrier()
                print_rank_0(f"exiting program at iteration {iteration}")
                return
        if args.save:
            _save(iteration, model, optimizer, lr_scheduler, save_state)
        if end_of_epoch_callback is not None:
            end_of_epoch_callback(model, epoch)


def finetune(train_valid_datasets_provider: Callable, model_provider: Callable,
             forward_step: Callable = cross_entropy_forward_step,
             end_of_epoch_callback_provider: Callable | None = None) -> None:
    """Fine-tune (--epochs > 0) or evaluate (--epochs 0) a task model.

    train_valid_datasets_provider() -> (train dataset, validation dataset);
    model_provider(pre_process, post_process) -> the task model;
    end_of_epoch_callback_provider() -> callback(model, epoch) run after every epoch
    (accuracy on each --valid-data file)."""
    args = get_args()
    check_finetune_args(args)
    timers = get_timers()
    timers("train/valid/test dataset/dataloder").start()
    try:
        train_dataset = valid_dataset = None
        if args.epochs > 0:
            train_dataset, valid_dataset = train_valid_datasets_provider()
        end_of_epoch_callback = None
        if end_of_epoch_callback_provider is not None:
            end_of_epoch_callback = end_of_epoch_callback_provider()
    except TaskDataError as e:
        exit_with(str(e))
    timers("train/valid/test dataset/dataloder").stop()

    if args.epochs > 0:
        iters_per_epoch = steps_per_epoch(len(train_dataset), args.global_batch_size,
                                          args.keep_last)
        if iters_per_epoch == 0:
            exit_with(
                f"--train-data has {len(train_dataset)} examples, fewer than one global "
                f"batch ({args.global_batch_size}); lower --global-batch-size / "
                "--micro-batch-size or pass --keep-last")
        # the learning-rate schedule (built in setup_model_and_optimizer) spans all epochs
        args.train_iters = args.epochs * iters_per_epoch
        args.train_iters_per_epoch = iters_per_epoch
        print_rank_0(f" > {len(train_dataset)} training examples, {iters_per_epoch} "
                     f"iterations per epoch, {args.train_iters} in {args.epochs} epochs")
        timers("model and optimizer").start()
        model, optimizer, lr_scheduler = setup_model_and_optimizer(model_provider)
        timers("model and optimizer").stop()
        if args.load is None:
            check_save_folder()
    else:
        from megatron.training import get_model

        model, optimizer, lr_scheduler = get_model(model_provider), None, None
        args.iteration = 0
        if args.load is not None:
            load_checkpoint(model, None, None)
    if args.iteration == 0 and args.pretrained_checkpoint is not None and (
            args.epochs > 0 or args.load is None):
        timers("pretrained checkpoint").start()
        load_pretrained_checkpoint(model, optimizer)
        timers("pretrained checkpoint").stop()
    print_rank_0("done with setups ...")

    if args.epochs > 0:
        valid_iterator = None
        if args.eval_interval and args.eval_iters:
            valid_iterator = _valid_loss_iterator(valid_dataset)
        print_rank_0("training ...")
        _train(model, optimizer, lr_scheduler, forward_step, train_dataset, valid_iterator,
               end_of_epoch_callback, iters_per_epoch)
    elif end_of_epoch_callback is not None:
        print_rank_0("evaluation only mode, setting epoch to -1")
        end_of_epoch_callback(model, -1)
    print_rank_0("done :-)")


def _valid_loss_iterator(valid_dataset):
    """Micro-batches of this data-parallel rank over the validation set, cycling (the
    validation loss of --eval-interval reads --eval-iters global batches from it)."""
    args = get_args()
    dp_size = mpu.get_data_parallel_world_size()
    dp_rank = mpu.get_data_parallel_rank()
    size = args.micro_batch_size
    starts = range(0, len(valid_dataset) - size + 1, size)
    if len(starts) < dp_size:  # every rank needs a micro-batch (the same on all ranks)
        print_rank_0(" > validation loss off: fewer full micro-batches than ranks")
        return None
    mine = [list(range(s, s + size)) for k, s in enumerate(starts) if k % dp_size == dp_rank]

    def one_pass():
        return (collate(valid_dataset, indices) for indices in mine)

    return _cycle(one_pass)


__all__ = ["finetune", "epoch_batches", "steps_per_epoch", "epoch_permutation",
           "cross_entropy_forward_step", "process_batch", "collate", "check_finetune_args",
           "load_pretrained_checkpoint"]
