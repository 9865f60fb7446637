"""RACE fine-tuning and evaluation: `tasks/main.py --task RACE` with --train-data and
--valid-data RACE folders. --micro-batch-size counts questions: each goes through the
model as four sequences."""

from __future__ import annotations

from megatron import get_args, get_tokenizer, print_rank_0
from megatron.model.config import config_from_args
from megatron.model.multiple_choice import MultipleChoice

from ..eval_utils import accuracy_func_provider
from ..finetune_utils import finetune
from .data import RaceDataset, dataset_name_from_path


def train_valid_datasets_provider():
    args = get_args()
    tokenizer = get_tokenizer()
    train = RaceDataset("training", args.train_data, tokenizer, args.seq_length)
    valid = RaceDataset("validation", args.valid_data, tokenizer, args.seq_length)
    return train, valid


def model_provider(pre_process: bool = True, post_process: bool = True) -> MultipleChoice:
    print_rank_0("building multichoice model for RACE ...")
    return MultipleChoice(config_from_args(get_args()), num_tokentypes=2,
                          pre_process=pre_process, post_process=post_process)


def metrics_func_provider():
    args = get_args()
    tokenizer = get_tokenizer()

    def single_dataset_provider(path: str) -> RaceDataset:
        return RaceDataset(dataset_name_from_path(path), [path], tokenizer, args.seq_length)

    return accuracy_func_provider(single_dataset_provider)


def main() -> None:
    """Entry of tasks/main.py for --task RACE."""
    finetune(train_valid_datasets_provider, model_provider,
             end_of_epoch_callback_provider=metrics_func_provider)
