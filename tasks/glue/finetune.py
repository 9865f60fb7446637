"""GLUE fine-tuning and evaluation: `tasks/main.py --task MNLI|QQP` with --train-data and
--valid-data TSV files (accuracy reported per --valid-data file after every epoch)."""

from __future__ import annotations

from megatron import get_args, get_tokenizer, print_rank_0
from megatron.model.classification import Classification
from megatron.model.config import config_from_args

from ..eval_utils import accuracy_func_provider
from ..finetune_utils import exit_with, finetune
from .data import dataset_name_from_path

# --task -> (number of classes, the module and class of its dataset)
GLUE_TASKS = {
    "MNLI": (3, "tasks.glue.mnli", "MNLIDataset"),
    "QQP": (2, "tasks.glue.qqp", "QQPDataset"),
}


def glue_classification(task: str, num_classes: int, dataset_cls) -> None:
    def train_valid_datasets_provider():
        args = get_args()
        tokenizer = get_tokenizer()
        train = dataset_cls("training", args.train_data, tokenizer, args.seq_length)
        valid = dataset_cls("validation", args.valid_data, tokenizer, args.seq_length)
        return train, valid

    def model_provider(pre_process: bool = True, post_process: bool = True):
        print_rank_0(f"building classification model for {task} ...")
        return Classification(config_from_args(get_args()), num_classes=num_classes,
                              num_tokentypes=2, pre_process=pre_process,
                              post_process=post_process)

    def metrics_func_provider():
        args = get_args()
        tokenizer = get_tokenizer()

        def single_dataset_provider(path: str):
            return dataset_cls(dataset_name_from_path(path, task), [path], tokenizer,
                               args.seq_length)

        return accuracy_func_provider(single_dataset_provider)

    finetune(train_valid_datasets_provider, model_provider,
             end_of_epoch_callback_provider=metrics_func_provider)


def main() -> None:
    """Entry of tasks/main.py for the GLUE tasks."""
    import importlib

    args = get_args()
    if args.task not in GLUE_TASKS:
        exit_with(f"--task {args.task} is not a GLUE task here (choose from "
                  f"{', '.join(GLUE_TASKS)})")
    num_classes, module, name = GLUE_TASKS[args.task]
    glue_classification(args.task, num_classes,
                        getattr(importlib.import_module(module), name))
