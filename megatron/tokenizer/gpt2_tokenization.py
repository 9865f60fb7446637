"""Pure-Python reference for GPT-2 byte-level BPE.

The algorithm, in three steps:

1. Pre-tokenise: split the text with GPT2_SPLIT_PATTERN (contractions, optional-space +
   letters, optional-space + digits, optional-space + other symbols, whitespace runs; a
   whitespace run that precedes a word leaves its last space to that word).
2. Map each piece's UTF-8 bytes to printable unicode characters (bytes_to_unicode), so that
   every byte sequence is a string over a 256-character alphabet without whitespace or
   control characters.
3. Apply BPE to each piece: start from single characters and repeatedly merge the adjacent
   pair with the lowest rank in the merge table (rank = line number in merges.txt) until no
   pair of the word is in the table; the resulting symbols are looked up in vocab.json.

Decoding reverses 2 and 1: concatenate the symbols, map characters back to bytes and decode
UTF-8 (invalid sequences become U+FFFD with errors="replace").

This module is the reference that the fast path (tokenizers' ByteLevel BPE) is tested
against; it is also selectable at run time with impl="python".
"""

from __future__ import annotations

import json
from functools import lru_cache

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

# Entries kept in the per-piece BPE cache before it is cleared (bounds memory on huge corpora).
_CACHE_LIMIT = 500_000


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the remaining 68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) map, in
    increasing byte order, to chr(256), chr(257), ... . The table is a bijection.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs of a word given as a tuple of symbols."""
    return set(zip(word[:-1], word[1:]))


def read_merges(merges_file: str) -> list[tuple[str, str]]:
    """Merge rules from a GPT-2 merges.txt: one 'a b' pair per line, '#version' header."""
    with open(merges_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = list(map(tuple, map(str.split, filter(None, lines[start:]))))
    if set(map(len, merges)) - {2}:
        lineno, bad = next(
            (i + 1, line)
            for i, line in enumerate(lines)
            if i >= start and line and len(line.split()) != 2
        )
        raise ValueError(f"{merges_file}:{lineno}: expected a merge 'a b', got {bad!r}")
    return merges


def read_vocab(vocab_file: str) -> dict[str, int]:
    """The token -> id table of a GPT-2 vocab.json."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_file}: not a JSON vocabulary ({e})") from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{vocab_file}: expected a JSON object mapping tokens to ids")
    return encoder


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (reference implementation, see the module docstring).

    special_tokens are extra tokens with ids len(vocab), len(vocab)+1, ...; they are used by
    convert_tokens_to_ids / decode but never produced by encode (as in Megatron).
    """

    def __init__(
        self,
        vocab_file: str,
        merges_file: str,
        errors: str = "replace",
        special_tokens: list[str] | None = None,
        max_len: int | None = None,
    ):
        self.max_len = max_len if max_len is not None else int(1e12)
        self.encoder = read_vocab(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.errors = errors
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        merges = read_merges(merges_file)
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache: dict[str, str] = {}
        import regex  # here, not at module level: the fast paths only read the tables

        self.pat = regex.compile(GPT2_SPLIT_PATTERN)
        self.special_tokens: dict[str, int] = {}
        self.special_tokens_decoder: dict[int, str] = {}
        self.set_special_tokens(special_tokens)

    def __len__(self) -> int:
        return len(self.encoder) + len(self.special_tokens)

    def set_special_tokens(self, special_tokens: list[str] | None) -> None:
        """Give special_tokens the ids len(vocab), len(vocab)+1, ... (replacing old ones)."""
        special_tokens = special_tokens or []
        self.special_tokens = {t: len(self.encoder) + i for i, t in enumerate(special_tokens)}
        self.special_tokens_decoder = {v: k for k, v in self.special_tokens.items()}

    def bpe(self, token: str) -> str:
        """BPE symbols of one byte-encoded piece, joined by single spaces."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token)
        while len(word) > 1:
            ranked = [(self.bpe_ranks.get(p), p) for p in get_pairs(word)]
            ranked = [(r, p) for r, p in ranked if r is not None]
            if not ranked:
                break
            first, second = min(ranked)[1]
            # Merge every non-overlapping occurrence of (first, second), left to right.
            merged = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        self.cache[token] = result
        return result

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces of text under GPT2_SPLIT_PATTERN (step 1)."""
        return self.pat.findall(text)

    def tokenize(self, text: str) -> list[str]:
        """BPE symbols (byte-encoded strings) of text."""
        symbols = []
        for piece in self.pat.findall(text):
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            symbols.extend(self.bpe(encoded).split(" "))
        return symbols

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        ids = []
        for token in tokens:
            if token in self.special_tokens:
                ids.append(self.special_tokens[token])
            else:
                ids.append(self.encoder[token])
        return ids

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list:
        tokens = []
        for i in ids:
            if i in self.special_tokens_decoder:
                if not skip_special_tokens:
                    tokens.append(self.special_tokens_decoder[i])
            else:
                tokens.append(self.decoder[i])
        return tokens

    def encode(self, text: str) -> list[int]:
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, ids: list[int]) -> str:
        """Text of ids: symbols concatenated, mapped back to bytes, UTF-8 decoded.

        Special tokens are emitted as their own UTF-8 text.
        """
        data = bytearray()
        for i in ids:
            special = self.special_tokens_decoder.get(i)
            if special is not None:
                data += special.encode("utf-8")
            else:
                data += bytes(self.byte_decoder[c] for c in self.decoder[i])
        return data.decode("utf-8", errors=self.errors)
