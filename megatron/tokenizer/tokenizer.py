"""Megatron tokenizers: build_tokenizer(args) and the classes behind --tokenizer-type.

Types: GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, SentencePieceTokenizer,
GPTSentencePieceTokenizer, HFTokenizer, NullTokenizer. Every class implements AbstractTokenizer (vocab_size, vocab,
inv_vocab, tokenize, detokenize and the special ids that exist for it).

GPT-2 and BERT have interchangeable implementations chosen with impl=:
  "python"  the pure-Python references in gpt2_tokenization.py / bert_tokenization.py;
  "fast"    GPT-2: `tiktoken` built offline from the same vocab/merges files, or the Rust
            `tokenizers` BPE when tiktoken is missing; BERT: Rust `tokenizers` for texts whose
            characters are checked to agree (see fast_tokenization.py). The tests in
            tests/unit/tokenizer prove they give the reference ids.
Optional libraries (tiktoken, tokenizers, sentencepiece) are imported only by the type that
needs them, and nothing here imports torch, so tools such as preprocess_data.py start fast.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from ..errors import register_one_line_error

TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HFTokenizer",
    "NullTokenizer",
)
IMPLS = ("fast", "python")
GPT2_IMPLS = ("fast", "tiktoken", "tokenizers", "python")


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
        if tokenizer.fallback_reason and rank == 0:
            print(f" > GPT-2 BPE: {tokenizer.fallback_reason}", flush=True)
    elif tokenizer_type == "SentencePieceTokenizer":
        model = _require(args, "tokenizer_model", tokenizer_type)
        tokenizer = _SentencePieceTokenizer(model, vocab_extra_ids=extra_ids)
    elif tokenizer_type == "GPTSentencePieceTokenizer":
        tokenizer = _GPTSentencePieceTokenizer(_require(args, "tokenizer_model", tokenizer_type))
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


@register_one_line_error
class TokenizerError(ValueError):
    """A tokenizer flag or file that cannot be used; the message is one line naming them."""


class TokenizerFileError(TokenizerError, FileNotFoundError):
    """A tokenizer file (--vocab-file, --merge-file, --tokenizer-model) that is missing,
    unreadable or not of the kind its flag needs."""


def _require(args, name: str, tokenizer_type: str):
    value = getattr(args, name, None)
    if value is None:
        flag = "--" + name.replace("_", "-")
        raise TokenizerError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
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


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"tokenizer impl {impl!r} is not one of {allowed}")


def _check_file(path: str, what: str) -> None:
    """Raise TokenizerFileError naming `what` (the flag) and `path` unless it is a readable
    regular file."""
    if os.path.isdir(path):
        raise TokenizerFileError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise TokenizerFileError(f"{what} {path} is not readable (permission denied)")


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

    def tokenize_batch_bytes(self, texts: list[str], dtype) -> list[bytes]:
        """ids of each text as the raw bytes of a `dtype` array (numpy dtype that holds every
        id): what an indexed dataset stores. Same ids as tokenize_batch."""
        import numpy as np

        return [np.asarray(ids, dtype=dtype).tobytes() for ids in self.tokenize_batch(texts)]

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


def _refuse_surrogates(text: str) -> None:
    """Raise UnicodeEncodeError, as the GPT-2 reference does (it UTF-8 encodes each piece),
    when text holds a lone surrogate; tiktoken would silently replace it with U+FFFD."""
    if not text.isascii():
        text.encode("utf-8")


class _GPT2BPETokenizer(AbstractTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt; eod is '<|endoftext|>'.

    Text that contains '<|endoftext|>' is tokenised as ordinary characters, as in Megatron.
    impl: "fast" = tiktoken when installed and the vocabulary is in merge order, else the
    Rust `tokenizers` BPE; "tiktoken" / "tokenizers" force one of them; "python" is the
    reference. `backend` names the one in use. Only that one is built (the reference is
    built on first use of `.tokenizer`).
    """

    def __init__(self, vocab_file: str, merge_file: str, impl: str = "fast"):
        super().__init__("GPT2 BPE")
        _check_impl(impl, GPT2_IMPLS)
        _check_file(vocab_file, "--vocab-file")
        _check_file(merge_file, "--merge-file")
        from . import gpt2_tokenization as ref

        self.impl = impl
        self._files = (vocab_file, merge_file)
        self._reference = None
        self._inv_vocab = None
        self._tiktoken = self._rust = None
        self.fallback_reason: str | None = None
        if impl == "python":
            self._reference = ref.GPT2Tokenizer(vocab_file, merge_file, errors="replace")
            self.encoder = self._reference.encoder
        else:
            self.encoder = ref.read_vocab(vocab_file)
        if "<|endoftext|>" not in self.encoder:
            raise ValueError(f"{vocab_file}: GPT-2 vocabulary has no '<|endoftext|>' token")
        self.eod_id = self.encoder["<|endoftext|>"]
        if impl == "python":
            self.backend = "python"
            return
        from .fast_tokenization import fast_gpt2, tiktoken_gpt2

        merges = ref.read_merges(merge_file)
        if impl in ("fast", "tiktoken"):
            self._tiktoken = tiktoken_gpt2(self.encoder, merges)
            if self._tiktoken is None and impl == "tiktoken":
                raise ValueError(
                    f"tokenizer impl 'tiktoken': tiktoken is not installed, or {vocab_file} "
                    f"is not in the merge order of {merge_file}"
                )
        if self._tiktoken is not None:
            self.backend = "tiktoken"
        else:
            self.backend = "tokenizers"
            self._rust = fast_gpt2(self.encoder, merges)
            if impl == "fast":
                self.fallback_reason = (
                    "tiktoken is not installed or the vocabulary is not in merge order; "
                    "using the Rust `tokenizers` BPE (same ids, slower)"
                )

    @property
    def tokenizer(self):
        """The pure-Python reference (gpt2_tokenization.GPT2Tokenizer), built on first use."""
        if self._reference is None:
            from .gpt2_tokenization import GPT2Tokenizer

            self._reference = GPT2Tokenizer(*self._files, errors="replace")
        return self._reference

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab(self) -> dict:
        return self.encoder

    @property
    def inv_vocab(self) -> dict:
        if self._inv_vocab is None:
            self._inv_vocab = {v: k for k, v in self.encoder.items()}
        return self._inv_vocab

    def _tiktoken_ids(self, text: str) -> list[int]:
        _refuse_surrogates(text)
        return self._tiktoken.encode_ordinary(text)

    def tokenize(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken_ids(text)
        if self._rust is not None:
            _refuse_surrogates(text)
            return self._rust.encode(text, add_special_tokens=False).ids
        return self._reference.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """ids of each text, on one thread (a worker process is one CPU)."""
        if self._tiktoken is not None:
            return [self._tiktoken_ids(t) for t in texts]
        if self._rust is not None:
            for t in texts:
                _refuse_surrogates(t)
            return [e.ids for e in self._rust.encode_batch(texts, add_special_tokens=False)]
        return [self._reference.encode(t) for t in texts]

    def tokenize_batch_bytes(self, texts: list[str], dtype) -> list[bytes]:
        """tokenize_batch as raw `dtype` bytes. With tiktoken the ids come back as a uint32
        buffer (no Python list of ints): `encode_to_numpy` with no special token allowed or
        disallowed is `encode_ordinary` ('<|endoftext|>' in a text stays ordinary text)."""
        encode = getattr(self._tiktoken, "encode_to_numpy", None)  # tiktoken >= 0.8
        if encode is None:
            return super().tokenize_batch_bytes(texts, dtype)
        out = []
        for t in texts:
            _refuse_surrogates(t)
            out.append(encode(t, disallowed_special=()).astype(dtype, copy=False).tobytes())
        return out

    def detokenize(self, token_ids: list[int]) -> str:
        if self._tiktoken is not None:
            return self._tiktoken.decode(list(token_ids), errors="replace")
        return self.tokenizer.decode(token_ids)

    @property
    def eod(self) -> int:
        return self.eod_id


class _BertWordPieceTokenizer(AbstractTokenizer):
    """BERT WordPiece (uncased: lower-case + accent strip; cased: neither).

    As in Megatron, '[BOS]', '[EOS]' and vocab_extra_ids sentinels '<extra_id_N>' are
    appended to the vocabulary when absent, so vocab_size grows accordingly.
    """

    def __init__(
        self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0, impl: str = "fast"
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
        self._fast = None
        if impl == "fast":
            from .fast_tokenization import BertFastPath

            self._fast = BertFastPath(self.tokenizer, lower_case)
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
            return self._fast.encode(text)
        return self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return self._fast.encode_batch(texts)
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


def load_sentencepiece(model_file: str):
    """sentencepiece.SentencePieceProcessor of `model_file`; TokenizerFileError naming
    --tokenizer-model and the file when it is missing or not a SentencePiece model."""
    _check_file(model_file, "--tokenizer-model")
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerFileError(
            f"--tokenizer-model {model_file}: not a SentencePiece model ({reason})"
        ) from None
    if processor.get_piece_size() < 1:
        raise TokenizerFileError(f"--tokenizer-model {model_file}: SentencePiece model has no pieces")
    return processor


class _SentencePieceTokenizer(AbstractTokenizer):
    """A sentencepiece .model plus Megatron's special tokens.

    '<CLS>', '<SEP>', '<EOD>', '<MASK>', the model's pad/bos/eos pieces (or '<PAD>', '<BOS>',
    '<EOS>' when the model has none) and vocab_extra_ids sentinels '<extra_id_N>' get the
    model's id when the model has that piece, else the next free id. tokenize() cuts the text
    at occurrences of these special strings (earliest first; at equal positions the one added
    first), encodes the pieces in between with sentencepiece and emits the special ids.
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0):
        super().__init__("SentencePieceTokenizer")
        self.tokenizer = load_sentencepiece(model_file)
        n = self.tokenizer.get_piece_size()
        self._inv_vocab = {i: self.tokenizer.id_to_piece(i) for i in range(n)}
        self._vocab = {piece: i for i, piece in self._inv_vocab.items()}
        self._special_tokens: dict[str, int] = {}
        self._cls_id = self._add_special_token("<CLS>")
        self._sep_id = self._add_special_token("<SEP>")
        self._eod_id = self._add_special_token("<EOD>")
        self._mask_id = self._add_special_token("<MASK>")
        self._pad_id = self._add_special_token(self._model_piece(self.tokenizer.pad_id(), "<PAD>"))
        self._bos_id = self._add_special_token(self._model_piece(self.tokenizer.bos_id(), "<BOS>"))
        self._eos_id = self._add_special_token(self._model_piece(self.tokenizer.eos_id(), "<EOS>"))
        self._t5_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in self._t5_tokens:
            self._add_special_token(token)
        self._inv_special_tokens = {v: k for k, v in self._special_tokens.items()}
        import re

        # Alternation order = insertion order, so equal-position ties go to the earlier token.
        self._special_re = re.compile("|".join(re.escape(t) for t in self._special_tokens))

    def _model_piece(self, piece_id: int, default: str) -> str:
        if 0 <= piece_id < self.tokenizer.get_piece_size():
            return self.tokenizer.id_to_piece(piece_id)
        return default

    def _add_special_token(self, token: str) -> int:
        if token not in self._vocab:
            new_id = len(self._vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token
        self._special_tokens[token] = self._vocab[token]
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict:
        return self._vocab

    @property
    def inv_vocab(self) -> dict:
        return self._inv_vocab

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(self.tokenizer.encode_as_ids(text[start : match.start()]))
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        ids.extend(self.tokenizer.encode_as_ids(text[start:]))
        return ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if not self._special_re.search(t)]
        out: list = [None] * len(texts)
        if plain:
            for i, ids in zip(plain, self.tokenizer.encode([texts[i] for i in plain])):
                out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.tokenize(t)
        return out

    def detokenize(self, ids: list[int]) -> str:
        """Megatron's layout: each run of ordinary ids decoded by sentencepiece and followed
        by a space, each special token's text followed by a space; the result stripped."""
        parts = []
        last = 0
        for i, token_id in enumerate(ids):
            if token_id in self._inv_special_tokens:
                parts.append(self.tokenizer.decode_ids(list(ids[last:i])) + " ")
                parts.append(self._inv_special_tokens[token_id] + " ")
                last = i + 1
        parts.append(self.tokenizer.decode_ids(list(ids[last:])))
        return "".join(parts).strip()

    @property
    def cls(self) -> int:
        return self._cls_id

    @property
    def sep(self) -> int:
        return self._sep_id

    @property
    def pad(self) -> int:
        return self._pad_id

    @property
    def bos(self) -> int:
        return self._bos_id

    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def mask(self) -> int:
        return self._mask_id

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self._vocab[t] for t in self._t5_tokens]


class _NoBertSpecialTokens:
    """cls, sep and mask are -1 and there are no additional special tokens, as Megatron's
    GPT-style tokenizers report them (the abstract base raises instead)."""

    @property
    def cls(self) -> int:
        return -1

    @property
    def sep(self) -> int:
        return -1

    @property
    def mask(self) -> int:
        return -1

    @property
    def additional_special_tokens_ids(self):
        return None


class _GPTSentencePieceTokenizer(_NoBertSpecialTokens, AbstractTokenizer):
    """A sentencepiece .model as it is (LLaMA-style): the model's ids and nothing added.

    tokenize() is sentencepiece's own encode (no BOS/EOS added, special strings in the text
    are ordinary text); detokenize() its decode. bos, eos and pad are the model's ids (-1
    where the model has none, as sentencepiece reports it); eod is eos; cls, sep and mask
    are -1. vocab_size is the model's number of pieces.
    """

    def __init__(self, model_file: str):
        super().__init__("GPTSentencePieceTokenizer")
        self.model_file = model_file
        self.tokenizer = load_sentencepiece(model_file)
        n = self.tokenizer.get_piece_size()
        self._vocab_size = n
        self._inv_vocab = None
        self._vocab = None
        self._bos_id = self.tokenizer.bos_id()
        self._eos_id = self.tokenizer.eos_id()
        self._pad_id = self.tokenizer.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def inv_vocab(self) -> dict:
        if self._inv_vocab is None:
            self._inv_vocab = {i: self.tokenizer.id_to_piece(i) for i in range(self._vocab_size)}
        return self._inv_vocab

    @property
    def vocab(self) -> dict:
        if self._vocab is None:
            self._vocab = {piece: i for i, piece in self.inv_vocab.items()}
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """ids of each text, on one thread (a worker process is one CPU)."""
        if not texts:
            return []
        return self.tokenizer.encode(list(texts), num_threads=1)

    def detokenize(self, token_ids) -> str:
        return self.tokenizer.decode([int(i) for i in token_ids])

    @property
    def eod(self) -> int:
        if self._eos_id < 0:
            return self._missing("EOD (the SentencePiece model has no eos piece)")
        return self._eos_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def bos(self) -> int:
        return self._bos_id

    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def pad(self) -> int:
        return self._pad_id

# Special tokens recognised as end-of-document / padding / begin when no tokenizer_config.json
# names them, in order of preference.
_HF_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
_HF_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_HF_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class _HFTokenizer(AbstractTokenizer):
    """A `tokenizers` tokenizer.json (the file, or a folder holding it).

    tokenize() runs the full pipeline including its post-processor (e.g. a BOS prepended),
    like transformers' encode(); detokenize() keeps special tokens. eod/pad/bos come from a
    tokenizer_config.json next to the file ('eos_token', 'pad_token', 'bos_token') when
    present, else from the first special token found among the usual names.
    """

    def __init__(self, tokenizer_model: str):
        super().__init__("HFTokenizer")
        path = _tokenizer_json_path(tokenizer_model)
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerFileError(
                f"--tokenizer-model {path}: not a `tokenizers` tokenizer.json ({reason})"
            ) from None
        self.encoder = self.tokenizer.get_vocab(with_added_tokens=True)
        self.decoder = {v: k for k, v in self.encoder.items()}
        config = _read_hf_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self._eod_id = self._special_id(config.get("eos_token"), _HF_EOD_NAMES)
        self._pad_id = self._special_id(config.get("pad_token"), _HF_PAD_NAMES)
        self._bos_id = self._special_id(config.get("bos_token"), _HF_BOS_NAMES)

    def _special_id(self, configured, names: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        candidates = (configured,) if configured else names
        for name in candidates:
            if name in self.encoder:
                return self.encoder[name]
        return None

    @property
    def vocab_size(self) -> int:
        return max(self.tokenizer.get_vocab_size(with_added_tokens=True), max(self.decoder) + 1)

    @property
    def vocab(self) -> dict:
        return self.encoder

    @property
    def inv_vocab(self) -> dict:
        return self.decoder

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def _known(self, value: int | None, what: str) -> int:
        if value is None:
            return self._missing(what)
        return value

    @property
    def eod(self) -> int:
        return self._known(self._eod_id, "EOD")

    @property
    def eos(self) -> int:
        return self._known(self._eod_id, "EOS")

    @property
    def pad(self) -> int:
        return self._known(self._pad_id, "PAD")

    @property
    def bos(self) -> int:
        return self._known(self._bos_id, "BOS")


def _tokenizer_json_path(tokenizer_model: str) -> str:
    """The tokenizer.json named by --tokenizer-model (the file, or a folder holding it)."""
    if os.path.isdir(tokenizer_model):
        path = os.path.join(tokenizer_model, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerFileError(
                f"--tokenizer-model {tokenizer_model}: folder holds no tokenizer.json"
            )
        return path
    _check_file(tokenizer_model, "--tokenizer-model (tokenizer.json)")
    return tokenizer_model


def _read_hf_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    import json

    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as e:  # bad JSON, or not UTF-8
            raise TokenizerFileError(
                f"--tokenizer-model: {path} (next to the tokenizer.json) is not valid JSON ({e})"
            ) from None
    return config if isinstance(config, dict) else {}


class _NullTokenizer(_NoBertSpecialTokens, AbstractTokenizer):
    """Text is already ids: whitespace-separated integers in [0, vocab_size].

    vocab_size (the flag) ids are data ids; one more id, vocab_size itself, is eod.
    """

    def __init__(self, vocab_size: int):
        super().__init__("NullTokenizer")
        vocab_size = int(vocab_size)
        if vocab_size < 1:
            raise ValueError(f"--vocab-size must be >= 1 for NullTokenizer, got {vocab_size}")
        self._eod_id = vocab_size
        self._vocab_size = vocab_size + 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict:
        return {str(i): i for i in range(self._vocab_size)}

    @property
    def inv_vocab(self) -> dict:
        return {i: str(i) for i in range(self._vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                token_id = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer: {word!r} is not an integer id") from None
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(f"NullTokenizer: id {token_id} outside [0, {self._vocab_size})")
            ids.append(token_id)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def eod(self) -> int:
        return self._eod_id
