"""Pure-Python reference for BERT WordPiece tokenisation.

Two stages:

BasicTokenizer (text -> words)
  1. clean: drop U+0000, U+FFFD and control characters (categories Cc/Cf other than
     tab/newline/CR); turn whitespace (space, tab, newline, CR, category Zs) into ' '.
  2. surround every CJK ideograph with spaces (each becomes its own word).
  3. split on whitespace; for the uncased vocabulary lower-case each word and strip accents
     (NFD, then drop nonspacing marks, category Mn).
  4. split every punctuation character (ASCII symbols ! to /, : to @, [ to `, { to ~, and
     unicode category P*) into its own word.

WordpieceTokenizer (word -> pieces)
  greedy longest match from the left: the longest vocabulary prefix, then repeatedly the
  longest '##'-prefixed continuation; a word with no complete match, or longer than
  max_input_chars_per_word characters, becomes the single unknown token.

This module is the reference that the fast path (tokenizers' BertNormalizer +
BertPreTokenizer + WordPiece) is tested against; it is selectable with impl="python".
"""

from __future__ import annotations

import unicodedata

# Megatron's (and the original BERT release's) limit; longer words become [UNK].
MAX_INPUT_CHARS_PER_WORD = 200


def convert_to_unicode(text) -> str:
    """text as str (bytes are decoded as UTF-8, undecodable bytes ignored)."""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):
        return text.decode("utf-8", "ignore")
    raise ValueError(f"unsupported text type: {type(text)}")


def load_vocab(vocab_file: str) -> dict[str, int]:
    """token -> id from a one-token-per-line vocab.txt (id = line number, from 0)."""
    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.strip()] = index
    if not vocab:
        raise ValueError(f"{vocab_file}: empty WordPiece vocabulary")
    return vocab


def whitespace_tokenize(text: str) -> list[str]:
    """Split on runs of whitespace, dropping leading/trailing whitespace."""
    text = text.strip()
    return text.split() if text else []


def _is_whitespace(char: str) -> bool:
    if char in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    if char in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # All non-letter/number ASCII symbols count as punctuation (e.g. '$', '^', '`').
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


# CJK Unified Ideographs blocks (Han); Hangul and kana are not included, as in BERT.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_chinese_char(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class BasicTokenizer:
    """Cleaning, CJK splitting, (lower-casing + accent stripping), punctuation splitting."""

    def __init__(self, do_lower_case: bool = True):
        self.do_lower_case = do_lower_case

    def tokenize(self, text) -> list[str]:
        text = self._clean_text(convert_to_unicode(text))
        text = self._tokenize_chinese_chars(text)
        words = []
        for token in whitespace_tokenize(text):
            if self.do_lower_case:
                token = self._run_strip_accents(token.lower())
            words.extend(self._run_split_on_punc(token))
        return whitespace_tokenize(" ".join(words))

    @staticmethod
    def _run_strip_accents(text: str) -> str:
        text = unicodedata.normalize("NFD", text)
        return "".join(c for c in text if unicodedata.category(c) != "Mn")

    @staticmethod
    def _run_split_on_punc(text: str) -> list[str]:
        words: list[str] = []
        current: list[str] = []
        for char in text:
            if _is_punctuation(char):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(char)
            else:
                current.append(char)
        if current:
            words.append("".join(current))
        return words

    @staticmethod
    def _tokenize_chinese_chars(text: str) -> str:
        out = []
        for char in text:
            if _is_chinese_char(ord(char)):
                out.extend((" ", char, " "))
            else:
                out.append(char)
        return "".join(out)

    @staticmethod
    def _clean_text(text: str) -> str:
        out = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or _is_control(char):
                continue
            out.append(" " if _is_whitespace(char) else char)
        return "".join(out)


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece over a fixed vocabulary."""

    def __init__(
        self,
        vocab: dict[str, int],
        unk_token: str = "[UNK]",
        max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD,
    ):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text) -> list[str]:
        output = []
        for word in whitespace_tokenize(convert_to_unicode(text)):
            output.extend(self._word_pieces(word))
        return output

    def _word_pieces(self, word: str) -> list[str]:
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces


class FullTokenizer:
    """BasicTokenizer followed by WordpieceTokenizer, with id conversion."""

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = True,
        max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD,
    ):
        self.vocab = load_vocab(vocab_file)
        self.inv_vocab = {v: k for k, v in self.vocab.items()}
        self.basic_tokenizer = BasicTokenizer(do_lower_case=do_lower_case)
        self.wordpiece_tokenizer = WordpieceTokenizer(
            vocab=self.vocab, max_input_chars_per_word=max_input_chars_per_word
        )

    def tokenize(self, text) -> list[str]:
        pieces = []
        for word in self.basic_tokenizer.tokenize(text):
            pieces.extend(self.wordpiece_tokenizer.tokenize(word))
        return pieces

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab[t] for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.inv_vocab[i] for i in ids]

    @staticmethod
    def convert_tokens_to_string(tokens: list[str], clean_up_tokenization_spaces: bool = True):
        """Join pieces: '##' continuations attach to the previous piece; optionally undo
        the spaces tokenisation put before punctuation and in contractions."""
        text = " ".join(tokens).replace(" ##", "").strip()
        if clean_up_tokenization_spaces:
            for before, after in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(before, after)
        return text

    def vocab_size(self) -> int:
        return len(self.vocab)
