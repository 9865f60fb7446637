"""Zero-shot GPT evaluation: WikiText-103 perplexity and LAMBADA cloze accuracy.

WIKITEXT103 ('loss'): the summed per-token cross entropy over every target of the
stream, each scored once (datasets.LMDataset); with N tokenised and W original tokens,

    avg loss = L / (N - 1),  ppl = exp(avg loss),
    token ratio = (N - 1) / (W - 1),  adjusted ppl = exp(avg loss * token ratio),

the adjusted value being the word-level perplexity comparable with published numbers.
LAMBADA ('accuracy'): an example is correct when the greedy prediction of every target
token is right. Both work under tensor parallelism (the loss is the vocab-parallel cross
entropy; accuracy reads logits gathered over the vocabulary) and data parallelism (ranks
take every dp-th batch; the sums are all-reduced once).
"""

from __future__ import annotations

import math
import os
import sys

import torch

from megatron import get_args, get_tokenizer, is_last_rank, mpu, print_rank_0
from megatron.accelerator import current_device
from megatron.checkpointing import inference_checkpoint_problem, load_checkpoint
from megatron.model import GPTModel
from megatron.model.config import config_from_args
from megatron.training import get_model
from megatron.utils import get_ltor_masks_and_position_ids

from .datasets import LambadaDataset, build_wikitext103_dataset

SCRIPT = "tasks/main.py"
EVAL_METRICS = {"WIKITEXT103": "loss", "LAMBADA": "accuracy"}


def get_model_provider(eval_metric: str):
    """Model provider: vocab-parallel logits for 'loss' (the loss is computed in the
    model), logits gathered over the full vocabulary for 'accuracy' (argmax)."""
    if eval_metric not in ("loss", "accuracy"):
        raise ValueError(f"unknown eval metric {eval_metric!r}: choose loss or accuracy")

    def model_provider(pre_process: bool = True, post_process: bool = True) -> GPTModel:
        print_rank_0("building GPT model ...")
        return GPTModel(
            config_from_args(get_args()),
            num_tokentypes=0,
            parallel_output=eval_metric == "loss",
            pre_process=pre_process,
            post_process=post_process,
        )

    return model_provider


def process_batch(batch: dict, device) -> tuple[torch.Tensor, ...]:
    """{'text' [b, s + 1], 'pad_mask' [b, s]} -> (tokens, labels, attention_mask,
    position_ids, loss_mask), all [b, s] but the mask [1 or b, 1, s, s]."""
    args = get_args()
    text = torch.as_tensor(batch["text"], dtype=torch.long, device=device)  # [b, s + 1]
    loss_mask = torch.as_tensor(batch["pad_mask"], dtype=torch.float, device=device)  # [b, s]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens,
        get_tokenizer().eod,
        args.reset_position_ids,
        args.reset_attention_mask,
        args.eod_mask_loss,
    )
    return tokens, labels, attention_mask, position_ids, loss_mask


def forward_step(batch: dict, model, eval_metric: str) -> torch.Tensor:
    """One batch's contribution (float64 scalar): the summed masked loss for 'loss', the
    number of examples with every masked target predicted right for 'accuracy'."""
    tokens, labels, attention_mask, position_ids, loss_mask = process_batch(batch, current_device())
    if eval_metric == "loss":
        losses = model(tokens, position_ids, attention_mask, labels=labels)  # [b, s]
        return masked_loss_sum(losses, loss_mask)
    logits = model(tokens, position_ids, attention_mask)  # [b, s, v]
    return count_correct(logits, labels, loss_mask)


def masked_loss_sum(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum(losses * loss_mask) in float64; losses, loss_mask [b, s]."""
    return (losses.double() * loss_mask.double()).sum()


def count_correct(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Examples (rows) whose greedy prediction argmax(logits) equals the label at every
    position where loss_mask is 1 (float64 scalar); logits [b, s, v], labels [b, s]."""
    correct = torch.argmax(logits, dim=-1) == labels  # [b, s]
    correct = correct | (loss_mask == 0)  # unscored positions never fail an example
    return correct.all(dim=-1).double().sum()


def shard_batches(num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """This data-parallel rank's batches of sample indices: batch k (of consecutive
    micro_batch_size indices, the last one shorter) goes to rank k % dp_size."""
    starts = range(0, num_samples, micro_batch_size)
    return [
        list(range(s, min(s + micro_batch_size, num_samples)))
        for k, s in enumerate(starts)
        if k % dp_size == dp_rank
    ]


def collate(dataset, indices: list[int]) -> dict:
    items = [dataset[i] for i in indices]
    return {key: torch.stack([torch.from_numpy(it[key]) for it in items]) for key in items[0]}


def evaluate(dataset, model, eval_metric: str) -> float:
    """The metric's sum over the whole dataset (all data-parallel ranks)."""
    args = get_args()
    batches = shard_batches(
        len(dataset),
        args.micro_batch_size,
        mpu.get_data_parallel_rank(),
        mpu.get_data_parallel_world_size(),
    )
    for m in model:
        m.eval()
    total = torch.zeros((), dtype=torch.float64, device=current_device())
    with torch.no_grad():
        for iteration, indices in enumerate(batches):
            if iteration % args.log_interval == 0:
                print_rank_0(f"> working on iteration: {iteration}")
            total += forward_step(collate(dataset, indices), model[0], eval_metric)
    torch.distributed.all_reduce(total, group=mpu.get_data_parallel_group())
    return float(total.item())


def loss_results(total_loss: float, num_tokenized: int, num_original: int) -> dict[str, float]:
    """avg loss, ppl, adjusted ppl and token ratio from the summed loss (module
    docstring); exponents are capped at 20 as Megatron does."""
    avg_loss = total_loss / (num_tokenized - 1)
    token_ratio = (num_tokenized - 1) / max(num_original - 1, 1)
    return {
        "avg loss": avg_loss,
        "ppl": math.exp(min(20.0, avg_loss)),
        "adjusted ppl": math.exp(min(20.0, avg_loss * token_ratio)),
        "token ratio": token_ratio,
    }


def format_results(task: str, eval_metric: str, output: float, dataset) -> str:
    """Megatron's results line."""
    line = f" validation results on {task} | "
    if eval_metric == "loss":
        r = loss_results(output, dataset.num_tokenized_tokens, dataset.num_original_tokens)
        line += f"avg loss: {r['avg loss']:.4E} | ppl: {r['ppl']:.4E} | "
        line += f"adjusted ppl: {r['adjusted ppl']:.4E} | token ratio: {r['token ratio']} |"
    else:
        num_examples = len(dataset)
        line += f"number correct: {output:.4E} | total examples: {num_examples:.4E} | "
        line += f"avg accuracy: {output / num_examples:.4E}"
    return line


def evaluate_and_print_results(task: str, dataset, model, eval_metric: str) -> float:
    """Evaluate, then print the results line framed by dashes on the last rank."""
    output = evaluate(dataset, model, eval_metric)
    if is_last_rank():
        if eval_metric == "loss":
            print(f" > summed loss: {output!r} over {dataset.num_tokenized_tokens - 1} targets")
        line = format_results(task, eval_metric, output, dataset)
        print("-" * (len(line) + 1))
        print(line)
        print("-" * (len(line) + 1), flush=True)
    return output


def check_eval_args(args) -> None:
    """Exit with one line naming the flag of an unusable setting."""
    problem = None
    if not args.valid_data:
        problem = f"--task {args.task} needs --valid-data FILE"
    elif len(args.valid_data) > 1:
        problem = f"--task {args.task} takes one --valid-data file, got {len(args.valid_data)}"
    elif not os.path.isfile(args.valid_data[0]):
        problem = f"--valid-data {args.valid_data[0]}: no such file"
    else:
        problem = inference_checkpoint_problem(args, "zero-shot evaluation")
    if problem is not None:
        sys.exit(f"{SCRIPT}: error: {problem}")


def build_dataset(task: str):
    """The task's dataset from --valid-data (exits with one line on a bad file)."""
    args = get_args()
    tokenizer = get_tokenizer()
    path = args.valid_data[0]
    try:
        if task == "WIKITEXT103":
            dataset = build_wikitext103_dataset(
                path, tokenizer, args.seq_length, args.overlapping_eval
            )
            print_rank_0(f" > number of original tokens: {dataset.num_original_tokens}")
            print_rank_0(f" > number of tokenized tokens: {dataset.num_tokenized_tokens}")
            return dataset
        dataset = LambadaDataset(
            path, tokenizer.eod, tokenizer, args.seq_length, args.strict_lambada
        )
    except ValueError as e:
        sys.exit(f"{SCRIPT}: error: {e}")
    if dataset.num_truncated:
        print_rank_0(
            f" > note: {dataset.num_truncated} passages are longer than --seq-length "
            f"{args.seq_length} + 1 tokens and keep only their last tokens"
        )
    return dataset


def main() -> None:
    """Entry of tasks/main.py for --task WIKITEXT103 and LAMBADA."""
    args = get_args()
    if args.task not in EVAL_METRICS:
        sys.exit(f"{SCRIPT}: error: --task {args.task} is not a zero-shot GPT task")
    check_eval_args(args)
    eval_metric = EVAL_METRICS[args.task]
    dataset = build_dataset(args.task)
    print_rank_0(f" > {args.task}: {len(dataset)} samples of {args.seq_length} tokens")
    model = get_model(get_model_provider(eval_metric))
    if args.load is not None:
        load_checkpoint(model, None, None)
    evaluate_and_print_results(args.task, dataset, model, eval_metric)
    print_rank_0("done :-)")
    torch.distributed.barrier()
