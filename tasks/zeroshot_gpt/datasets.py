"""Zero-shot evaluation datasets: WikiText-103 as overlapping windows of one long token
stream, LAMBADA as one left-padded cloze example per line.

Every item is {'text': int64 [seq_len + 1], 'pad_mask': int64 [seq_len]}: the model reads
text[:-1] and is scored on text[1:] where pad_mask is 1.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .detokenizer import get_detokenizer, wikitext_detokenize


def num_lm_windows(num_tokens: int, seq_len: int, overlapping_eval: int) -> int:
    """Windows needed so every target (tokens 1 .. num_tokens - 1) is scored.

    Window i starts at token i * overlapping_eval and reads seq_len tokens; window 0
    scores all its seq_len targets, every later window only its last overlapping_eval
    targets (the rest were scored before and now serve as context). Window i > 0 thus
    scores targets seq_len + (i - 1) * stride + 1 .. seq_len + i * stride, so
    1 + ceil((T - seq_len) / stride) windows cover T = num_tokens - 1 targets.
    """
    targets = max(num_tokens - 1, 0)
    return 1 + max(0, math.ceil((targets - seq_len) / overlapping_eval))


def lm_window(
    tokens: list[int] | np.ndarray, index: int, seq_len: int, overlapping_eval: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window `index` of the stream: (text [seq_len + 1], pad_mask [seq_len]).

    text = tokens[start : start + seq_len + 1] padded with pad_id, start = index * stride;
    pad_mask[j] = 1 where target text[j + 1] is real and, for index > 0, j lies in the
    last `overlapping_eval` positions (see num_lm_windows).
    """
    start = index * overlapping_eval
    window = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
    text = np.full(seq_len + 1, pad_id, dtype=np.int64)
    text[: len(window)] = window
    pad_mask = np.zeros(seq_len, dtype=np.int64)
    pad_mask[: max(len(window) - 1, 0)] = 1
    if index > 0:
        pad_mask[: seq_len - overlapping_eval] = 0
    return text, pad_mask


class LMDataset:
    """Overlapping windows over one tokenised corpus (perplexity evaluation).

    num_original_tokens / num_tokenized_tokens give the word-level to BPE-level token
    ratio used for the adjusted perplexity.
    """

    def __init__(
        self,
        tokens: list[int],
        seq_len: int,
        pad_id: int,
        num_original_tokens: int,
        num_tokenized_tokens: int,
        overlapping_eval: int | None = None,
    ) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.overlapping_eval = overlapping_eval or seq_len
        if not 1 <= self.overlapping_eval <= seq_len:
            raise ValueError(
                f"--overlapping-eval must be between 1 and --seq-length ({seq_len}), "
                f"got {self.overlapping_eval}"
            )
        self.num_original_tokens = num_original_tokens
        self.num_tokenized_tokens = num_tokenized_tokens
        self.total_targets = max(len(self.tokens) - 1, 0)
        self.total_sequences = num_lm_windows(len(self.tokens), seq_len, self.overlapping_eval)

    def __len__(self) -> int:
        return self.total_sequences

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        text, pad_mask = lm_window(
            self.tokens, idx, self.seq_len, self.overlapping_eval, self.pad_id
        )
        return {"text": text, "pad_mask": pad_mask}


def count_original_tokens(text: str) -> int:
    """Word-level tokens of a WikiText file as Megatron counts them: the stripped text
    split on single spaces, so each line break (" \\n ") is one token, like the <eos> of
    word-level language modelling."""
    return len(text.strip().split(" "))


def build_wikitext103_dataset(
    path: str, tokenizer, seq_len: int, overlapping_eval: int
) -> LMDataset:
    """Read a WikiText-style .txt file, count its word-level tokens, detokenize (by the
    path's key, WikiText rules otherwise) and BPE-tokenize it into one stream."""
    try:
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--valid-data {path}: cannot read ({e})") from e
    if not raw.strip():
        raise ValueError(f"--valid-data {path}: the file is empty")
    num_original_tokens = count_original_tokens(raw)
    text = get_detokenizer(path, default=wikitext_detokenize)(raw)
    tokens = tokenizer.tokenize(text)
    if len(tokens) < 2:
        raise ValueError(f"--valid-data {path}: fewer than 2 tokens after tokenisation")
    return LMDataset(
        tokens, seq_len, tokenizer.eod, num_original_tokens, len(tokens), overlapping_eval
    )


def lambada_tokens(text: str, tokenizer, strict: bool) -> tuple[list[int], list[int]]:
    """(context tokens, target tokens) of one LAMBADA passage.

    strict: the target is the last whitespace word, the context the text before it,
    stripped. The target tokens are those that `context + " " + word` has after the
    context's own tokens, i.e. the word as the model reads it in the passage. For GPT-2's
    BPE that is tokenize(" " + word), as Megatron computes it; a SentencePiece model
    would read " word" alone as an extra word-boundary piece followed by '▁word', so
    its target comes from the whole passage. Where the passage's tokens do not start
    with the context's (a merge across the boundary, or an end token the tokenizer
    appends), tokenize(" " + word) is the target.

    Otherwise the whole passage is tokenised and the target is its last token only.
    """
    if not strict:
        tokens = tokenizer.tokenize(text)
        return tokens[:-1], tokens[-1:]
    last_word = text.split()[-1]
    context_text = text[: text.rfind(last_word)].strip()
    context = tokenizer.tokenize(context_text)
    whole = tokenizer.tokenize(context_text + " " + last_word)
    if len(whole) > len(context) and whole[: len(context)] == context:
        return context, whole[len(context) :]
    return context, tokenizer.tokenize(" " + last_word)


class LambadaDataset:
    """LAMBADA cloze examples from JSON lines {"text": ...}: the model must predict every
    target token greedily (pad_mask marks the target positions)."""

    def __init__(self, path: str, pad_id: int, tokenizer, seq_len: int, strict: bool = False):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.tokens: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.num_truncated = 0  # passages cut to their last seq_len + 1 tokens
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--valid-data {path}: cannot read ({e})") from e
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'--valid-data {path}:{number}: expected a JSON object with "text" ({e})'
                ) from e
            if not isinstance(text, str) or not text.split():
                raise ValueError(f"--valid-data {path}:{number}: empty or non-string text")
            context, target = lambada_tokens(text, tokenizer, strict)
            if not context or not target:
                raise ValueError(f"--valid-data {path}:{number}: no context before the target")
            if len(target) > seq_len:
                raise ValueError(
                    f"--valid-data {path}:{number}: target of {len(target)} tokens is longer "
                    f"than --seq-length {seq_len}"
                )
            if len(context) + len(target) > seq_len + 1:
                self.num_truncated += 1
            self.tokens.append(context)
            self.labels.append(target)
        if not self.tokens:
            raise ValueError(f"--valid-data {path}: no examples")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        """text = context + target (right-padded); pad_mask = 1 on the target positions.
        A passage longer than seq_len + 1 tokens keeps its last seq_len + 1 tokens."""
        context, target = self.tokens[idx], self.labels[idx]
        tokens = (context + target)[-(self.seq_len + 1) :]
        num_context = len(tokens) - len(target)
        text = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        text[: len(tokens)] = tokens
        mask = np.zeros(self.seq_len + 1, dtype=np.int64)
        mask[num_context : len(tokens)] = 1
        return {"text": text, "pad_mask": mask[1:]}
