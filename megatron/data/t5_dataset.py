"""T5 pretraining dataset: span corruption with ``<extra_id_N>`` sentinels."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
import torch

from megatron.data.dataset_utils import (
    MaskingVocab,
    create_masked_lm_predictions,
    get_samples_mapping,
)


class T5Dataset(torch.utils.data.Dataset):
    """Encoder inputs of up to ``max_seq_length`` tokens (sentences of one document,
    from ``get_samples_mapping``) with masked spans replaced by sentinels; decoder
    sequences of up to ``max_seq_length_dec`` tokens that spell the spans out.

    ``vocab`` needs bos/eos ids and sentinel ids (``--vocab-extra-ids``); default from
    ``megatron.get_tokenizer()``. ``doc_idx`` restricts the documents as in BertDataset.
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
        max_seq_length_dec: int,
        short_seq_prob: float,
        seed: int,
        vocab: MaskingVocab | None = None,
        doc_idx: np.ndarray | None = None,
    ):
        if not 0.0 <= masked_lm_prob <= 1.0:
            raise ValueError(f"--mask-prob must be in [0, 1], got {masked_lm_prob}")
        self.name = name
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.max_seq_length_dec = max_seq_length_dec
        self.indexed_dataset = indexed_dataset
        self.vocab = vocab if vocab is not None else MaskingVocab.from_tokenizer()
        if not self.vocab.sentinel_ids:
            raise ValueError("T5 needs sentinel tokens: set --vocab-extra-ids (e.g. 100)")
        if self.vocab.bos_id is None or self.vocab.eos_id is None:
            raise ValueError("T5 needs a tokenizer with bos and eos tokens")
        # room for the decoder's bos/eos
        self.samples_mapping = get_samples_mapping(
            indexed_dataset, data_prefix, num_epochs, max_num_samples, max_seq_length - 2,
            short_seq_prob, seed, name, False, doc_idx=doc_idx,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.samples_mapping.shape[0]

    def __getitem__(self, idx: int) -> dict:
        start_index, end_index, seq_length = (int(x) for x in self.samples_mapping[idx])
        sample = [self.indexed_dataset[i] for i in range(start_index, end_index)]
        np_rng = np.random.RandomState(seed=(self.seed + idx) % 2**32)
        return build_training_sample(
            sample, seq_length, self.max_seq_length, self.max_seq_length_dec, self.vocab,
            self.masked_lm_prob, np_rng,
        )  # fmt: skip


def build_training_sample(
    sample: Sequence[Sequence[int]],
    target_seq_length: int,
    max_seq_length: int,
    max_seq_length_dec: int,
    vocab: MaskingVocab,
    masked_lm_prob: float,
    np_rng: np.random.RandomState,
) -> dict:
    """One T5 sample: the sentences joined and cut to ``target_seq_length`` tokens,
    spans of n ~ min(Geometric(0.2), 10) words masked (``masked_lm_prob`` of the
    tokens in all), then ``build_t5_inputs``. ``truncated`` says whether tokens were cut.
    """
    if target_seq_length > max_seq_length:
        raise ValueError(f"target length {target_seq_length} > max_seq_length {max_seq_length}")
    tokens = [int(t) for sentence in sample for t in sentence]
    truncated = len(tokens) > target_seq_length
    tokens = tokens[:target_seq_length]
    max_predictions_per_seq = masked_lm_prob * target_seq_length
    tokens, _, _, _, masked_spans = create_masked_lm_predictions(
        tokens, vocab.vocab_id_list, vocab.vocab_id_to_token_dict, masked_lm_prob,
        vocab.cls_id, vocab.sep_id, vocab.mask_id, max_predictions_per_seq, np_rng,
        max_ngrams=10, geometric_dist=True, masking_style="t5",
    )  # fmt: skip
    out = build_t5_inputs(tokens, masked_spans, vocab, max_seq_length, max_seq_length_dec)
    out["truncated"] = int(truncated)
    return out


def build_t5_inputs(
    tokens: list[int],
    masked_spans: Sequence,
    vocab: MaskingVocab,
    max_seq_length: int,
    max_seq_length_dec: int,
) -> dict:
    """Encoder/decoder arrays for span corruption.

    Span k (in order of position) becomes sentinel S_k in the encoder input; the decoder
    input is ``[bos] S_0 span_0 S_1 span_1 ...`` and the labels are the same shifted
    left, ``S_0 span_0 S_1 span_1 ... [eos]``. All int64, padded with pad_id (labels
    with -1): text_enc [Le], text_dec/labels/loss_mask [Ld], enc_mask [Le, Le],
    dec_mask [Ld, Ld] (causal), enc_dec_mask [Ld, Le]; masks are 1 where both query and
    key are real tokens.
    """
    if len(masked_spans) > len(vocab.sentinel_ids):
        raise ValueError(
            f"T5 sample has {len(masked_spans)} masked spans but only "
            f"{len(vocab.sentinel_ids)} sentinel tokens (--vocab-extra-ids)"
        )
    sentinels = collections.deque(vocab.sentinel_ids)
    enc, dec_in, dec_out = [], [vocab.bos_id], []
    start = 0
    for span in masked_spans:
        flag = sentinels.popleft()
        dec_in += [flag, *span.label]
        dec_out += [flag, *span.label]
        enc += [*tokens[start : span.index[0]], flag]
        start = span.index[-1] + 1
    dec_out.append(vocab.eos_id)
    enc += tokens[start:]

    pad_enc = max_seq_length - len(enc)
    pad_dec = max_seq_length_dec - len(dec_in)
    if pad_enc < 0 or pad_dec < 0:
        raise ValueError(
            f"T5 sample of {len(enc)} encoder / {len(dec_in)} decoder tokens exceeds "
            f"--seq-length {max_seq_length} / --decoder-seq-length {max_seq_length_dec}"
        )
    text_enc = np.array(enc + [vocab.pad_id] * pad_enc, dtype=np.int64)  # [Le]
    text_dec = np.array(dec_in + [vocab.pad_id] * pad_dec, dtype=np.int64)  # [Ld]
    enc_real = np.array([1] * len(enc) + [0] * pad_enc, dtype=np.int64)
    dec_real = np.array([1] * len(dec_in) + [0] * pad_dec, dtype=np.int64)
    causal = np.tril(np.ones((max_seq_length_dec, max_seq_length_dec), dtype=np.int64))
    return {
        "text_enc": text_enc,
        "text_dec": text_dec,
        "labels": np.array(dec_out + [-1] * pad_dec, dtype=np.int64),
        "loss_mask": dec_real.copy(),
        "enc_mask": np.outer(enc_real, enc_real),  # [Le, Le]
        "dec_mask": np.outer(dec_real, dec_real) * causal,  # [Ld, Ld]
        "enc_dec_mask": np.outer(dec_real, enc_real),  # [Ld, Le]
    }
