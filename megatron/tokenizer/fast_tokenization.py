"""Rust `tokenizers` pipelines equal to the pure-Python references.

GPT-2: ByteLevel pre-tokeniser (the same split regex, no prefix space) + BPE over the same
vocabulary and merge ranks, no normaliser. Exhaustive checks over every code point of
planes 0-3 and 14, plus the mixed-text tests, give ids identical to gpt2_tokenization.py, so
it is used for every text.

BERT: BertNormalizer + BertPreTokenizer + WordPiece. It follows the same algorithm but with
the Unicode tables of the Rust crates, which differ from Python's unicodedata for a few
hundred characters (private-use and unassigned characters are dropped; marks, punctuation
and CJK characters added in recent Unicode versions are classified differently) and it
lower-cases 'Σ' without Python's final-sigma rule. BertFastPath therefore sends a text to
the Rust pipeline only when every character in it has been checked to behave identically
(CharGate); other texts go to the reference.
"""

from __future__ import annotations

from collections.abc import Callable


def fast_gpt2(encoder: dict[str, int], bpe_ranks: dict[tuple[str, str], int]):
    """A `tokenizers.Tokenizer` for GPT-2 byte-level BPE from the reference tables."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    merges = sorted(bpe_ranks, key=bpe_ranks.get)
    fast = Tokenizer(models.BPE(vocab=dict(encoder), merges=merges))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return fast


def fast_bert(vocab: dict[str, int], unk_token: str, max_input_chars_per_word: int, lower: bool):
    """A `tokenizers.Tokenizer` for BERT WordPiece (clean text, CJK spacing, accent strip +
    lower-case when uncased, whitespace/punctuation split, greedy longest match)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    fast = Tokenizer(
        models.WordPiece(
            vocab=dict(vocab),
            unk_token=unk_token,
            max_input_chars_per_word=max_input_chars_per_word,
        )
    )
    fast.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower
    )
    fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return fast


class CharGate:
    """Decides, per character, whether the fast pipeline agrees with the reference.

    A character c is checked once, on first sight, by tokenising a probe that puts it
    inside a word, between words, doubled and next to upper- and lower-case letters with
    both implementations; it is safe when the ids are equal. Characters whose reference
    behaviour depends on context beyond the probe (`never_safe`) are always unsafe.
    A text is safe when all its characters are.
    """

    def __init__(
        self,
        fast_ids: Callable[[str], list[int]],
        reference_ids: Callable[[str], list[int]],
        never_safe: frozenset[str] = frozenset(),
    ):
        self._fast_ids = fast_ids
        self._reference_ids = reference_ids
        self.safe: set[str] = set()
        self.unsafe: set[str] = set(never_safe)

    @staticmethod
    def probe(c: str) -> str:
        return f"Ab{c}cD {c}{c} {c}x.{c} Q"

    def _check(self, chars: set[str]) -> None:
        for c in chars - self.safe - self.unsafe:
            text = self.probe(c)
            if self._fast_ids(text) == self._reference_ids(text):
                self.safe.add(c)
            else:
                self.unsafe.add(c)

    def is_safe(self, text: str) -> bool:
        chars = set(text)
        if chars <= self.safe:
            return True
        self._check(chars)
        return chars <= self.safe


class BertFastPath:
    """Rust WordPiece for texts the CharGate accepts, the reference for the rest."""

    def __init__(self, reference, lower: bool):
        wordpiece = reference.wordpiece_tokenizer
        self.reference = reference
        self.tokenizer = fast_bert(
            reference.vocab, wordpiece.unk_token, wordpiece.max_input_chars_per_word, lower
        )
        # Python's str.lower() maps 'Σ' to 'ς' at the end of a word, Rust to 'σ' always.
        never_safe = frozenset("\u03a3") if lower else frozenset()
        self.gate = CharGate(self._rust_ids, self.reference_ids, never_safe)

    def _rust_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def reference_ids(self, text: str) -> list[int]:
        return self.reference.convert_tokens_to_ids(self.reference.tokenize(text))

    def encode(self, text: str) -> list[int]:
        if self.gate.is_safe(text):
            return self._rust_ids(text)
        return self.reference_ids(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        safe = [i for i, t in enumerate(texts) if self.gate.is_safe(t)]
        out: list = [None] * len(texts)
        encodings = self.tokenizer.encode_batch([texts[i] for i in safe], add_special_tokens=False)
        for i, encoding in zip(safe, encodings):
            out[i] = encoding.ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.reference_ids(t)
        return out
