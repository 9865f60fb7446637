"""GPT text generation: logits filtering, sampling, and batched autoregressive decoding.

One decoding step turns the logits of the last position into the next token:

    z = logits / temperature                       (greedy: argmax of the logits)
    z = top_k_logits(z, top_k, top_p)              (filtered entries become -inf)
    next ~ Categorical(softmax(z))

Decoding keeps every row of a batch in lockstep. Rows with a shorter prompt start
generating earlier; while a row is still inside its prompt, the prompt token overwrites
the sampled one. With the key/value cache (the default) the first step runs the shortest
prompt through the model and every later step feeds one new token with the cached keys
and values of the earlier positions (`layer_past` / `get_key_value`); with
`recompute=True` every step runs the whole sequence so far. Both compute the same logits.
Positions are the token indices 0 .. s - 1: learned position embeddings read them, and
with RoPE the attention rotates the fed queries and keys from the cached length on.

Each generated token also gets its log-probability under the model's distribution over
the real vocabulary (GenerationOutput.log_probs). A continuation's text is
detokenize(prompt + generated) less the prompt's text (continuation_text), so tokenizers
whose decoding depends on what came before (SentencePiece's word-boundary spaces) give
text that reads on from the prompt.

Tensor parallelism: the model gathers the vocabulary-split logits (parallel output off),
every rank samples, and the token of global rank 0 is broadcast so that all ranks feed
the same sequence. Pipeline parallelism is not supported.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence, TextIO

import torch
import torch.nn.functional as F

from megatron import print_rank_0
from megatron.model.kv_cache import StaticKVCache

# ----------------------------------------------------------------------------------------
# Filtering and sampling (pure functions).
# ----------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, top_k: int, filter_value: float = -float("inf")):
    """Keep the top_k largest logits of each row (ties with the k-th value are kept), set
    the rest to filter_value. logits [..., v]; top_k <= 0 or >= v keeps everything."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth_value = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth_value, filter_value)


def top_p_filter(logits: torch.Tensor, top_p: float, filter_value: float = -float("inf")):
    """Nucleus filtering: keep the smallest set of most probable tokens whose probability
    mass softmax(logits) reaches top_p, set the rest to filter_value.

    In descending order, token i is kept iff the mass of the tokens before it is < top_p,
    so the most probable token is always kept. top_p <= 0 or >= 1 keeps everything.
    """
    if top_p <= 0.0 or top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = F.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive cumsum
    sorted_remove = mass_before >= top_p
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, filter_value)


def top_k_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, filter_value: float = -float("inf")
) -> torch.Tensor:
    """Top-k, then top-p filtering of logits [..., v] (returns a new tensor)."""
    return top_p_filter(top_k_filter(logits, top_k, filter_value), top_p, filter_value)


@dataclass
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0  # logits are divided by this before filtering (> 0)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 0.0  # keep the nucleus of this probability mass (0: off)
    greedy: bool = False  # argmax instead of sampling

    def validate(self) -> None:
        """Raise ValueError naming the flag of an out-of-range value."""
        if not self.greedy and not self.temperature > 0.0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in [0, 1], got {self.top_p}")


def real_vocab_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """logits [b, v_padded] in fp32 with the padding ids >= vocab_size set to -inf."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_size:] = -float("inf")
    return logits


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [b, v_padded] -> next token ids [b] (int64).

    Entries at ids >= vocab_size (the padding of the embedding table) are never chosen.
    """
    logits = real_vocab_logits(logits, vocab_size)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = top_k_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = F.softmax(logits, dim=-1)  # [b, v]
    return torch.multinomial(probs, num_samples=1, generator=generator).view(-1)


# ----------------------------------------------------------------------------------------
# Batches and the decoding loop.
# ----------------------------------------------------------------------------------------


def pad_batch(
    batch: Sequence[Sequence[int]], pad_id: int, length: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to `length` -> (tokens [b, length] int64, lengths [b])."""
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(batch):
        if len(row) > length:
            raise ValueError(f"pad_batch: row {i} has {len(row)} tokens, more than {length}")
        tokens[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
    lengths = torch.tensor([len(row) for row in batch], dtype=torch.long, device=device)
    return tokens, lengths


def get_batch(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [b, s] -> (tokens, causal attention mask [1, 1, s, s] bool (True = masked),
    position ids [b, s])."""
    b, s = tokens.shape
    causal = torch.ones((s, s), dtype=torch.bool, device=tokens.device).tril_()
    attention_mask = (~causal).view(1, 1, s, s)
    position_ids = torch.arange(s, dtype=torch.long, device=tokens.device).expand(b, s)
    return tokens, attention_mask, position_ids


def forward_step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_past=None,
    get_key_value: bool = False,
):
    """Logits [b, sq, v] of the full (gathered) vocabulary, and the new key/value cache
    with get_key_value. tokens / position_ids [b, sq]; attention_mask [1, 1, >=sk, >=sk]."""
    output = model(
        tokens,
        position_ids,
        attention_mask,
        layer_past=layer_past,
        get_key_value=get_key_value,
        forward_method_parallel_output=False,
    )
    if get_key_value:
        logits, presents = output
        return logits, presents
    if isinstance(output, tuple):  # MoE: (logits, aux loss)
        output = output[0]
    return output, None


def _agree_across_ranks(tokens: torch.Tensor) -> torch.Tensor:
    """Every rank takes global rank 0's tokens (each tensor-parallel rank sampled with
    its own random state)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(tokens, src=0)
    return tokens


@dataclass
class GenerationOutput:
    """Result of generate_tokens for a batch of b rows."""

    tokens: torch.Tensor  # [b, s]: prompt, generated tokens, eod fill, caller's padding
    # [b]: tokens[i, :lengths[i]] is prompt + generated (no final eod; a final stop token
    # of stop_ids is included)
    lengths: torch.Tensor
    finished: torch.Tensor  # [b] bool: the row ended with eod or a stop token (not a limit)
    # [b, s] fp32: at each generated position (and a final eod) log p(token | the tokens
    # before it) under the model's own distribution over the real vocabulary (temperature
    # 1, no top-k / top-p filtering); with prompt_log_probs also at prompt positions 1 ..;
    # 0 elsewhere (and everywhere when return_log_probs is off).
    log_probs: torch.Tensor


class _CudaGraphStep:
    """One fixed-shape decoding step (feed one token per row at a position given on the
    device, read the logits of the full vocabulary) captured as a CUDA graph through
    the accelerator and replayed at every later step: one launch instead of a few
    hundred kernels from Python. The cache switches to write_at (kv_cache.py)."""

    def __init__(self, model, cache: StaticKVCache, batch: int, device) -> None:
        self.model, self.cache = model, cache
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def _run(self) -> torch.Tensor:
        self.cache.update_decode_mask()
        logits, _ = forward_step(
            self.model, self.tokens, self.position_ids, None, self.cache, get_key_value=True
        )
        return logits[:, -1, :]  # [b, v]

    def _set(self, token: torch.Tensor, pos: int) -> None:
        self.tokens.copy_(token)  # [b, 1]
        self.position_ids.fill_(pos)
        self.position.fill_(pos)

    def run_eagerly(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """The same fixed-shape step without a graph -> logits [b, v]."""
        self._set(token, pos)
        if self.cache.position is None:
            self.cache.use_position(self.position)
        return self._run()

    def capture(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Warm up on a side stream, capture; the warm-up runs already write this step's
        keys and values (the replays write the same ones again). -> logits [b, v]."""
        from megatron.accelerator import get_accelerator

        acc = get_accelerator()
        self._set(token, pos)
        self.cache.use_position(self.position)
        stream = acc.Stream()
        stream.wait_stream(acc.current_stream())
        with acc.stream(stream):
            for _ in range(2):
                self._run()
        acc.current_stream().wait_stream(stream)
        graph = acc.create_graph()
        with acc.capture_to_graph(graph):
            self.logits = self._run()
        self.graph = graph
        acc.replay_graph(graph)
        return self.logits

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        from megatron.accelerator import get_accelerator

        self._set(token, pos)
        get_accelerator().replay_graph(self.graph)
        return self.logits


_GRAPH_NOTES: set = set()


def _note_once(message: str) -> None:
    if message not in _GRAPH_NOTES:
        _GRAPH_NOTES.add(message)
        print_rank_0(message)


def use_cuda_graphs(device: torch.device) -> bool:
    """Decode steps are CUDA graphs on a CUDA device unless MEGATRON_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("MEGATRON_CUDA_GRAPHS", "1") != "0"


class _CachedDecoder:
    """The model over a preallocated key/value cache: prefill(n) runs positions
    0 .. n - 1 at once, step(pos) feeds the token at pos - 1 (positions in order)."""

    def __init__(self, model, tokens: torch.Tensor, position_ids: torch.Tensor,
                 cuda_graphs: bool, fixed_shape_steps: bool = False) -> None:
        self.model, self.tokens, self.position_ids = model, tokens, position_ids
        self.cache = StaticKVCache(tokens.size(1))
        self.cuda_graphs = cuda_graphs
        self.graph_step: _CudaGraphStep | None = None
        self.fixed_step: _CudaGraphStep | None = None
        if fixed_shape_steps and not cuda_graphs:
            self.fixed_step = _CudaGraphStep(model, self.cache, tokens.size(0), tokens.device)

    def prefill(self, n: int) -> torch.Tensor:
        logits, _ = forward_step(
            self.model, self.tokens[:, :n], self.position_ids[:, :n], None, self.cache,
            get_key_value=True,
        )
        return logits  # [b, n, v]

    def _eager(self, pos: int) -> torch.Tensor:
        logits, _ = forward_step(
            self.model, self.tokens[:, pos - 1 : pos], self.position_ids[:, pos - 1 : pos],
            None, self.cache, get_key_value=True,
        )
        return logits[:, -1, :]

    def step(self, pos: int) -> torch.Tensor:
        """logits [b, v] at position pos - 1."""
        token = self.tokens[:, pos - 1 : pos]  # [b, 1]
        if self.graph_step is not None:
            return self.graph_step(token, pos - 1)
        if self.fixed_step is not None:
            return self.fixed_step.run_eagerly(token, pos - 1)
        if not self.cuda_graphs:
            return self._eager(pos)
        self.cuda_graphs = False  # one capture per generation, fallback for the rest
        try:
            self.graph_step = _CudaGraphStep(self.model, self.cache, token.size(0),
                                             token.device)
            logits = self.graph_step.capture(token, pos - 1)
            _note_once(" generation: decode steps run as a CUDA graph")
            return logits
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            self.graph_step = None
            self.cache.position = self.cache.decode_mask = None
            _note_once(f" generation: CUDA graph capture failed ({type(e).__name__}: "
                       f"{str(e)[:200]}); decode steps run eagerly")
            return self._eager(pos)


def generate_tokens(
    model: torch.nn.Module,
    context_tokens: torch.Tensor,
    context_lengths: torch.Tensor,
    max_new_tokens: int,
    eod: int,
    params: SamplingParams,
    recompute: bool = False,
    vocab_size: int | None = None,
    stop_ids: Sequence[int] = (),
    prompt_log_probs: bool = False,
    return_log_probs: bool = True,
    sync_interval: int = 16,
    cuda_graphs: bool | None = None,
    fixed_shape_steps: bool = False,
) -> GenerationOutput:
    """Extend each row of context_tokens [b, s] (row i's prompt is its first
    context_lengths[i] >= 1 tokens) by up to max_new_tokens tokens, stopping a row at
    its first generated eod (dropped) or token of stop_ids (kept), or at position s (s
    must be <= the model's positions).

    With the key/value cache (the default) the shortest prompt is prefilled in one
    forward pass into a preallocated cache and each later step feeds one token with no
    mask; steps never wait for the host except every sync_interval steps, when the loop
    asks whether every row is done (the rows that are run on with eod fill). On CUDA the
    one-token step is a CUDA graph (cuda_graphs None: unless MEGATRON_CUDA_GRAPHS=0);
    fixed_shape_steps runs that graph's step (every step attends to the whole cache under
    a mask computed on the device) eagerly, on any device. recompute=True runs the whole
    sequence every step (the reference).

    Runs under torch.no_grad with the model in eval mode; see the module docstring for
    the tensor-parallel behaviour.
    """
    if context_lengths.min() < 1:
        raise ValueError("generate_tokens: every prompt needs at least one token")
    b, max_length = context_tokens.shape
    device = context_tokens.device
    tokens, attention_mask, position_ids = get_batch(context_tokens.clone())
    context_lengths = context_lengths.to(device)
    limits = torch.clamp(context_lengths + max_new_tokens, max=max_length)  # [b]
    lengths = limits.clone()
    done = limits <= context_lengths  # rows with nothing to generate
    finished = torch.zeros_like(done)
    log_probs = torch.zeros((b, max_length), dtype=torch.float32, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    eods = torch.full_like(lengths, eod)
    first, end = int(context_lengths.min()), int(torch.maximum(limits, context_lengths).max())
    if cuda_graphs is None:
        cuda_graphs = use_cuda_graphs(device)
    model.eval()
    with torch.no_grad():
        if recompute:
            logits, _ = forward_step(model, tokens[:, :first], position_ids[:, :first],
                                     attention_mask[..., :first, :first])
        else:
            decoder = _CachedDecoder(model, tokens, position_ids, cuda_graphs,
                                     fixed_shape_steps)
            logits = decoder.prefill(first)  # [b, first, v]
        if prompt_log_probs and first > 1:
            scores = F.log_softmax(real_vocab_logits(logits[:, :-1].flatten(0, 1), vocab_size),
                                   dim=-1).view(b, first - 1, -1)  # [b, first - 1, v]
            log_probs[:, 1:first] = scores.gather(2, tokens[:, 1:first, None]).squeeze(2)
        last = logits[:, -1, :]  # [b, v] (the full vocabulary on every rank)
        for pos in range(first, end):
            # logits at position pos - 1 predict the token at pos
            if pos > first and recompute:
                last, _ = forward_step(model, tokens[:, :pos], position_ids[:, :pos],
                                       attention_mask[..., :pos, :pos])
                last = last[:, -1, :]
            elif pos > first:
                last = decoder.step(pos)
            new = sample_next_token(last, params, vocab_size)  # [b]
            new = _agree_across_ranks(new.to(tokens.dtype).contiguous())
            in_prompt = context_lengths > pos
            generating = ~in_prompt & ~done
            chosen_token = torch.where(generating, new, torch.where(in_prompt, tokens[:, pos], eods))
            if return_log_probs:
                scores = F.log_softmax(real_vocab_logits(last, vocab_size), dim=-1)  # [b, v]
                chosen = scores.gather(1, chosen_token.view(b, 1)).view(b)
                keep = generating | in_prompt if prompt_log_probs else generating
                log_probs[:, pos] = torch.where(keep, chosen, torch.zeros_like(chosen))
            tokens[:, pos] = chosen_token
            ended = generating & (new == eod)
            stopped = generating & torch.isin(new, stops) & ~ended
            lengths = torch.where(ended, torch.full_like(lengths, pos), lengths)
            lengths = torch.where(stopped, torch.full_like(lengths, pos + 1), lengths)
            finished |= ended | stopped
            done |= ended | stopped | (generating & (pos + 1 >= limits))
            if (pos - first) % sync_interval == sync_interval - 1 and bool(done.all()):
                break
    return GenerationOutput(tokens=tokens, lengths=lengths, finished=finished, log_probs=log_probs)


# ----------------------------------------------------------------------------------------
# Unconditional and conditional sampling, with their output files.
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Everything generation reads from the command line."""

    batch_size: int  # --micro-batch-size
    max_length: int  # --seq-length: prompt + generated tokens never exceed it
    out_seq_length: int  # --out-seq-length: generated tokens per sample at most
    params: SamplingParams
    recompute: bool = False  # --recompute: no key/value cache
    log_interval: int = 100  # progress line every this many samples
    log_probs: bool = False  # --log-probs: each sample also has 'tokens' and 'log_probs'


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def continuation_text(tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """The text that `generated` adds after `prompt`: detokenize(prompt + generated) less
    its leading detokenize(prompt) (detokenize(generated) if that is not its prefix).

    Detokenizing the continuation alone loses what depends on the tokens before it: a
    SentencePiece model drops the word-boundary space of a text's first piece ('▁the'
    alone decodes to 'the'), so 'Hello' continued by '▁world' would read 'Helloworld'.
    """
    if not generated:
        return ""
    whole = tokenizer.detokenize(list(prompt) + list(generated))
    head = tokenizer.detokenize(list(prompt))
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.detokenize(list(generated))


def _generate_batch(model, prompts: List[List[int]], tokenizer, settings, device) -> List[dict]:
    """Generate for one batch of tokenized prompts -> [{'text', 'length', 'finished'}]
    (and 'tokens', 'log_probs' of the generated tokens with settings.log_probs)."""
    longest = max(len(p) for p in prompts)
    length = min(settings.max_length, longest + settings.out_seq_length)
    context, context_lengths = pad_batch(prompts, tokenizer.eod, length, device)
    out = generate_tokens(
        model,
        context,
        context_lengths,
        settings.out_seq_length,
        tokenizer.eod,
        settings.params,
        recompute=settings.recompute,
        vocab_size=tokenizer.vocab_size,
        return_log_probs=settings.log_probs,
    )
    results = []
    for row, start in enumerate(context_lengths.tolist()):
        end = int(out.lengths[row])
        generated = out.tokens[row, start:end].tolist()
        sample = {
            "text": continuation_text(tokenizer, prompts[row], generated),
            "length": len(generated),
            "finished": bool(out.finished[row]),
        }
        if settings.log_probs:
            sample["tokens"] = generated
            sample["log_probs"] = out.log_probs[row, start:end].tolist()
        results.append(sample)
    return results


def generate_samples_unconditional(
    model, tokenizer, num_samples: int, settings: GenerationSettings, device=None
) -> Iterator[dict]:
    """Yield num_samples samples {'text', 'length' (generated tokens), 'finished' (ended
    with eod)}, each started from a lone eod token, settings.batch_size at a time."""
    settings.params.validate()
    start, done = time.time(), 0
    for batch in _batched(range(num_samples), settings.batch_size):
        for sample in _generate_batch(
            model, [[tokenizer.eod] for _ in batch], tokenizer, settings, device
        ):
            yield sample
            done += 1
            if done % settings.log_interval == 0 or done == num_samples:
                print_rank_0(
                    f" generated {done}/{num_samples} samples ({time.time() - start:.1f} s elapsed)"
                )


def read_prompts(path: str, tokenizer, max_length: int) -> List[tuple[str, List[int]]]:
    """(prompt, tokens) for each line of `path` (newline stripped; an empty line gives an
    unconditional sample). Raises ValueError naming the file and line of a prompt that
    leaves no room to generate within max_length tokens."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"--sample-input-file {path}: cannot read ({e.strerror})") from e
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"--sample-input-file {path} line {line}: not UTF-8 text (byte "
            f"0x{data[e.start]:02x} at offset {e.start}); save the prompts as UTF-8"
        ) from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        ids = tokenizer.tokenize(line) if line else [tokenizer.eod]
        if len(ids) >= max_length:
            raise ValueError(
                f"{path} line {number}: the prompt has {len(ids)} tokens; --seq-length "
                f"{max_length} leaves no room to generate"
            )
        prompts.append((line, ids))
    return prompts


def generate_samples_conditional(
    model, tokenizer, prompts: Sequence[tuple[str, List[int]]], settings, device=None
) -> Iterator[dict]:
    """Yield {'prompt', 'text' (the continuation), 'length', 'finished'} for each
    (prompt, tokens), settings.batch_size prompts at a time."""
    settings.params.validate()
    start, done = time.time(), 0
    for batch in _batched(list(prompts), settings.batch_size):
        samples = _generate_batch(model, [ids for _, ids in batch], tokenizer, settings, device)
        for (prompt, _), sample in zip(batch, samples):
            yield {"prompt": prompt, **sample}
            done += 1
            if done % settings.log_interval == 0 or done == len(prompts):
                print_rank_0(
                    f" generated {done}/{len(prompts)} continuations "
                    f"({time.time() - start:.1f} s elapsed)"
                )


def write_json_lines(samples: Iterable[dict], out: TextIO) -> int:
    """One JSON object per line (flushed as it comes); returns the count."""
    count = 0
    for sample in samples:
        out.write(json.dumps(sample, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count


def write_context_blocks(samples: Iterable[dict], out: TextIO) -> int:
    """Megatron's plain-text layout: for each sample a block
    '\\nContext: <prompt>\\n\\nMegatron-LM: <continuation>\\n'; returns the count."""
    count = 0
    for sample in samples:
        out.write(f"\nContext: {sample['prompt']}\n\nMegatron-LM: {sample['text']}\n")
        out.flush()
        count += 1
    return count
