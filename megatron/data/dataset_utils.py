"""Shared pieces of the GPT, BERT and T5 datasets.

* split strings (``--split 949,50,1``) and weighted prefix lists (``--data-path 0.3 a 0.7 b``);
* index caches (``.npy``) built once by global rank 0, written atomically, rebuilt when
  unreadable, and read by every rank after a barrier;
* BERT/T5 sample building: sentence-pair segments, truncation, ``[CLS] a [SEP] b [SEP]``
  token types, masked-LM predictions (n-gram / whole-word masking, 80/10/10 replacement),
  padding; ``get_samples_mapping`` over ``helpers.build_mapping``;
* ``build_train_valid_test_datasets`` for ``standard_bert`` and ``t5``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from megatron import print_rank_0

DSET_TYPE_BERT = "standard_bert"
DSET_TYPE_T5 = "t5"
DSET_TYPES = [DSET_TYPE_BERT, DSET_TYPE_T5]

# Sentinel "no limit" values of get_samples_mapping (as Megatron spells the file names).
_NO_EPOCH_LIMIT = np.iinfo(np.int32).max - 1
_NO_SAMPLE_LIMIT = np.iinfo(np.int64).max - 1


class DataPathError(ValueError):
    """Data flags (--data-path, --train-data-path, ..., --split) that cannot give a run."""


# ----------------------------------------------------------------------------- splits


def get_train_valid_test_split_(splits_string: str, size: int) -> list[int]:
    """Document boundaries [0, a, b, size] of the train/valid/test splits.

    ``splits_string`` holds up to three non-negative weights separated by ``,`` or ``/``
    (``"949,50,1"``, ``"0.9/0.1"``, ``"100"``); missing ones are 0. Split i gets
    round(w_i / sum(w) * size) documents; the rounding error goes to the first split of
    positive weight so that the last boundary is exactly ``size``. (Megatron gives it to
    the train split even at weight 0, so that ``0,50,50`` could train on a document of the
    other splits, or give a negative boundary; with a positive train weight, as usual, the
    two agree.)
    """
    sep = "," if "," in splits_string else "/"
    try:
        splits = [float(s) for s in splits_string.split(sep)]
    except ValueError:
        raise ValueError(
            f"--split: cannot parse {splits_string!r} (expected e.g. 949,50,1)"
        ) from None
    if len(splits) > 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(
            f"--split: {splits_string!r} must be at most three non-negative weights "
            "with a positive sum"
        )
    splits = (splits + [0.0, 0.0])[:3]
    total = sum(splits)
    index = [0]
    for split in splits:
        index.append(index[-1] + int(round(split / total * float(size))))
    diff = index[-1] - size
    first = next(i for i, split in enumerate(splits) if split > 0)
    return index[: first + 1] + [i - diff for i in index[first + 1 :]]


def parse_weighted_prefixes(values: Sequence[str], flag: str = "--data-path"):
    """``[prefix]`` or ``[w0, prefix0, w1, prefix1, ...]`` as ``[(weight, prefix), ...]``.

    Weights are positive finite numbers: a corpus of weight 0 would silently get no
    samples, so it is an error naming the weight and the prefix.
    """
    values = [str(v) for v in values]
    if len(values) == 1:
        return [(1.0, values[0].strip())]
    if not values or len(values) % 2 != 0:
        raise DataPathError(f"{flag}: weighted list {values} must alternate weight and prefix")
    pairs = []
    for text, prefix in zip(values[0::2], values[1::2]):
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise DataPathError(
                f"{flag}: weight {text!r} of {prefix} must be a positive number"
                " (leave out a corpus instead of giving it weight 0)"
            )
        pairs.append((weight, prefix.strip()))
    return pairs


def get_datasets_weights_and_num_samples(
    data_prefix: Sequence[str], train_valid_test_num_samples: Sequence[int]
) -> tuple[list[str], list[float], list[list[int]]]:
    """Parse ``[w0, prefix0, w1, prefix1, ...]`` into prefixes, normalised weights and
    per-dataset sample counts ceil(n * w_i * 1.005) for each of train/valid/test (the
    0.5% margin keeps the blend from running past the end of a dataset)."""
    if len(data_prefix) < 2:
        raise DataPathError(
            f"--data-path: weighted list {list(data_prefix)} must alternate weight and prefix"
        )
    pairs = parse_weighted_prefixes(data_prefix)
    prefixes = [p for _, p in pairs]
    total = sum(w for w, _ in pairs)
    weights = [w / total for w, _ in pairs]
    num_samples = [
        [int(math.ceil(n * w * 1.005)) for n in train_valid_test_num_samples] for w in weights
    ]
    return prefixes, weights, num_samples


def require_train_documents(prefix: str, splits_string: str, num_docs: int) -> list[int]:
    """The split boundaries of ``num_docs`` documents; DataPathError when the train split
    gets none (an empty corpus, or ``--split 0,50,50``)."""
    splits = get_train_valid_test_split_(splits_string, num_docs)
    if splits[1] <= splits[0]:
        raise DataPathError(
            f"no training documents: --split {splits_string} gives the train split 0 of "
            f"{num_docs} documents of {prefix}"
        )
    return splits


# ----------------------------------------------------------------------- index caches


def global_rank() -> int:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _barrier() -> None:
    """Wait until global rank 0 has written the caches.

    Without model parallelism every rank builds datasets: a global barrier. With
    tensor parallelism only tensor-parallel rank 0 of each group builds them (as in
    Megatron's training loop), so those ranks meet over the data-parallel group, then
    over the pipeline group: rank (dp=i, pp=j) waits for (i, 0), which waited for
    (0, 0) = global rank 0. (With DeepSpeed-Ulysses the sequence ranks are in that first
    group too: the sequence-data group.)
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from megatron import mpu

    if mpu.model_parallel_is_initialized() and mpu.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.barrier(group=mpu.get_sequence_data_parallel_group())
        torch.distributed.barrier(group=mpu.get_pipeline_model_parallel_group())
    else:
        torch.distributed.barrier()


_CACHE_DIR: list[str | None] = [None]  # --data-cache-path of the datasets being built


@contextlib.contextmanager
def index_cache_dir(path: str | None):
    """Build the datasets inside this block with their index caches in ``path``
    (--data-cache-path) instead of beside the data; None: beside the data."""
    previous = _CACHE_DIR[0]
    _CACHE_DIR[0] = os.path.abspath(path) if path else None
    try:
        yield
    finally:
        _CACHE_DIR[0] = previous


def cache_prefix(data_prefix: str) -> str:
    """Where the index caches of ``data_prefix`` go: beside the data, or in the
    --data-cache-path folder under the data's name and a hash of its full path (two
    corpora of the same name in different folders do not share caches)."""
    folder = _CACHE_DIR[0]
    if folder is None:
        return data_prefix
    digest = hashlib.md5(os.path.abspath(data_prefix).encode("utf-8")).hexdigest()[:10]
    return os.path.join(folder, f"{os.path.basename(data_prefix)}_{digest}")


def save_npy_atomically(path: str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file and a rename, so that a reader
    never sees a half-written cache."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_all(paths: Sequence[str], validate: Callable[[list[np.ndarray]], None]):
    """Memory-map every cache and run ``validate``; raises OSError/ValueError naming the
    file on any problem."""
    arrays = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"index cache {path} does not exist")
        try:
            arrays.append(np.load(path, allow_pickle=False, mmap_mode="r"))
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"index cache {path} is unreadable: {err}") from None
    validate(arrays)
    return arrays


def build_or_load_caches(
    paths: Sequence[str],
    build: Callable[[], Sequence[np.ndarray]],
    validate: Callable[[list[np.ndarray]], None],
) -> list[np.ndarray]:
    """Return the arrays cached at ``paths`` (memory-mapped, read-only).

    Global rank 0 checks the files and, when one is missing, unreadable or fails
    ``validate`` (which raises ValueError naming the file), calls ``build()`` and writes
    every array atomically; all ranks then meet at a barrier and load. Rank 0 always
    reaches the barrier, even when building fails, so other ranks report a missing file
    instead of hanging.
    """
    if global_rank() == 0:
        try:
            try:
                _load_all(paths, validate)
            except FileNotFoundError:
                need_build = True
            except ValueError as err:
                print(f" > WARNING: {err}; rebuilding", flush=True)
                need_build = True
            else:
                need_build = False
            if need_build:
                start = time.time()
                arrays = build()
                for folder in {os.path.dirname(path) for path in paths}:
                    try:
                        os.makedirs(folder or ".", exist_ok=True)
                    except OSError as err:
                        raise OSError(f"index cache folder {folder}: {err}") from err
                for path, array in zip(paths, arrays):
                    save_npy_atomically(path, array)
                print_rank_0(
                    f" > built and saved {len(paths)} index cache(s) "
                    f"({time.time() - start:.2f} s): {paths[0]} ..."
                )
        finally:
            _barrier()
    else:
        _barrier()
    try:
        return _load_all(paths, validate)
    except (FileNotFoundError, ValueError) as err:
        raise RuntimeError(f"{err} (global rank 0 should have built it; see its log)") from None


# ------------------------------------------------------------------- masking vocabulary


@dataclass(frozen=True)
class MaskingVocab:
    """Token ids that BERT/T5 sample building needs; by default read from the tokenizer."""

    vocab_id_list: list[int]  # ids a masked token may be replaced with (10% case)
    vocab_id_to_token_dict: dict[int, str]  # id -> piece, to find '##' word continuations
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    bos_id: int | None = None  # T5 decoder start
    eos_id: int | None = None  # T5 decoder end
    sentinel_ids: tuple[int, ...] = ()  # T5 <extra_id_N> span sentinels, in order

    @classmethod
    def from_tokenizer(cls, tokenizer=None) -> MaskingVocab:
        """Build from a Megatron tokenizer (``megatron.get_tokenizer()`` when None)."""
        if tokenizer is None:
            from megatron import get_tokenizer

            tokenizer = get_tokenizer()
        inv_vocab = tokenizer.inv_vocab
        return cls(
            vocab_id_list=list(inv_vocab.keys()),
            vocab_id_to_token_dict=dict(inv_vocab),
            cls_id=tokenizer.cls,
            sep_id=tokenizer.sep,
            mask_id=tokenizer.mask,
            pad_id=tokenizer.pad,
            bos_id=getattr(tokenizer, "bos_token_id", None),
            eos_id=getattr(tokenizer, "eos_token_id", None),
            sentinel_ids=tuple(getattr(tokenizer, "additional_special_tokens_ids", ()) or ()),
        )


# ------------------------------------------------------------------ sentence segments


def get_a_and_b_segments(
    sample: Sequence[Sequence[int]], np_rng: np.random.RandomState
) -> tuple[list[int], list[int], bool]:
    """Split a list of >= 2 sentences at a random point into segments A and B; with
    probability 1/2 swap them (the sentence-order target ``is_next_random``)."""
    n_sentences = len(sample)
    if n_sentences < 2:
        raise ValueError(f"get_a_and_b_segments: need at least 2 sentences, got {n_sentences}")
    a_end = 1
    if n_sentences >= 3:
        a_end = np_rng.randint(1, n_sentences)
    tokens_a = [int(t) for sentence in sample[:a_end] for t in sentence]
    tokens_b = [int(t) for sentence in sample[a_end:] for t in sentence]
    is_next_random = False
    if np_rng.random() < 0.5:
        is_next_random = True
        tokens_a, tokens_b = tokens_b, tokens_a
    return tokens_a, tokens_b, is_next_random


def truncate_segments(
    tokens_a: list[int],
    tokens_b: list[int],
    len_a: int,
    len_b: int,
    max_num_tokens: int,
    np_rng: np.random.RandomState,
) -> bool:
    """Shorten the longer segment, one token at a time from a random end, until
    len_a + len_b <= max_num_tokens (in place). Returns whether anything was cut."""
    assert len_a > 0, "segment A is empty"
    if len_a + len_b <= max_num_tokens:
        return False
    while len_a + len_b > max_num_tokens:
        if len_a > len_b:
            len_a -= 1
            tokens = tokens_a
        else:
            len_b -= 1
            tokens = tokens_b
        if np_rng.random() < 0.5:
            del tokens[0]
        else:
            tokens.pop()
    return True


def create_tokens_and_token_types(
    tokens_a: list[int], tokens_b: list[int], cls_id: int, sep_id: int
) -> tuple[list[int], list[int]]:
    """``[CLS] a [SEP] b [SEP]`` with token types 0 for [CLS], a and the first [SEP], 1
    for b and the last [SEP]; without b, just ``[CLS] a [SEP]``."""
    tokens = [cls_id, *tokens_a, sep_id]
    tokentypes = [0] * len(tokens)
    if tokens_b:
        tokens += [*tokens_b, sep_id]
        tokentypes += [1] * (len(tokens_b) + 1)
    return tokens, tokentypes


# ------------------------------------------------------------------------ masked LM

MaskedLmInstance = collections.namedtuple("MaskedLmInstance", ["index", "label"])


def is_start_piece(piece: str) -> bool:
    """A WordPiece starts a word unless it is a '##' continuation."""
    return not piece.startswith("##")


def _candidate_words(tokens, vocab_id_to_token_dict, cls_id, sep_id, do_whole_word_mask):
    """Group maskable positions into words (lists of positions); [CLS]/[SEP] excluded."""
    cand_indexes: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token == cls_id or token == sep_id:
            continue
        piece = vocab_id_to_token_dict.get(token, "") if vocab_id_to_token_dict else ""
        if do_whole_word_mask and cand_indexes and not is_start_piece(piece):
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    return cand_indexes


def _replacement(token, vocab_id_list, mask_id, masking_style, np_rng):
    """BERT: 80% [MASK], 10% unchanged, 10% random vocabulary id; T5: always [MASK]."""
    if masking_style == "t5":
        return mask_id
    if np_rng.random() < 0.8:
        return mask_id
    if np_rng.random() < 0.5:
        return token
    return vocab_id_list[np_rng.randint(0, len(vocab_id_list))]


def _pick_span(cand_index_set, budget, ngrams, pvals, geometric_dist, np_rng) -> list[int]:
    """Positions of an n-gram of words from ``cand_index_set`` (its n-grams for n = 1..):
    n drawn from ``pvals`` or min(Geometric(0.2), max n), then shortened while the span
    exceeds ``budget`` (it may still exceed it at n = 1). N-grams starting near the last
    word are cut short by the slicing that built them."""
    if geometric_dist:
        n = min(int(np_rng.geometric(0.2)), len(ngrams))
    else:
        n = int(np_rng.choice(ngrams, p=pvals))
    index_set = sum(cand_index_set[n - 1], [])
    while len(index_set) > budget and n > 1:
        n -= 1
        index_set = sum(cand_index_set[n - 1], [])
    return index_set


def create_masked_lm_predictions(
    tokens: list[int],
    vocab_id_list: Sequence[int],
    vocab_id_to_token_dict: dict[int, str],
    masked_lm_prob: float,
    cls_id: int,
    sep_id: int,
    mask_id: int,
    max_predictions_per_seq: float,
    np_rng: np.random.RandomState,
    max_ngrams: int = 3,
    do_whole_word_mask: bool = True,
    favor_longer_ngram: bool = False,
    geometric_dist: bool = False,
    masking_style: str = "bert",
):
    """Choose and replace masked-LM targets (n-gram masking as in Megatron).

    Targets: min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))
    positions. Candidates are words (a word is its start piece plus following '##'
    pieces when ``do_whole_word_mask``), visited in random order; from each an n-gram of
    n consecutive words is taken with P(n) ∝ 1/n for n <= max_ngrams (reversed when
    ``favor_longer_ngram``), or n ~ min(Geometric(0.2), max_ngrams) when
    ``geometric_dist`` (T5 spans). n shrinks while the span would exceed the budget;
    spans overlapping earlier ones are skipped.

    Returns (output_tokens, masked_positions, masked_labels, token_boundary, masked_spans)
    with positions sorted, spans sorted by first position, token_boundary[i] = 1 at word
    starts and special tokens.
    """
    if masking_style not in ("bert", "t5"):
        raise ValueError(f"masking_style must be 'bert' or 't5', got {masking_style!r}")
    token_boundary = [
        1 if t in (cls_id, sep_id) or is_start_piece(vocab_id_to_token_dict.get(t, "")) else 0
        for t in tokens
    ]
    cand_indexes = _candidate_words(
        tokens, vocab_id_to_token_dict, cls_id, sep_id, do_whole_word_mask
    )
    output_tokens = list(tokens)
    if masked_lm_prob == 0:
        return output_tokens, [], [], token_boundary, []
    num_to_predict = min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob))))

    ngrams = np.arange(1, max_ngrams + 1, dtype=np.int64)
    pvals = 1.0 / np.arange(1, max_ngrams + 1)
    pvals /= pvals.sum()
    if favor_longer_ngram:
        pvals = pvals[::-1]
    # ngram_indexes[w][n-1] = the n consecutive words starting at word w
    ngram_indexes = [[cand_indexes[w : w + n] for n in ngrams] for w in range(len(cand_indexes))]
    np_rng.shuffle(ngram_indexes)

    masked_lms, masked_spans, covered = [], [], set()
    for cand_index_set in ngram_indexes:
        if len(masked_lms) >= num_to_predict:
            break
        budget = num_to_predict - len(masked_lms)
        index_set = _pick_span(cand_index_set, budget, ngrams, pvals, geometric_dist, np_rng)
        if len(index_set) > budget or any(index in covered for index in index_set):
            continue
        for index in index_set:
            covered.add(index)
            output_tokens[index] = _replacement(
                tokens[index], vocab_id_list, mask_id, masking_style, np_rng
            )
            masked_lms.append(MaskedLmInstance(index=index, label=tokens[index]))
        masked_spans.append(MaskedLmInstance(index=index_set, label=[tokens[i] for i in index_set]))
    masked_lms.sort(key=lambda x: x.index)
    masked_spans.sort(key=lambda x: x.index[0])
    positions = [m.index for m in masked_lms]
    labels = [m.label for m in masked_lms]
    return output_tokens, positions, labels, token_boundary, masked_spans


def pad_and_convert_to_numpy(
    tokens: list[int],
    tokentypes: list[int],
    masked_positions: list[int],
    masked_labels: list[int],
    pad_id: int,
    max_seq_length: int,
):
    """Pad to ``max_seq_length`` and return int64 arrays (tokens, tokentypes, labels,
    padding_mask, loss_mask): labels are -1 except at masked positions, where loss_mask
    is 1; padding_mask is 1 on real tokens."""
    num_tokens = len(tokens)
    padding_length = max_seq_length - num_tokens
    if padding_length < 0:
        raise ValueError(f"sample of {num_tokens} tokens exceeds max_seq_length={max_seq_length}")
    assert len(tokentypes) == num_tokens and len(masked_positions) == len(masked_labels)
    filler = [pad_id] * padding_length
    tokens_np = np.array(tokens + filler, dtype=np.int64)
    tokentypes_np = np.array(tokentypes + filler, dtype=np.int64)
    padding_mask_np = np.array([1] * num_tokens + [0] * padding_length, dtype=np.int64)
    labels_np = np.full(max_seq_length, -1, dtype=np.int64)
    loss_mask_np = np.zeros(max_seq_length, dtype=np.int64)
    if masked_positions:
        positions = np.asarray(masked_positions, dtype=np.int64)
        assert positions.max() < num_tokens
        labels_np[positions] = masked_labels
        loss_mask_np[positions] = 1
    return tokens_np, tokentypes_np, labels_np, padding_mask_np, loss_mask_np


# ------------------------------------------------------------------ samples mapping


def get_indexed_dataset_(
    data_prefix: str, data_impl: str, skip_warmup: bool, eod_token: int | None = None
):
    """Open ``{data_prefix}.bin/.idx``, check that its document index covers every item
    (sentence, or whole document for GPT data) and log its size. With ``eod_token``, a
    few documents are checked for end-of-document tokens in the wrong places
    (``indexed_dataset.check_document_ends``)."""
    from megatron.data.indexed_dataset import check_document_ends, make_dataset

    start = time.time()
    indexed_dataset = make_dataset(data_prefix, data_impl, skip_warmup)
    if indexed_dataset is None:
        raise FileNotFoundError(f"--data-path: no {data_impl} dataset at {data_prefix}.bin/.idx")
    if indexed_dataset.sizes.shape[0] != indexed_dataset.doc_idx[-1]:
        raise ValueError(
            f"{data_prefix}.idx: document index ends at {indexed_dataset.doc_idx[-1]} but "
            f"the file holds {indexed_dataset.sizes.shape[0]} items"
        )
    if eod_token is not None:
        check_document_ends(indexed_dataset, data_prefix, eod_token)
    print_rank_0(
        f" > {data_prefix}: {indexed_dataset.doc_idx.shape[0] - 1} documents, "
        f"{indexed_dataset.sizes.shape[0]} items ({time.time() - start:.2f} s to open)"
    )
    return indexed_dataset


def tokenizer_eod_token() -> int | None:
    """The eod id of the tokenizer built by ``initialize_megatron``, when that tokenizer
    turns no text into it (so that any eod in the data was appended by
    ``--append-eod``); else None (no tokenizer, no eod, or one that text can produce)."""
    from megatron import global_vars

    tokenizer = getattr(global_vars, "_GLOBAL_TOKENIZER", None)
    if tokenizer is None:
        return None
    try:
        eod = int(tokenizer.eod)
        if eod in tokenizer.tokenize(tokenizer.detokenize([eod])):
            return None
    except Exception:  # noqa: BLE001 - a tokenizer without eod or round trip: no check
        return None
    return eod


# ------------------------------------------------------------------ data flag checks


def _training_requested(args) -> bool:
    return any((getattr(args, name, None) or 0) > 0 for name in ("train_iters", "train_samples"))


def _missing_files_message(flag: str, prefix: str) -> str | None:
    from megatron.data.indexed_dataset import data_file_path, index_file_path

    missing = [p for p in (index_file_path(prefix), data_file_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return None
    message = f"{flag}: {' and '.join(missing)} not found (dataset prefix {prefix})"
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx"):
        message += f"; give the prefix without {ext}: {stem}"
    return message


def _open_for_check(flag: str, prefix: str, data_impl: str, eod_token: int | None):
    message = _missing_files_message(flag, prefix)
    if message is not None:
        raise DataPathError(message)
    from megatron.data.indexed_dataset import check_document_ends, make_dataset

    dataset = make_dataset(prefix, data_impl, skip_warmup=True)
    if eod_token is not None:
        check_document_ends(dataset, prefix, eod_token)
    return dataset


def check_data_paths(args, eod_token: int | None | str = "tokenizer") -> None:
    """Check the data flags before any model is built; raise one-line errors naming the flag.

    Every prefix of ``--data-path`` (plain, or blended ``w1 p1 w2 p2 ...``) and of
    ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path`` must have its
    ``.idx`` and ``.bin``, of matching sizes; blend weights must be positive numbers; when
    training is asked for (``--train-iters`` or ``--train-samples`` > 0), ``--split`` must
    leave documents in the train split of every ``--data-path`` corpus, and every
    ``--train-data-path`` corpus must hold documents. Only index headers and a few pages
    of data are read. ``eod_token`` ("tokenizer": ``tokenizer_eod_token()``; None: no
    check) turns on ``indexed_dataset.check_document_ends``.
    """
    if eod_token == "tokenizer":
        eod_token = tokenizer_eod_token()
    data_impl = getattr(args, "data_impl", None) or "infer"
    training = _training_requested(args)
    for flag, attr in (
        ("--data-path", "data_path"),
        ("--train-data-path", "train_data_path"),
        ("--valid-data-path", "valid_data_path"),
        ("--test-data-path", "test_data_path"),
    ):
        values = getattr(args, attr, None)
        if isinstance(values, str):
            values = [values]
        if not values:
            continue
        for _, prefix in parse_weighted_prefixes(values, flag):
            dataset = _open_for_check(flag, prefix, data_impl, eod_token)
            num_docs = len(dataset.doc_idx) - 1
            split = getattr(args, "split", None)
            if training and attr == "data_path" and split:
                require_train_documents(prefix, split, num_docs)
            elif training and attr == "train_data_path" and num_docs == 0:
                raise DataPathError(f"no training documents: {flag} {prefix} holds 0 documents")


def samples_mapping_filename(
    data_prefix: str,
    name: str,
    num_epochs: int,
    max_num_samples: int,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
) -> str:
    """``{prefix}_{name}_indexmap[_{E}ep][_{N}mns]_{L}msl_{p:.2f}ssp_{seed}s.npy`` (prefix:
    ``cache_prefix(data_prefix)``)."""
    filename = f"{cache_prefix(data_prefix)}_{name}_indexmap"
    if num_epochs != _NO_EPOCH_LIMIT:
        filename += f"_{num_epochs}ep"
    if max_num_samples != _NO_SAMPLE_LIMIT:
        filename += f"_{max_num_samples}mns"
    return filename + f"_{max_seq_length}msl_{short_seq_prob:0.2f}ssp_{seed}s.npy"


def get_samples_mapping(
    indexed_dataset,
    data_prefix: str,
    num_epochs: int | None,
    max_num_samples: int | None,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    name: str,
    binary_head: bool,
    doc_idx: np.ndarray | None = None,
) -> np.ndarray:
    """Rows [first_sentence, end_sentence, target_seq_length] of every sample: sentences
    of one document packed up to ``max_seq_length`` tokens (a shorter random target with
    probability ``short_seq_prob``), over ``num_epochs`` passes or until
    ``max_num_samples``; rows shuffled with ``seed``. Built by ``helpers.build_mapping``
    on rank 0 and cached. ``doc_idx`` (document boundaries in sentence indices) restricts
    the mapping to a split; default the whole corpus."""
    if not num_epochs:
        if not max_num_samples:
            raise ValueError("get_samples_mapping: need num_epochs or max_num_samples")
        num_epochs = _NO_EPOCH_LIMIT
    if not max_num_samples:
        max_num_samples = _NO_SAMPLE_LIMIT
    path = samples_mapping_filename(
        data_prefix, name, num_epochs, max_num_samples, max_seq_length, short_seq_prob, seed
    )
    docs = np.asarray(indexed_dataset.doc_idx if doc_idx is None else doc_idx, dtype=np.int64)
    sizes = np.asarray(indexed_dataset.sizes, dtype=np.int32)

    def build():
        from megatron.data._helpers import get_helpers

        print_rank_0(f" > building samples index mapping for {name} ...")
        mapping = get_helpers().build_mapping(
            docs,
            sizes,
            num_epochs,
            max_num_samples,
            max_seq_length,
            short_seq_prob,
            seed,
            global_rank() == 0,
            2 if binary_head else 1,
        )
        return [mapping]

    def validate(arrays):
        (mapping,) = arrays
        if mapping.ndim != 2 or mapping.shape[1] != 3:
            raise ValueError(f"index cache {path} has shape {mapping.shape}, expected [n, 3]")
        if mapping.shape[0] > 0 and int(mapping[:, 1].max()) > sizes.shape[0]:
            raise ValueError(f"index cache {path} points past the end of {data_prefix}.idx")

    (mapping,) = build_or_load_caches([path], build, validate)
    print_rank_0(f" > loaded samples mapping {path}: {mapping.shape[0]} samples")
    return mapping


# --------------------------------------------------------- BERT / T5 dataset builders


def build_train_valid_test_datasets(
    data_prefix: Sequence[str],
    data_impl: str,
    splits_string: str,
    train_valid_test_num_samples: Sequence[int],
    max_seq_length: int,
    masked_lm_prob: float,
    short_seq_prob: float,
    seed: int,
    skip_warmup: bool,
    binary_head: bool = False,
    max_seq_length_dec: int | None = None,
    dataset_type: str = DSET_TYPE_BERT,
    vocab: MaskingVocab | None = None,
):
    """Train/valid/test BERT or T5 datasets from one prefix or a weighted prefix list
    (blended with ``BlendableDataset``); a split with no documents is None."""
    if dataset_type not in DSET_TYPES:
        raise ValueError(f"dataset_type {dataset_type!r} is not one of {DSET_TYPES}")
    kwargs = dict(
        data_impl=data_impl,
        splits_string=splits_string,
        max_seq_length=max_seq_length,
        masked_lm_prob=masked_lm_prob,
        short_seq_prob=short_seq_prob,
        seed=seed,
        skip_warmup=skip_warmup,
        binary_head=binary_head,
        max_seq_length_dec=max_seq_length_dec,
        dataset_type=dataset_type,
        vocab=vocab,
    )
    if isinstance(data_prefix, str):
        data_prefix = [data_prefix]
    if len(data_prefix) == 1:
        return _build_train_valid_test_datasets(
            data_prefix[0], train_valid_test_num_samples=train_valid_test_num_samples, **kwargs
        )
    prefixes, weights, per_dataset_num_samples = get_datasets_weights_and_num_samples(
        data_prefix, train_valid_test_num_samples
    )
    splits = [[], [], []]
    for prefix, num_samples in zip(prefixes, per_dataset_num_samples):
        for i, ds in enumerate(
            _build_train_valid_test_datasets(
                prefix, train_valid_test_num_samples=num_samples, **kwargs
            )
        ):
            if ds is not None:
                splits[i].append(ds)
    return tuple(
        _blend(datasets, weights, n) for datasets, n in zip(splits, train_valid_test_num_samples)
    )


def _blend(datasets, weights, num_samples):
    from megatron.data.blendable_dataset import BlendableDataset

    if not datasets:
        return None
    if len(datasets) != len(weights):
        raise ValueError(
            "--data-path: every blended dataset needs documents in every non-empty split"
        )
    return BlendableDataset(datasets, weights, size=num_samples)


def _build_train_valid_test_datasets(
    data_prefix: str,
    data_impl: str,
    splits_string: str,
    train_valid_test_num_samples: Sequence[int],
    max_seq_length: int,
    masked_lm_prob: float,
    short_seq_prob: float,
    seed: int,
    skip_warmup: bool,
    binary_head: bool,
    max_seq_length_dec: int | None,
    dataset_type: str,
    vocab: MaskingVocab | None,
):
    indexed_dataset = get_indexed_dataset_(data_prefix, data_impl, skip_warmup)
    total_num_of_documents = indexed_dataset.doc_idx.shape[0] - 1
    if train_valid_test_num_samples[0]:
        splits = require_train_documents(data_prefix, splits_string, total_num_of_documents)
    else:
        splits = get_train_valid_test_split_(splits_string, total_num_of_documents)
    print_rank_0(f" > dataset split of {data_prefix}: documents {splits}")

    def build_dataset(index: int, name: str):
        # no documents, or no samples asked for (--eval-iters 0): no dataset
        if splits[index + 1] <= splits[index] or not train_valid_test_num_samples[index]:
            return None
        doc_idx = indexed_dataset.doc_idx[splits[index] : splits[index + 1] + 1]
        kwargs = dict(
            name=name,
            indexed_dataset=indexed_dataset,
            data_prefix=data_prefix,
            num_epochs=None,
            max_num_samples=train_valid_test_num_samples[index],
            masked_lm_prob=masked_lm_prob,
            max_seq_length=max_seq_length,
            short_seq_prob=short_seq_prob,
            seed=seed,
            vocab=vocab,
            doc_idx=doc_idx,
        )
        if dataset_type == DSET_TYPE_T5:
            from megatron.data.t5_dataset import T5Dataset

            if max_seq_length_dec is None:
                raise ValueError("--decoder-seq-length is required for T5 datasets")
            return T5Dataset(max_seq_length_dec=max_seq_length_dec, **kwargs)
        from megatron.data.bert_dataset import BertDataset

        return BertDataset(binary_head=binary_head, **kwargs)

    return (build_dataset(0, "train"), build_dataset(1, "valid"), build_dataset(2, "test"))
