"""Text to model inputs for the fine-tuning tasks: BERT's pair packing

    [CLS] a_1 .. a_n [SEP] b_1 .. b_m [SEP] [PAD] ..      (token types 0 .. 0 1 .. 1 0 ..)

cut to the sequence length (the end of the pair goes, a closing [SEP] stays), and the
sample dict every task dataset yields.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


class TaskDataError(ValueError):
    """A task data file that cannot be read; the message names the file (and line)."""


def clean_text(text: str) -> str:
    """One line, single spaces, and ' . ' closed up to '. ' (Megatron's clean-up)."""
    text = re.sub(r"\s+", " ", text.replace("\n", " "))
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


def pack_pair(
    a_ids: Sequence[int],
    b_ids: Sequence[int] | None,
    max_seq_length: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> tuple[list[int], list[int], list[int]]:
    """(token ids, token types, padding mask (1 = token)), each max_seq_length long.

    With b the sequence is [CLS] a [SEP] b [SEP]; without it [CLS] a [SEP]. When it does
    not fit, everything from position max_seq_length - 1 on is cut and a [SEP] ends the
    sequence (typed as the segment it closes)."""
    if max_seq_length < 3:
        raise ValueError(f"--seq-length {max_seq_length} cannot hold [CLS] a [SEP]")
    ids = [cls_id, *a_ids, sep_id]
    types = [0] * len(ids)
    if b_ids is not None:
        ids += list(b_ids)
        types += [1] * len(b_ids)
    trimmed = len(ids) >= max_seq_length
    if trimmed:
        ids, types = ids[: max_seq_length - 1], types[: max_seq_length - 1]
    if b_ids is not None or trimmed:
        ids.append(sep_id)
        types.append(0 if b_ids is None else 1)
    padding = [1] * len(ids)
    extra = max_seq_length - len(ids)
    ids += [pad_id] * extra
    types += [0] * extra
    padding += [0] * extra
    return ids, types, padding


def tokenize_pair(text_a: str, text_b: str | None, tokenizer, max_seq_length: int):
    """pack_pair of the tokenized texts (the tokenizer's [CLS], [SEP] and [PAD] ids)."""
    b_ids = None if text_b is None else tokenizer.tokenize(text_b)
    return pack_pair(
        tokenizer.tokenize(text_a), b_ids, max_seq_length, tokenizer.cls, tokenizer.sep,
        tokenizer.pad,
    )


def build_sample(ids, types, paddings, label: int, uid: int) -> dict:
    """{'text', 'types', 'padding_mask' (int64 arrays), 'label', 'uid'}: one example
    ([s] each for a pair, [c, s] for c choices)."""
    return {
        "text": np.asarray(ids, dtype=np.int64),
        "types": np.asarray(types, dtype=np.int64),
        "padding_mask": np.asarray(paddings, dtype=np.int64),
        "label": int(label),
        "uid": int(uid),
    }
