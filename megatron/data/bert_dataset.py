"""BERT pretraining dataset: sentence pairs with masked-LM and sentence-order targets."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron.data.dataset_utils import (
    MaskingVocab,
    create_masked_lm_predictions,
    create_tokens_and_token_types,
    get_a_and_b_segments,
    get_samples_mapping,
    pad_and_convert_to_numpy,
    truncate_segments,
)


class BertDataset(torch.utils.data.Dataset):
    """Samples of up to ``max_seq_length`` tokens built from runs of whole sentences of
    one document (``get_samples_mapping``), reproducible per (seed, index).

    ``vocab`` holds the special ids and the vocabulary (default: from
    ``megatron.get_tokenizer()``); ``doc_idx`` restricts the samples to the documents
    whose sentence boundaries it lists (default: all of ``indexed_dataset``).
    """

    def __init__(
        self,
        name: str,
        indexed_dataset,
        data_prefix: str,
        num_epochs: int | None,
        max_num_samples: int | None,
        masked_lm_prob: float,
        max_seq_length: int,
        short_seq_prob: float,
        seed: int,
        binary_head: bool,
        vocab: MaskingVocab | None = None,
        doc_idx: np.ndarray | None = None,
    ):
        if not 0.0 <= masked_lm_prob <= 1.0:
            raise ValueError(f"--mask-prob must be in [0, 1], got {masked_lm_prob}")
        if max_seq_length < 5:
            raise ValueError(f"--seq-length {max_seq_length} is too short for a BERT sample")
        self.name = name
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.binary_head = binary_head
        self.indexed_dataset = indexed_dataset
        self.vocab = vocab if vocab is not None else MaskingVocab.from_tokenizer()
        # room for [CLS], [SEP], [SEP]
        self.samples_mapping = get_samples_mapping(
            indexed_dataset, data_prefix, num_epochs, max_num_samples, max_seq_length - 3,
            short_seq_prob, seed, name, binary_head, doc_idx=doc_idx,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.samples_mapping.shape[0]

    def __getitem__(self, idx: int) -> dict:
        start_idx, end_idx, seq_length = (int(x) for x in self.samples_mapping[idx])
        sample = [self.indexed_dataset[i] for i in range(start_idx, end_idx)]
        # per-sample generator: the same index gives the same sample on every run
        np_rng = np.random.RandomState(seed=(self.seed + idx) % 2**32)
        return build_training_sample(
            sample, seq_length, self.max_seq_length, self.vocab, self.masked_lm_prob,
            np_rng, self.binary_head,
        )  # fmt: skip


def build_training_sample(
    sample: Sequence[Sequence[int]],
    target_seq_length: int,
    max_seq_length: int,
    vocab: MaskingVocab,
    masked_lm_prob: float,
    np_rng: np.random.RandomState,
    binary_head: bool,
) -> dict:
    """One BERT sample from a list of sentences (token id arrays).

    With ``binary_head`` the sentences are cut into segments A and B, swapped with
    probability 1/2 (``is_random`` = 1); without it all sentences form segment A. The
    pair is truncated to ``target_seq_length`` tokens, framed as
    ``[CLS] A [SEP] B [SEP]``, masked, and padded to ``max_seq_length``:
    text/types/labels/loss_mask/padding_mask int64 [max_seq_length], labels -1 where
    there is no target, is_random and truncated ints.
    """
    if target_seq_length > max_seq_length:
        raise ValueError(f"target length {target_seq_length} > max_seq_length {max_seq_length}")
    if binary_head:
        tokens_a, tokens_b, is_next_random = get_a_and_b_segments(sample, np_rng)
    else:
        tokens_a = [int(t) for sentence in sample for t in sentence]
        tokens_b, is_next_random = [], False
    max_num_tokens = target_seq_length
    truncated = truncate_segments(
        tokens_a, tokens_b, len(tokens_a), len(tokens_b), max_num_tokens, np_rng
    )
    tokens, tokentypes = create_tokens_and_token_types(
        tokens_a, tokens_b, vocab.cls_id, vocab.sep_id
    )
    max_predictions_per_seq = masked_lm_prob * max_num_tokens
    tokens, masked_positions, masked_labels, _, _ = create_masked_lm_predictions(
        tokens, vocab.vocab_id_list, vocab.vocab_id_to_token_dict, masked_lm_prob,
        vocab.cls_id, vocab.sep_id, vocab.mask_id, max_predictions_per_seq, np_rng,
    )  # fmt: skip
    text, types, labels, padding_mask, loss_mask = pad_and_convert_to_numpy(
        tokens, tokentypes, masked_positions, masked_labels, vocab.pad_id, max_seq_length
    )
    return {
        "text": text,
        "types": types,
        "labels": labels,
        "is_random": int(is_next_random),
        "loss_mask": loss_mask,
        "padding_mask": padding_mask,
        "truncated": int(truncated),
    }
