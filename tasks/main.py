"""Downstream task entry point: `python tasks/main.py --task TASK ...` with the model
flags used for pretraining plus the task flags below (Megatron's spellings).

Zero-shot GPT tasks: WIKITEXT103 (perplexity) and LAMBADA (cloze accuracy), see
tasks/zeroshot_gpt/evaluate.py. BERT fine-tuning: RACE (multiple choice, tasks/race),
MNLI and QQP (GLUE sentence pairs, tasks/glue), see tasks/finetune_utils.py; their
tokenizer defaults to BertWordPieceLowerCase.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from megatron import get_args  # noqa: E402
from megatron.initialize import initialize_megatron  # noqa: E402

SCRIPT = "tasks/main.py"
# --task -> the module whose main() runs it.
TASKS = {
    "WIKITEXT103": "tasks.zeroshot_gpt.evaluate",
    "LAMBADA": "tasks.zeroshot_gpt.evaluate",
    "RACE": "tasks.race.finetune",
    "MNLI": "tasks.glue.finetune",
    "QQP": "tasks.glue.finetune",
}
FINETUNE_TASKS = ("RACE", "MNLI", "QQP")


def get_tasks_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The task flags."""
    group = parser.add_argument_group(title="tasks")
    group.add_argument("--task", type=str, required=True, help="Task name, e.g. WIKITEXT103.")
    group.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="Fine-tuning epochs; zero means evaluation only.",
    )
    group.add_argument(
        "--pretrained-checkpoint",
        type=str,
        default=None,
        help="Pretrained checkpoint to fine-tune from.",
    )
    group.add_argument(
        "--keep-last",
        action="store_true",
        help="Keep the last (possibly incomplete) batch of the data loader.",
    )
    group.add_argument(
        "--train-data", nargs="+", default=None, help="Training data paths (fine-tuning)."
    )
    group.add_argument(
        "--valid-data", nargs="*", default=None, help="Validation / evaluation data paths."
    )
    group.add_argument(
        "--overlapping-eval",
        type=int,
        default=32,
        help="Stride of the sliding window in perplexity evaluation: each window after "
        "the first scores only its last N tokens.",
    )
    group.add_argument(
        "--strict-lambada",
        action="store_true",
        help="LAMBADA: the target is the whole last word, not its last BPE token.",
    )
    return parser


def task_main(task: str):
    """The main() of --task `task`; exits with one line for an unknown task or one whose
    package is not in this tree."""
    if task not in TASKS:
        sys.exit(f"{SCRIPT}: error: unknown --task {task}; choose from {', '.join(TASKS)}")
    module_name = TASKS[task]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise
        folder = "/".join(module_name.split(".")[:2])
        sys.exit(f"{SCRIPT}: error: --task {task} is not implemented here ({folder} is missing)")
    return module.main


def main() -> None:
    # Resolve the task before the (slower) initialisation, so a bad name fails at once.
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--task", default=None)
    task = early.parse_known_args()[0].task
    run_task = task_main(task) if task is not None else None
    tokenizer = "BertWordPieceLowerCase" if task in FINETUNE_TASKS else "GPT2BPETokenizer"
    initialize_megatron(
        extra_args_provider=get_tasks_args,
        args_defaults={"tokenizer_type": tokenizer},
    )
    args = get_args()
    if getattr(args, "num_layers_per_virtual_pipeline_stage", None) is not None:
        sys.exit(
            f"{SCRIPT}: error: --num-layers-per-virtual-pipeline-stage (interleaved "
            "schedule) is not supported for downstream tasks"
        )
    (run_task or task_main(args.task))()
    # Leave the process group here: a gloo group left to interpreter shutdown can abort a
    # rank after its work is done ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
