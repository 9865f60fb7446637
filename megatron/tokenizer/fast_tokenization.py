"""Fast GPT-2 and BERT pipelines equal to the pure-Python references.

GPT-2, first choice: `tiktoken` (tiktoken_gpt2). tiktoken's BPE repeatedly merges the adjacent
pair whose concatenation has the lowest rank; the reference merges the pair with the lowest
merge-rule rank. The two agree when the ranks are the merge order: the 256 single bytes,
then merge i's result with a rank that grows with i, and no other mergeable token. So the
tiktoken encoding is built only from vocabularies that are in merge order (GPT-2's is:
byte tokens 0-255, merge i -> id 256 + i; '<|endoftext|>' becomes a special token), and
tiktoken's ranks are then the vocab ids. It splits with GPT2_TIKTOKEN_PATTERN, the
reference's GPT2_SPLIT_PATTERN regrouped for speed. Texts go through encode_ordinary, so
'<|endoftext|>' inside a document is ordinary text, as in the reference. The tests compare
ids with the reference on hand-written, random and code-point texts.

GPT-2, fallback (no tiktoken, or a vocabulary not in merge order): the Rust `tokenizers`
library, ByteLevel pre-tokeniser (the same split regex, no prefix space) + BPE over the same
vocabulary and merge ranks, no normaliser. It implements the reference's pair-rank rule
directly, and the same tests prove identical ids.

BERT: BertNormalizer + BertPreTokenizer + WordPiece. It follows the same algorithm but with
the Unicode tables of the Rust crates, which differ from Python's unicodedata for a few
hundred characters (private-use and unassigned characters are dropped; marks, punctuation
and CJK characters added in recent Unicode versions are classified differently) and it
lower-cases 'Σ' without Python's final-sigma rule. BertFastPath therefore sends a text to
the Rust pipeline only when every character in it has been checked to behave identically
(CharGate); other texts go to the reference.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable


def fast_gpt2(encoder: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers.Tokenizer` for GPT-2 byte-level BPE from the reference tables."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    fast = Tokenizer(models.BPE(vocab=dict(encoder), merges=merges))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return fast


def gpt2_merge_order_ranks(
    encoder: dict[str, int], merges: list[tuple[str, str]]
) -> tuple[dict[bytes, int], dict[str, int]] | None:
    """tiktoken's (mergeable ranks, special tokens) for a GPT-2 vocabulary, or None.

    Mergeable: the 256 single bytes and the result of every merge, as raw bytes (vocab tokens
    are GPT-2 byte-encoded strings, see bytes_to_unicode), each ranked by its vocab id. Every
    other vocab entry (e.g. '<|endoftext|>') is a special token with its id. None when the
    vocabulary is not in merge order: a byte or merge result missing from it, or merge
    results whose ids do not strictly increase along the merge list.
    """
    from .gpt2_tokenization import bytes_to_unicode

    table = bytes_to_unicode()
    byte_tokens = [table[b] for b in range(256)]  # token of byte b at index b
    results = [first + second for first, second in merges]
    parts = set(itertools.chain.from_iterable(merges))
    if not (encoder.keys() >= parts and encoder.keys() >= set(byte_tokens)):
        return None
    result_ids = list(map(encoder.get, results))
    if None in result_ids:
        return None
    byte_ids = [encoder[c] for c in byte_tokens]
    # Merge priority must be rank order: ids increase along the merge list, past every byte.
    if result_ids and (
        result_ids[0] <= max(byte_ids) or not all(map(operator.lt, result_ids, result_ids[1:]))
    ):
        return None
    # Every token character stands for one byte, so translating the characters to the
    # latin-1 characters of their bytes and encoding as latin-1 gives the raw bytes; done once
    # over all tokens joined, then cut at the token lengths.
    to_latin1 = {ord(c): b for b, c in enumerate(byte_tokens)}
    raw = "".join(results).translate(to_latin1).encode("latin-1")
    ends = list(itertools.accumulate(map(len, results)))
    ranks = {bytes([b]): i for b, i in enumerate(byte_ids)}
    ranks.update(zip(map(raw.__getitem__, map(slice, [0, *ends], ends)), result_ids))
    mergeable_ids = set(ranks.values())
    specials = {t: i for t, i in encoder.items() if i not in mergeable_ids}
    if len(mergeable_ids) + len(specials) != len(encoder):  # two tokens share an id
        return None
    return ranks, specials


# GPT2_SPLIT_PATTERN with its lookahead-free alternatives in one group: the same split, as
# leftmost-first alternation is associative ((A|B)|C matches what A|B|C matches). tiktoken's
# regex engine then runs words, numbers, punctuation and single spaces as one automaton and
# leaves only whitespace runs to its slower backtracking engine (the lookahead needs it):
# about 1.6x faster on English text.
GPT2_TIKTOKEN_PATTERN = (
    r"""(?:'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+)|\s+(?!\S)|\s+"""
)


def tiktoken_gpt2(encoder: dict[str, int], merges: list[tuple[str, str]]):
    """A `tiktoken.Encoding` equal to the reference GPT-2 BPE on these tables, or None when
    tiktoken is not installed or the vocabulary is not in merge order (see the module doc).
    Built offline: nothing is downloaded or cached."""
    try:
        import tiktoken
    except ImportError:
        return None
    tables = gpt2_merge_order_ranks(encoder, merges)
    if tables is None:
        return None
    ranks, specials = tables
    return tiktoken.Encoding(
        name="gpt2_from_vocab_files",
        pat_str=GPT2_TIKTOKEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


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
