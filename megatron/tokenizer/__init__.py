"""Tokenizers selected by --tokenizer-type; importing this package does not import torch or
any tokenizer backend (each type imports what it needs when built)."""

from .tokenizer import (  # noqa: F401
    TOKENIZER_TYPES,
    AbstractTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)
