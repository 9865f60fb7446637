"""Megatron's generation request: checking it, generating, and the response layout.

A request is the JSON object of `PUT /api`:

    prompts             list of strings, 1 .. 128 of them (required)
    tokens_to_generate  int >= 0, default 64: new tokens per prompt at most (0: score the
                        prompts only, which needs logprobs)
    logprobs            bool: return the log-probability of every token after the first
    temperature         number in (0, 100], default 1.0
    top_k               int in [0, 1000]; 1 is greedy decoding (argmax)
    top_p               number in [0, 1]; not together with top_k > 0
    add_BOS             bool: start every prompt with the BOS token (eod where the
                        tokenizer has none); an empty prompt needs it
    stop_on_eol         bool: a row also ends after a newline token (kept in its text)
    random_seed         int >= 0: seed the sampler on every rank first
    no_log              bool: do not print the request on the server

The response is {"text": [...], "segments": [...], "logprobs": [...] or null}: for each
prompt the detokenized prompt + continuation, the list of its tokens each detokenized on
its own (a segment per token, so ''.join(segments) is the text for byte-level BPE), and
with logprobs the log p(token | the tokens before it) of tokens 1 .. n - 1 under the
model (before temperature, top-k and top-p), n - 1 numbers for n segments. A row ends at
tokens_to_generate new tokens, at the end-of-document token (which is not returned) or
with stop_on_eol after a newline. Every row gets up to tokens_to_generate new tokens of
its own (Megatron pads every row to the longest prompt's total).

Anything else is a RequestError: HTTP 400 with its message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch

from megatron.text_generation_utils import SamplingParams, generate_tokens, pad_batch

MAX_PROMPTS = 128
# Keys of Megatron's interface that this server does not implement: refused when set.
_UNSUPPORTED = {
    "beam_width": "beam search (beam_width) is not supported",
    "stop_on_double_eol": "stop_on_double_eol is not supported; use stop_on_eol",
    "prevent_newline_after_colon": "prevent_newline_after_colon is not supported",
    "top_p_decay": "top_p_decay is not supported",
    "top_p_bound": "top_p_bound is not supported",
}
_RENAMED = {
    "max_len": "max_len is no longer used; replace it with tokens_to_generate",
    "sentences": "sentences is no longer used; replace it with prompts",
}


class RequestError(ValueError):
    """A bad request: the server answers HTTP 400 with this message."""


@dataclass
class GenerateRequest:
    """A checked request (see the module docstring), with its prompts tokenized."""

    prompts: List[str]
    prompt_tokens: List[List[int]] = field(default_factory=list)
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    add_BOS: bool = False
    stop_on_eol: bool = False
    random_seed: int = -1
    no_log: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            greedy=self.top_k == 1,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean value (true or false), got {value!r}")
    return value


def bos_token(tokenizer) -> int:
    """The BOS id of add_BOS: the tokenizer's bos where it has one, else eod."""
    try:
        bos = tokenizer.bos
    except (AttributeError, NotImplementedError, ValueError):
        bos = -1
    return bos if isinstance(bos, int) and bos >= 0 else tokenizer.eod


def eol_token_ids(tokenizer) -> List[int]:
    """Ids of the tokens of '\\n' and '\\n\\n' whose text holds a newline (stop_on_eol)."""
    ids = set()
    for text in ("\n", "\n\n"):
        for token in tokenizer.tokenize(text):
            if "\n" in tokenizer.detokenize([token]):
                ids.add(token)
    return sorted(ids)


def parse_generate_request(
    body: Any, tokenizer, max_length: int, max_tokens: int | None = None
) -> GenerateRequest:
    """Check a request body (the parsed JSON) and tokenize its prompts; max_length is the
    model's context (prompt + generated tokens), max_tokens caps batch x length.
    Raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a 'prompts' list")
    for name, message in _RENAMED.items():
        if name in body:
            raise RequestError(message)
    for name, message in _UNSUPPORTED.items():
        if body.get(name) not in (None, False, 0, 0.0):
            raise RequestError(message)
    if "prompts" not in body:
        raise RequestError("prompts argument required")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}, got {len(prompts)}")
    req = GenerateRequest(prompts=list(prompts))

    req.tokens_to_generate = body.get("tokens_to_generate", 64)
    if not _is_int(req.tokens_to_generate) or req.tokens_to_generate < 0:
        raise RequestError("tokens_to_generate must be an integer greater than or equal to "
                           f"0, got {req.tokens_to_generate!r}")
    req.logprobs = _flag(body, "logprobs")
    if req.tokens_to_generate == 0 and not req.logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be True")
    req.temperature = body.get("temperature", 1.0)
    if not _is_number(req.temperature) or not 0.0 < req.temperature <= 100.0:
        raise RequestError("temperature must be a positive number less than or equal to "
                           f"100.0, got {req.temperature!r}")
    req.temperature = float(req.temperature)
    req.top_k = body.get("top_k", 0)
    if not _is_int(req.top_k) or not 0 <= req.top_k <= 1000:
        raise RequestError("top_k must be an integer equal to or greater than 0 and less "
                           f"than or equal to 1000, got {req.top_k!r}")
    req.top_p = body.get("top_p", 0.0)
    if not _is_number(req.top_p) or not 0.0 <= req.top_p <= 1.0:
        raise RequestError(f"top_p must be a number in [0, 1], got {req.top_p!r}")
    req.top_p = float(req.top_p)
    if req.top_p > 0.0 and req.top_k > 0:
        raise RequestError("cannot set both top-k and top-p samplings")
    req.add_BOS = _flag(body, "add_BOS")
    req.stop_on_eol = _flag(body, "stop_on_eol")
    req.no_log = _flag(body, "no_log")
    req.random_seed = body.get("random_seed", -1)
    if not _is_int(req.random_seed):
        raise RequestError(f"random_seed must be an integer, got {req.random_seed!r}")
    if req.random_seed < 0 and "random_seed" in body:
        raise RequestError(f"random_seed must be a positive integer, got {req.random_seed}")

    if any(not p for p in prompts) and not req.add_BOS:
        raise RequestError("Empty prompts require add_BOS=true")
    bos = [bos_token(tokenizer)] if req.add_BOS else []
    req.prompt_tokens = [bos + tokenizer.tokenize(p) for p in prompts]
    for i, ids in enumerate(req.prompt_tokens):
        if not ids:
            raise RequestError(f"prompt {i} has no tokens; set add_BOS=true to start it")
        if len(ids) > max_length:
            raise RequestError(f"prompt {i} has {len(ids)} tokens, more than the model's "
                               f"context of {max_length} tokens")
    length = max(len(ids) for ids in req.prompt_tokens) + req.tokens_to_generate
    if length > max_length:
        raise RequestError(f"Length of prompt + tokens_to_generate ({length}) is longer than "
                           f"the model's context of {max_length} tokens")
    if max_tokens is not None and length * len(prompts) > max_tokens:
        raise RequestError(f"Too many tokens: {len(prompts)} prompts x {length} positions "
                           f"is more than {max_tokens} (--max-tokens-to-oom)")
    return req


def token_segments(tokenizer, ids: List[int]) -> List[str]:
    """Each token's own text: SentencePiece pieces as in the vocabulary ('▁the'), the
    NullTokenizer's ids as numbers, byte-level BPE tokens decoded alone (a piece of a
    multi-byte character becomes U+FFFD)."""
    name = type(tokenizer).__name__
    if "SentencePiece" in name:
        return [tokenizer.inv_vocab.get(int(t), "") for t in ids]
    if "Null" in name:
        return [str(int(t)) for t in ids]
    return [tokenizer.detokenize([int(t)]) for t in ids]


def generate_and_post_process(
    model: torch.nn.Module, tokenizer, req: GenerateRequest, device=None
) -> Dict[str, Any]:
    """Generate for a checked request on every rank (the same call on each) -> the
    response object {"text", "segments", "logprobs"}."""
    if req.random_seed >= 0:
        torch.manual_seed(req.random_seed)
    prompts = req.prompt_tokens
    length = max(len(ids) for ids in prompts) + req.tokens_to_generate
    # a row needs one token to start from: an empty prompt is only possible with add_BOS
    context, context_lengths = pad_batch(prompts, tokenizer.eod, length, device)
    out = generate_tokens(
        model,
        context,
        context_lengths,
        req.tokens_to_generate,
        tokenizer.eod,
        req.sampling_params(),
        vocab_size=tokenizer.vocab_size,
        stop_ids=eol_token_ids(tokenizer) if req.stop_on_eol else (),
        prompt_log_probs=req.logprobs,
        return_log_probs=req.logprobs,
    )
    tokens, lengths = out.tokens.tolist(), out.lengths.tolist()
    log_probs = out.log_probs.tolist() if req.logprobs else None
    texts, segments, scores = [], [], []
    for row, n in enumerate(lengths):
        ids = tokens[row][:n]
        texts.append(tokenizer.detokenize(ids))
        segments.append(token_segments(tokenizer, ids))
        if log_probs is not None:
            scores.append(log_probs[row][1:n])
    return {"text": texts, "segments": segments, "logprobs": scores if req.logprobs else None}
