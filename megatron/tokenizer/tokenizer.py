"""Megatron tokenizers: build_tokenizer(args) and the classes behind --tokenizer-type.

Types: GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, SentencePieceTokenizer,
HFTokenizer, NullTokenizer. Every class implements AbstractTokenizer (vocab_size, vocab,
inv_vocab, tokenize, detokenize and the special ids that exist for it).

GPT-2 and BERT have two interchangeable implementations chosen with impl=:
  "python"  the pure-Python references in gpt2_tokenization.py / bert_tokenization.py;
  "fast"    the Rust `tokenizers` library configured to the same algorithm; the tests in
            tests/unit/tokenizer prove it gives the reference ids.
Optional libraries (tokenizers, sentencepiece) are imported only by the type that needs them,
and nothing here imports torch, so tools such as preprocess_data.py start fast.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "NullTokenizer",
)
IMPLS = ("fast", "python")


def build_tokenizer(args):
    """Build the tokenizer named by args.tokenizer_type; set args.padded_vocab_size.

    Reads args.vocab_file, args.merge_file, args.tokenizer_model, args.vocab_extra_ids,
    args.vocab_size (NullTokenizer), args.make_vocab_size_divisible_by,
    args.tensor_model_parallel_size, args.rank and (optional) args.tokenizer_impl.
    """
    rank = getattr(args, "rank", 0)
    tokenizer_type = args.tokenizer_type
    if rank == 0:
        print(f"> building {tokenizer_type} tokenizer ...", flush=True)
    impl = getattr(args, "tokenizer_impl", None) or "fast"
    extra_ids = getattr(args, "vocab_extra_ids", 0) or 0

    if tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        vocab_file = _require(args, "vocab_file", tokenizer_type)
        lower = tokenizer_type == "BertWordPieceLowerCase"
        tokenizer = _BertWordPieceTokenizer(vocab_file, lower, extra_ids, impl=impl)
    elif tokenizer_type == "GPT2BPETokenizer":
        vocab_file = _require(args, "vocab_file", tokenizer_type)
        merge_file = _require(args, "merge_file", tokenizer_type)
        tokenizer = _GPT2BPETokenizer(vocab_file, merge_file, impl=impl)
    elif tokenizer_type == "SentencePieceTokenizer":
        model = _require(args, "tokenizer_model", tokenizer_type)
        tokenizer = _SentencePieceTokenizer(model, vocab_extra_ids=extra_ids)
    elif tokenizer_type == "HFTokenizer":
        tokenizer = _HFTokenizer(_require(args, "tokenizer_model", tokenizer_type))
    elif tokenizer_type == "NullTokenizer":
        tokenizer = _NullTokenizer(_require(args, "vocab_size", tokenizer_type))
    else:
        raise NotImplementedError(
            f"--tokenizer-type {tokenizer_type} is not implemented; choose one of "
            f"{', '.join(TOKENIZER_TYPES)}"
        )

    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size,
        getattr(args, "make_vocab_size_divisible_by", 128),
        getattr(args, "tensor_model_parallel_size", 1),
        log=rank == 0,
    )
    return tokenizer


def _require(args, name: str, tokenizer_type: str):
    value = getattr(args, name, None)
    if value is None:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
    return value


def vocab_size_with_padding(
    orig_vocab_size: int,
    make_vocab_size_divisible_by: int,
    tensor_model_parallel_size: int = 1,
    log: bool = True,
) -> int:
    """Smallest size >= orig_vocab_size that is a multiple of divisible_by * TP.

    The embedding is split into TP equal vocabulary shards, and each shard's size should be
    a multiple of divisible_by for fast matrix multiplies (e.g. GPT-2: 50257 -> 50304).
    """
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by ({make_vocab_size_divisible_by}) and "
            f"--tensor-model-parallel-size ({tensor_model_parallel_size}) must be >= 1"
        )
    after = -(-orig_vocab_size // multiple) * multiple
    if log:
        print(
            f" > padded vocab (size: {orig_vocab_size}) with {after - orig_vocab_size} dummy "
            f"tokens (new size: {after})",
            flush=True,
        )
    return after


def _vocab_size_with_padding(orig_vocab_size: int, args) -> int:
    """Megatron's args-taking spelling of vocab_size_with_padding (used by tools)."""
    return vocab_size_with_padding(
        orig_vocab_size,
        args.make_vocab_size_divisible_by,
        args.tensor_model_parallel_size,
        log=getattr(args, "rank", 0) == 0,
    )


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"tokenizer impl {impl!r} is not one of {IMPLS}")


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


class AbstractTokenizer(ABC):
    """Megatron's tokenizer interface; special ids that a type lacks raise NotImplementedError."""

    def __init__(self, name: str):
        self.name = name
        super().__init__()

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (before padding)."""

    @property
    @abstractmethod
    def vocab(self) -> dict:
        """token text -> id."""

    @property
    @abstractmethod
    def inv_vocab(self) -> dict:
        """id -> token text."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """ids of text."""

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """ids of each text (subclasses with a batched backend override this)."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, token_ids: list[int]) -> str:
        raise NotImplementedError(f"detokenizer is not implemented for {self.name} tokenizer")

    def _missing(self, what: str):
        raise NotImplementedError(f"{what} is not provided for {self.name} tokenizer")

    @property
    def cls(self) -> int:
        return self._missing("CLS")

    @property
    def sep(self) -> int:
        return self._missing("SEP")

    @property
    def pad(self) -> int:
        return self._missing("PAD")

    @property
    def eod(self) -> int:
        return self._missing("EOD")

    @property
    def mask(self) -> int:
        return self._missing("MASK")


class _GPT2BPETokenizer(AbstractTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt; eod is '<|endoftext|>'.

    Text that contains '<|endoftext|>' is tokenised as ordinary characters, as in Megatron.
    """

    def __init__(self, vocab_file: str, merge_file: str, impl: str = "fast"):
        super().__init__("GPT2 BPE")
        _check_impl(impl)
        _check_file(vocab_file, "--vocab-file")
        _check_file(merge_file, "--merge-file")
        from .gpt2_tokenization import GPT2Tokenizer

        self.impl = impl
        self.tokenizer = GPT2Tokenizer(vocab_file, merge_file, errors="replace")
        if "<|endoftext|>" not in self.tokenizer.encoder:
            raise ValueError(f"{vocab_file}: GPT-2 vocabulary has no '<|endoftext|>' token")
        self.eod_id = self.tokenizer.encoder["<|endoftext|>"]
        self._fast = _fast_gpt2(self.tokenizer) if impl == "fast" else None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.encoder)

    @property
    def vocab(self) -> dict:
        return self.tokenizer.encoder

    @property
    def inv_vocab(self) -> dict:
        return self.tokenizer.decoder

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [self.tokenizer.encode(t) for t in texts]

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    @property
    def eod(self) -> int:
        return self.eod_id


def _fast_gpt2(reference):
    """A `tokenizers` pipeline equal to the reference: ByteLevel split (same regex, no
    prefix space) + BPE over the same vocab and merge ranks, no normaliser."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    fast = Tokenizer(models.BPE(vocab=dict(reference.encoder), merges=merges))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return fast


class _BertWordPieceTokenizer(AbstractTokenizer):
    """BERT WordPiece (uncased: lower-case + accent strip; cased: neither).

    As in Megatron, '[BOS]', '[EOS]' and vocab_extra_ids sentinels '<extra_id_N>' are
    appended to the vocabulary when absent, so vocab_size grows accordingly.
    """

    def __init__(
        self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0, impl="fast"
    ):
        super().__init__("BERT Lower Case" if lower_case else "BERT Upper Case")
        _check_impl(impl)
        _check_file(vocab_file, "--vocab-file")
        from .bert_tokenization import FullTokenizer

        self.impl = impl
        self.tokenizer = FullTokenizer(vocab_file, do_lower_case=lower_case)
        for token in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"):
            if token not in self.tokenizer.vocab:
                raise ValueError(f"{vocab_file}: WordPiece vocabulary has no {token} token")
        self._fast = _fast_bert(self.tokenizer, lower_case) if impl == "fast" else None
        self.cls_id = self.tokenizer.vocab["[CLS]"]
        self.sep_id = self.tokenizer.vocab["[SEP]"]
        self.pad_id = self.tokenizer.vocab["[PAD]"]
        self.mask_id = self.tokenizer.vocab["[MASK]"]
        self._bos_token = "[BOS]"
        self._eos_token = "[EOS]"
        self.add_token(self._bos_token)
        self.add_token(self._eos_token)
        self._bos_token_id = self.vocab[self._bos_token]
        self._eos_token_id = self.vocab[self._eos_token]
        self.add_additional_special_tokens([f"<extra_id_{i}>" for i in range(vocab_extra_ids)])

    def add_token(self, token: str) -> None:
        """Append token with the next free id unless it is already in the vocabulary."""
        if token not in self.vocab:
            new_id = self.vocab_size
            self.inv_vocab[new_id] = token
            self.vocab[token] = new_id

    def add_additional_special_tokens(self, tokens: list[str]) -> None:
        self.additional_special_tokens = list(tokens)
        for token in tokens:
            self.add_token(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size()

    @property
    def vocab(self) -> dict:
        return self.tokenizer.vocab

    @property
    def inv_vocab(self) -> dict:
        return self.tokenizer.inv_vocab

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [self.tokenize(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Pieces joined with '##' continuations glued and English spacing cleaned up."""
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return self.tokenizer.convert_tokens_to_string(tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.decode(token_ids)

    def decode_token_ids(self, token_ids: list[int]) -> str:
        """Pieces without [PAD]/[CLS], each word preceded by one space."""
        tokens = self.tokenizer.convert_ids_to_tokens(token_ids)
        out = []
        for t in tokens:
            if t in ("[PAD]", "[CLS]"):
                continue
            out.append(t[2:] if t.startswith("##") else " " + t)
        return "".join(out)

    @property
    def cls(self) -> int:
        return self.cls_id

    @property
    def sep(self) -> int:
        return self.sep_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def mask(self) -> int:
        return self.mask_id

    @property
    def bos_token(self) -> str:
        return self._bos_token

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def bos_token_id(self) -> int:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self.vocab[t] for t in self.additional_special_tokens]


def _fast_bert(reference, lower_case: bool):
    """A `tokenizers` pipeline equal to the reference: BertNormalizer (clean text, CJK
    spacing, accent strip + lower-case when uncased) + BertPreTokenizer (whitespace and
    punctuation) + WordPiece with the same vocabulary, '##' prefix and length limit."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    wordpiece = reference.wordpiece_tokenizer
    fast = Tokenizer(
        models.WordPiece(
            vocab=dict(reference.vocab),
            unk_token=wordpiece.unk_token,
            max_input_chars_per_word=wordpiece.max_input_chars_per_word,
        )
    )
    fast.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
    )
    fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return fast
