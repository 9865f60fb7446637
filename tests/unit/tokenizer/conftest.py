"""Shared test texts for the tokenizer tests: a hand-written set of hard cases and seeded
random strings over a mixed alphabet."""

import random

import pytest

HAND_TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times; it was the age of wisdom...",
    "I'll've, you'd've, she's, they're, we've, I'm, it'd, don't, won't, y'all, 'tis",
    "'s 't 're 've 'm 'll 'd 'S 'LL \"quoted\" ''double'' '''",
    "  multiple   spaces\n\n\nnewlines\t tabs",
    "trailing spaces   ",
    "   leading spaces",
    "\n",
    "\n\n\n",
    "\t\t x \r\n y \r",
    "line one\nline two\n\n  indented line\n    more indented\n",
    "café naïve résumé façade jalapeño Ångström Øresund Straße",
    "ÀÉÎÕÜ àéîõü ĀĒĪŌŪ ǅ ǈ ﬁ ﬂ Ⅻ ⅻ ① ² ½",
    "Ελληνικά ΟΔΟΣ οδός Σίσυφος",
    "Русский текст, ёжик в тумане.",
    "中文测试：你好，世界！这是一个句子。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트 입니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "שלום עולם",
    "हिन्दी पाठ, देवनागरी लिपि।",
    "ภาษาไทย ไม่มีช่องว่าง",
    "emoji 😀😃😄 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈",
    "numbers 0 1 42 3.14159 -7 1,000,000 1e-9 2024-01-01 12:30:45 ٣٤٥ ४२",
    "punctuation!!! ??? ... --- *** ### $$$ %%% &&& @@@ ^^^ ~~~ ``` ||| \\\\ //",
    "(parens) [brackets] {braces} <angles> «guillemets» „quotes“ ‘single’ “double”",
    "email@example.com https://example.org/path?query=1&b=2#frag",
    "def f(x):\n    return x ** 2  # comment\n",
    "a" * 150,
    "b" * 250,
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "control\x00chars\x01\x02\x07\x1b[31m\x7f\x85 bell",
    "zero\u200bwidth\u200cjoiner\u200dnon\ufeffbom",
    "non\u00a0breaking\u2009thin\u3000ideographic\u2028line\u2029para",
    "replacement \ufffd char and private \ue000 use",
    "combining e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "<|endoftext|> is plain text here",
    "[CLS] [SEP] [MASK] [PAD] [UNK] are plain text too",
    "MiXeD CaSe WoRdS and ALLCAPS and lowercase",
    "tab\tseparated\tvalues\tand\vvertical\fform feed",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 math 𝑥² ∑∫√∞ ≠ ≤ ≥",
    "A sentence.Another sentence!Yet another?",
]

_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" " * 10 + "\n\n\t\r")
    + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + list("éèêëàâäôöûüçñÉÀÖÜßøåæœ")
    + list("αβγδεζηθΣσςΩ")
    + list("абвгдеёжзиЙЦУК")
    + list("中文字汉语日本語한국어")
    + list("ひらがなカタカナ")
    + list("مرحباעבריתहिन्दीไทย")
    + list("😀👍🏽❤️🇫🇷👩‍💻🏳")
    + ["\u200d", "\u200b", "\ufe0f", "\u0301", "\u0308", "\u00a0", "\u2009", "\u3000"]
    + ["\u2028", "\x00", "\x01", "\x1b", "\x7f", "\x85", "\ufffd", "\ufeff", "\ue000"]
    + list("½²①Ⅻﬁ𝔘𝐛∑√≠٣४")
)
_CHUNKS = ["'s", "'ll", "'ve", "'re", "'d", "'m", "'t", "n't", "  ", "\n\n", "...", "the", "ing"]


def random_texts(n: int, seed: int) -> list:
    """n seeded random strings of 0-40 units drawn from the mixed alphabet and chunks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(0, 40)
        units = [
            rng.choice(_CHUNKS) if rng.random() < 0.1 else rng.choice(_ALPHABET)
            for _ in range(length)
        ]
        out.append("".join(units))
    return out


@pytest.fixture(scope="session")
def hand_texts():
    return list(HAND_TEXTS)


@pytest.fixture(scope="session")
def mixed_texts():
    """3000 random strings (seed 1234)."""
    return random_texts(3000, seed=1234)
