"""GLUE datasets: rows of GLUE's tab-separated files (a header row naming the columns,
then one example per line), tokenized into BERT pairs when read.

A line with the wrong number of columns, an empty sentence, an unknown label or a bad
id is an error naming the file and line (TaskDataError).
"""

from __future__ import annotations

import os
from typing import Sequence

from torch.utils.data import Dataset

from megatron import print_rank_0

from ..data_utils import TaskDataError, build_sample, clean_text, tokenize_pair


def dataset_name_from_path(path: str, task: str) -> str:
    """'data/glue_data/MNLI/dev_matched.tsv' -> 'dev-matched': the path after the task's
    folder (or the file name), without the extension, '/' and '_' as '-'."""
    path = os.path.normpath(path)
    parts = path.split(os.sep)
    if task in parts[:-1]:
        rest = parts[len(parts) - 1 - parts[::-1].index(task) + 1:]
    else:
        rest = parts[-1:]
    name = "-".join(rest)
    stem, ext = os.path.splitext(name)
    if ext == ".tsv":
        name = stem
    return name.replace("_", "-")


def read_tsv(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header columns, [(line number, columns)]) of a TSV file; blank lines are skipped,
    every other line must have the header's number of columns."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: cannot read: {e}") from e
    if not lines or not lines[0].strip():
        raise TaskDataError(f"{path}:1: expected a header row of tab-separated column names")
    header = [c.strip() for c in lines[0].rstrip("\r").split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != len(header):
            raise TaskDataError(
                f"{path}:{number}: expected {len(header)} tab-separated columns "
                f"({', '.join(header)}), got {len(columns)}"
            )
        rows.append((number, columns))
    return header, rows


def column(header: list[str], name: str, path: str) -> int:
    """The index of column `name` in the header of `path`."""
    if name not in header:
        raise TaskDataError(f"{path}:1: no column {name!r} in the header ({', '.join(header)})")
    return header.index(name)


def nonempty_text(value: str, path: str, number: int, name: str) -> str:
    text = clean_text(value.strip())
    if not text:
        raise TaskDataError(f"{path}:{number}: column {name} is empty")
    return text


def parse_uid(value: str, path: str, number: int, name: str) -> int:
    try:
        uid = int(value.strip())
    except ValueError:
        uid = -1
    if uid < 0:
        raise TaskDataError(f"{path}:{number}: column {name} must be an id >= 0, got {value!r}")
    return uid


class GLUEDataset(Dataset):
    """Examples of one GLUE task from one or more TSV files; item i is build_sample() of
    its packed (text_a, text_b) pair. Subclasses read one file in read_file()."""

    task_name = "GLUE"

    def __init__(
        self, dataset_name: str, datapaths: Sequence[str], tokenizer, max_seq_length: int
    ) -> None:
        self.dataset_name = dataset_name
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        print_rank_0(f" > building {self.task_name} dataset for {dataset_name}:")
        print_rank_0("  > paths: " + " ".join(datapaths))
        self.samples: list[dict] = []
        for path in datapaths:
            if not os.path.isfile(path):
                raise TaskDataError(f"{path}: no such file")
            samples = self.read_file(path)
            print_rank_0(f"   > {path}: {len(samples)} examples")
            self.samples.extend(samples)
        if not self.samples:
            raise TaskDataError(f"{' '.join(datapaths)}: no examples")
        print_rank_0(f"  >> total number of samples: {len(self.samples)}")

    def read_file(self, path: str) -> list[dict]:
        """[{'text_a', 'text_b', 'label' (int), 'uid' (int)}] of one file."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        raw = self.samples[idx]
        ids, types, paddings = tokenize_pair(
            raw["text_a"], raw["text_b"], self.tokenizer, self.max_seq_length
        )
        return build_sample(ids, types, paddings, raw["label"], raw["uid"])
