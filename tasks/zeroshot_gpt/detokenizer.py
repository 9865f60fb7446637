"""Detokenizers that undo the word-level tokenisation of evaluation corpora, so the GPT-2
BPE tokenizer sees natural text (Megatron's rules, so perplexities compare).

WikiText-103 writes "1 @,@ 000", "word , word" and "( x )"; PTB writes "do n't" and
"N" for numbers; LAMBADA uses curly quotes. `get_detokenizer(path)` picks one by a key
in the file's path ('ptb', 'wiki', 'lambada'), as Megatron does.
"""

from __future__ import annotations

import re
from typing import Callable

# Plain substring replacements of WikiText, applied in this order.
_WIKITEXT_NUMBER_SEPARATORS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_WIKITEXT_PUNCTUATION = (
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
)
# Spaces just inside paired brackets and quotes: "( a b )" -> "(a b)".
_WIKITEXT_BRACKETS = (
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
)
_WIKITEXT_MISC = (
    ("= = = =", "===="),  # section heading markers
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),  # degree sign
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)
# Megatron's contraction rule for "' 90s" is written with slash delimiters inside the
# pattern, so it only ever rewrites the literal text "/' 9/"; kept as is so the
# tokenised text (and the adjusted perplexity) is the same as Megatron's.
_WIKITEXT_DECADE = (re.compile(r"/' [0-9]/"), r"/'[0-9]/")


def _replace_all(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def wikitext_detokenize(text: str) -> str:
    """WikiText-103 -> natural text: plural possessives ("s '" -> "s'"), number
    separators (" @,@ " -> ","), spaces before punctuation, spaces inside brackets and
    quotes, heading markers ("= =" -> "=="), the degree sign, spaces around line breaks,
    "N" numbers and " 's"."""
    text = text.replace("s '", "s'")
    text = _WIKITEXT_DECADE[0].sub(_WIKITEXT_DECADE[1], text)
    text = _replace_all(text, _WIKITEXT_NUMBER_SEPARATORS)
    text = _replace_all(text, _WIKITEXT_PUNCTUATION)
    for pattern, repl in _WIKITEXT_BRACKETS:
        text = pattern.sub(repl, text)
    return _replace_all(text, _WIKITEXT_MISC)


def ptb_detokenize(text: str) -> str:
    """Penn Treebank -> natural text: " 's" and " n't" joined, "N" numbers made "1",
    "$ 1" / "# 1" joined, spaces around line breaks dropped."""
    return _replace_all(
        text,
        (
            (" '", "'"),
            (" \n", "\n"),
            ("\n ", "\n"),
            (" n't", "n't"),
            (" N ", "1 "),
            ("$ 1", "$1"),
            ("# 1", "#1"),
        ),
    )


def lambada_detokenize(text: str) -> str:
    """LAMBADA -> natural text: curly double quotes made straight, spaces after line
    breaks dropped, outer whitespace stripped."""
    text = _replace_all(text, (("\u201c", '"'), ("\u201d", '"'), ("\n ", "\n")))
    return text.strip()


def identity_detokenize(text: str) -> str:
    """Text that needs no detokenisation."""
    return text


_DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "ptb": ptb_detokenize,
    "wiki": wikitext_detokenize,
    "lambada": lambada_detokenize,
}


def get_detokenizer(path: str, default: Callable[[str], str] | None = None) -> Callable[[str], str]:
    """The detokenizer whose key ('ptb', 'wiki', 'lambada') occurs in `path` (first match
    in that order), else `default`, else the identity."""
    for key, detokenize in _DETOKENIZERS.items():
        if key in path:
            return detokenize
    return default or identity_detokenize
