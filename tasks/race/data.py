"""RACE: a passage, its questions, four options each and the answer letters.

The layout RACE distributes: RACE/{train,dev,test}/{high,middle}/*.txt, each file one
JSON object {"article": str, "questions": [str], "options": [[4 str]], "answers":
["A".."D"]} (on one line; several such lines in a file are read as several objects).
A --train-data / --valid-data path is one of those folders (every *.txt file in it, in
name order) or a single file.

Each question gives one example of four sequences, one per option:
[CLS] question-with-option [SEP] passage [SEP], the question and option joined by
filling the question's blank ('_') with the option, else by a space, and cut to
MAX_QA_LENGTH tokens; the passage is cut to the sequence length.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

from torch.utils.data import Dataset

from megatron import print_rank_0

from ..data_utils import TaskDataError, build_sample, clean_text, pack_pair

NUM_CHOICES = 4
MAX_QA_LENGTH = 128


def race_files(path: str) -> list[str]:
    """The *.txt files of a RACE folder (sorted), or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise TaskDataError(f"{path}: no such file or directory")
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
        raise TaskDataError(f"{path}: no RACE *.txt files in this folder")
    return files


def read_race_file(path: str) -> list[tuple[int, dict]]:
    """[(line number, document)] of one RACE file, each document checked."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: cannot read: {e}") from e
    documents = []
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            break
        line = text.count("\n", 0, position) + 1
        try:
            document, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise TaskDataError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
        check_race_document(document, path, line)
        documents.append((line, document))
    if not documents:
        raise TaskDataError(f"{path}: empty, expected a RACE JSON object")
    return documents


def check_race_document(document, path: str, line: int) -> None:
    """Raise TaskDataError naming file:line unless `document` is a RACE object."""
    where = f"{path}:{line}"
    if not isinstance(document, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(document).__name__}")
    for key, kind in (("article", str), ("questions", list), ("options", list),
                      ("answers", list)):
        if key not in document:
            raise TaskDataError(f"{where}: missing key {key!r}")
        if not isinstance(document[key], kind):
            raise TaskDataError(f"{where}: {key!r} must be a {kind.__name__}")
    questions, options, answers = document["questions"], document["options"], document["answers"]
    if not (len(questions) == len(options) == len(answers)):
        raise TaskDataError(
            f"{where}: {len(questions)} questions, {len(options)} option lists and "
            f"{len(answers)} answers: expected one of each per question")
    for q, (choices, answer) in enumerate(zip(options, answers)):
        if not isinstance(choices, list) or len(choices) != NUM_CHOICES or not all(
                isinstance(c, str) for c in choices):
            raise TaskDataError(f"{where}: question {q}: expected {NUM_CHOICES} options (strings)")
        if answer not in ("A", "B", "C", "D"):
            raise TaskDataError(f"{where}: question {q}: answer {answer!r} is not A, B, C or D")
        if not isinstance(questions[q], str):
            raise TaskDataError(f"{where}: question {q} must be a string")


def question_with_option(question: str, option: str) -> str:
    """Fill the question's blank with the option, or append the option."""
    if "_" in question:
        return question.replace("_", option)
    return f"{question} {option}"


def race_examples(path: str, tokenizer, max_seq_length: int, max_qa_length: int,
                  first_uid: int = 0) -> list[dict]:
    """The samples of one RACE folder or file (module docstring)."""
    samples = []
    documents = 0
    for filename in race_files(path):
        for _, document in read_race_file(filename):
            documents += 1
            context_ids = tokenizer.tokenize(clean_text(document["article"]))
            for q, question in enumerate(document["questions"]):
                label = ord(document["answers"][q]) - ord("A")
                ids, types, paddings = [], [], []
                for option in document["options"][q]:
                    qa_ids = tokenizer.tokenize(clean_text(question_with_option(question, option)))
                    packed = pack_pair(qa_ids[:max_qa_length], context_ids, max_seq_length,
                                       tokenizer.cls, tokenizer.sep, tokenizer.pad)
                    ids.append(packed[0])
                    types.append(packed[1])
                    paddings.append(packed[2])
                samples.append(build_sample(ids, types, paddings, label,
                                            first_uid + len(samples)))
    print_rank_0(f"    > {path}: {documents} documents, {len(samples)} questions")
    return samples


class RaceDataset(Dataset):
    """RACE questions of one or more folders; item i is {'text', 'types',
    'padding_mask' [4, s], 'label', 'uid'}. sample_multiplier: the sequences per item."""

    sample_multiplier = NUM_CHOICES

    def __init__(self, dataset_name: str, datapaths: Sequence[str], tokenizer,
                 max_seq_length: int, max_qa_length: int = MAX_QA_LENGTH) -> None:
        self.dataset_name = dataset_name
        print_rank_0(f" > building RACE dataset for {dataset_name}:")
        print_rank_0("  > paths: " + " ".join(datapaths))
        self.samples: list[dict] = []
        for path in datapaths:
            self.samples.extend(race_examples(path, tokenizer, max_seq_length, max_qa_length,
                                              first_uid=len(self.samples)))
        if not self.samples:
            raise TaskDataError(f"{' '.join(datapaths)}: no RACE questions")
        print_rank_0(f"  >> total number of samples: {len(self.samples)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        return self.samples[idx]


def dataset_name_from_path(path: str) -> str:
    """'data/RACE/dev/middle' -> 'dev-middle': the path after its 'RACE' folder (else
    its last two parts), '/' as '-'."""
    parts = os.path.normpath(path).split(os.sep)
    if "RACE" in parts[:-1]:
        rest = parts[len(parts) - parts[::-1].index("RACE"):]
    else:
        rest = parts[-2:]
    return "-".join(rest)
