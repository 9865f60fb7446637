"""Text generation: top-k / top-p filtering, sampling, the decoding loop (key/value cache
equals recompute, batching, eod stopping, tensor parallelism on two gloo ranks), and
tools/generate_samples_gpt.py run like a user on a checkpoint written by pretrain_gpt.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.text_generation_utils import (
    SamplingParams,
    generate_tokens,
    pad_batch,
    read_prompts,
    sample_next_token,
    top_k_filter,
    top_k_logits,
    top_p_filter,
    write_context_blocks,
)

from ..dist_utils import run_distributed
from .gpt_runs import ROOT, preprocess, run_pretrain, tiny_gpt_args

NEG = -float("inf")
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]  # three prompt lengths in one batch
EOD = 127  # the tiny model's last vocabulary id


# ----------------------------------------------------------------------------------------
# Filtering and sampling.
# ----------------------------------------------------------------------------------------


def test_top_k_filter_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, 5.0, 5.0, -1.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[NEG, 4.0, 3.0, NEG], [NEG, 5.0, 5.0, NEG]]
    tied = top_k_filter(torch.tensor([[3.0, 3.0, 3.0, 1.0]]), 2)  # ties with the 2nd kept
    assert tied.tolist() == [[3.0, 3.0, 3.0, NEG]]
    assert torch.equal(top_k_filter(logits, 0), logits)  # off
    assert torch.equal(top_k_filter(logits, 4), logits)  # k = v keeps all
    assert logits[0, 0] == 1.0  # the input is not modified


def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    # descending: 0.5, 0.25, 0.15, 0.1; mass before each: 0, 0.5, 0.75, 0.9
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.8) == [False, True, True, True]
    assert kept(0.95) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # the top token always stays
    assert torch.equal(top_p_filter(logits, 0.0), logits)  # off
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # each row is filtered on its own
    two = torch.stack([logits[0], logits[0].flip(0)])
    assert torch.isfinite(top_p_filter(two, 0.6)).tolist() == [
        [False, True, False, True],
        [True, False, True, False],
    ]


def test_top_k_then_top_p():
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    # top-k 3 drops 0.1; the renormalised nucleus 0.5/0.9 = 0.56 < 0.6 needs 0.25 too
    out = top_k_logits(logits, top_k=3, top_p=0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]


def test_sample_next_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 1.0, 0.0]])
    assert sample_next_token(logits, SamplingParams(greedy=True)).tolist() == [3, 0]
    # ids beyond the real vocabulary (padding of the embedding table) are never chosen
    assert sample_next_token(logits, SamplingParams(greedy=True), vocab_size=3).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    many = torch.cat([logits] * 200)
    drawn = sample_next_token(many, SamplingParams(top_k=2), vocab_size=3, generator=g)
    assert set(drawn[0::2].tolist()) == {1, 2} and set(drawn[1::2].tolist()) == {0, 2}
    # a low temperature concentrates the distribution on the argmax
    cold = sample_next_token(many, SamplingParams(temperature=0.05), generator=g)
    assert cold[0::2].eq(3).all() and cold[1::2].eq(0).all()
    with pytest.raises(ValueError, match="--top_p"):
        SamplingParams(top_p=1.5).validate()
    with pytest.raises(ValueError, match="--temperature"):
        SamplingParams(temperature=0.0).validate()


# ----------------------------------------------------------------------------------------
# The decoding loop on a randomly initialised tiny GPT (vocabulary 128).
# ----------------------------------------------------------------------------------------


def _tiny_model():
    from megatron import mpu
    from megatron.model import GPTModel

    from ..unit.model.tiny import tiny_config

    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    return GPTModel(tiny_config(), parallel_output=False)


@pytest.fixture(scope="module")
def tiny_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tiny_model()
    torch.set_num_threads(threads)


def _generate(model, prompts, params, recompute=False, eod=EOD, seed=None, new=10):
    context, lengths = pad_batch(prompts, 0, 20)
    if seed is not None:
        torch.manual_seed(seed)
    return generate_tokens(model, context, lengths, new, eod, params, recompute=recompute)


def test_kv_cache_equals_recompute(tiny_model):
    greedy = SamplingParams(greedy=True)
    cached = _generate(tiny_model, PROMPTS, greedy)
    full = _generate(tiny_model, PROMPTS, greedy, recompute=True)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.lengths, full.lengths)
    # prompts are kept, then 10 new tokens each (no eod in this run)
    for row, prompt in enumerate(PROMPTS):
        assert cached.tokens[row, : len(prompt)].tolist() == prompt
        assert int(cached.lengths[row]) == len(prompt) + 10
    # sampling draws the same random numbers in both modes
    top_k = SamplingParams(top_k=20, temperature=0.8)
    cached = _generate(tiny_model, PROMPTS, top_k, seed=5)
    full = _generate(tiny_model, PROMPTS, top_k, recompute=True, seed=5)
    assert torch.equal(cached.tokens, full.tokens)
    assert len(set(cached.tokens[2, 6:16].tolist())) > 3  # really sampled


def test_batch_rows_match_single_prompts(tiny_model):
    greedy = SamplingParams(greedy=True)
    batched = _generate(tiny_model, PROMPTS, greedy)
    for row, prompt in enumerate(PROMPTS):
        alone = _generate(tiny_model, [prompt], greedy)
        n = int(alone.lengths[0])
        assert n == int(batched.lengths[row])
        assert torch.equal(alone.tokens[0, :n], batched.tokens[row, :n])


def test_stops_at_eod(tiny_model):
    greedy = SamplingParams(greedy=True)
    first = _generate(tiny_model, PROMPTS, greedy)
    eod = int(first.tokens[0, 3])  # row 0's first generated token becomes the eod
    out = _generate(tiny_model, PROMPTS, greedy, eod=eod)
    assert bool(out.finished[0]) and int(out.lengths[0]) == 3  # stopped at once
    assert out.tokens[0, 3:13].eq(eod).all()  # then padded with eod while others go on
    for row in (1, 2):  # rows that never produce it run to their limit
        if eod not in first.tokens[row, len(PROMPTS[row]) : int(first.lengths[row])].tolist():
            assert not bool(out.finished[row])
            assert torch.equal(
                out.tokens[row, : int(out.lengths[row])],
                first.tokens[row, : int(first.lengths[row])],
            )


def _check_tensor_parallel(rank, world_size):
    """TP=2: every rank ends with the same sampled tokens (each rank draws with its own
    random state), and greedy decoding gives the TP=1 tokens."""
    from megatron import mpu

    mpu.initialize_model_parallel(world_size)
    model = _tiny_model()
    assert model.language_model.transformer.layers[0].mlp.dense_h_to_4h.weight.shape[0] == 128
    sampled = _generate(model, PROMPTS, SamplingParams(top_k=30), seed=100 + rank)
    gathered = [torch.empty_like(sampled.tokens) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, sampled.tokens)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    parallel = _generate(model, PROMPTS, SamplingParams(greedy=True))
    mpu.set_tensor_model_parallel_world_size(1)
    mpu.set_tensor_model_parallel_rank(0)
    try:
        serial = _generate(_tiny_model(), PROMPTS, SamplingParams(greedy=True))
    finally:
        mpu.clear_model_parallel_overrides()
    assert torch.equal(parallel.tokens, serial.tokens)


def test_tensor_parallel_generation():
    run_distributed(_check_tensor_parallel, world_size=2, timeout=120)


# LLaMA-style: rotary positions, grouped-query attention (4 query heads on 2 key/value
# heads), SwiGLU, RMSNorm, untied output layer.
LLAMA = dict(use_rotary_position_embeddings=True, num_key_value_heads=2, swiglu=True,
             normalization="rmsnorm", untie_embeddings_and_output_weights=True)


def _tiny_llama():
    from megatron import mpu
    from megatron.model import GPTModel

    from ..unit.model.tiny import tiny_config

    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    return GPTModel(tiny_config(**LLAMA), parallel_output=False)


def _check_static_cache_equals_recompute(model):
    """Greedy tokens (and their log-probabilities) of the preallocated cache equal the
    whole-sequence recompute; rows of other prompt lengths, an early eod, a row with
    nothing to generate, prompt log-probabilities and a stop token included."""
    greedy = SamplingParams(greedy=True)
    cached = _generate(model, PROMPTS, greedy, new=14)
    full = _generate(model, PROMPTS, greedy, recompute=True, new=14)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.lengths, full.lengths)
    assert torch.allclose(cached.log_probs, full.log_probs, atol=1e-5)  # fp32
    # the CUDA graph's fixed-shape step (whole cache, device-side mask and position), eager
    context, lengths = pad_batch(PROMPTS, 0, 20)
    fixed = generate_tokens(model, context, lengths, 14, EOD, greedy, fixed_shape_steps=True)
    assert torch.equal(fixed.tokens, full.tokens)
    assert torch.allclose(fixed.log_probs, full.log_probs, atol=1e-5)
    # a stop token is kept, eod is dropped; prompt positions get log-probabilities too
    stop = int(full.tokens[1, 1])  # row 1 (prompt [5]) stops after its first token
    outs = [generate_tokens(model, context, lengths, 10, EOD, greedy, recompute=r,
                            stop_ids=[stop], prompt_log_probs=True) for r in (False, True)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].lengths, outs[1].lengths)
    assert int(outs[0].lengths[1]) == 2 and bool(outs[0].finished[1])
    assert torch.allclose(outs[0].log_probs, outs[1].log_probs, atol=1e-5)
    assert (outs[0].log_probs[2, 1:6] < 0).all()  # the prompt's tokens 1 .. 5
    # tokens_to_generate 0: scoring only, prompts untouched
    scored = generate_tokens(model, context, lengths, 0, EOD, greedy, prompt_log_probs=True)
    assert torch.equal(scored.lengths, lengths)
    in_prompt = torch.arange(20)[None, :] < lengths[:, None]  # [b, 20]
    assert torch.allclose(scored.log_probs, outs[1].log_probs * in_prompt, atol=1e-5)
    return cached


def test_static_cache_equals_recompute_llama(tiny_model):
    _check_static_cache_equals_recompute(tiny_model)
    _check_static_cache_equals_recompute(_tiny_llama())


def _check_llama_tensor_parallel(rank, world_size):
    from megatron import mpu

    mpu.initialize_model_parallel(world_size)
    parallel = _check_static_cache_equals_recompute(_tiny_llama())
    mpu.set_tensor_model_parallel_world_size(1)
    mpu.set_tensor_model_parallel_rank(0)
    try:
        serial = _generate(_tiny_llama(), PROMPTS, SamplingParams(greedy=True), new=14)
    finally:
        mpu.clear_model_parallel_overrides()
    assert torch.equal(parallel.tokens, serial.tokens)


def test_static_cache_tensor_parallel_llama():
    run_distributed(_check_llama_tensor_parallel, world_size=2, timeout=120)


# ----------------------------------------------------------------------------------------
# Prompt files and output layouts.
# ----------------------------------------------------------------------------------------


class _CharTokenizer:
    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ab\n\nxyz\n")
    assert read_prompts(str(path), _CharTokenizer(), 8) == [
        ("ab", [97, 98]),
        ("", [0]),
        ("xyz", [120, 121, 122]),
    ]
    path.write_text("ok\n" + "x" * 8 + "\n")
    with pytest.raises(ValueError, match=r"prompts.txt line 2: the prompt has 8 tokens"):
        read_prompts(str(path), _CharTokenizer(), 8)
    with pytest.raises(ValueError, match="--sample-input-file"):
        read_prompts(str(tmp_path / "missing.txt"), _CharTokenizer(), 8)
    path.write_bytes(b"fine\nal\xe9 in latin-1\n")
    with pytest.raises(ValueError, match=r"prompts.txt line 2: not UTF-8 text \(byte 0xe9"):
        read_prompts(str(path), _CharTokenizer(), 8)


def test_context_blocks_layout():
    out = io.StringIO()
    n = write_context_blocks([{"prompt": "Hi", "text": " there"}], out)
    assert n == 1 and out.getvalue() == "\nContext: Hi\n\nMegatron-LM:  there\n"


# ----------------------------------------------------------------------------------------
# tools/generate_samples_gpt.py on a checkpoint written by pretrain_gpt.py.
# ----------------------------------------------------------------------------------------

MODEL_FLAGS = [
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--seq-length",
    "--max-position-embeddings",
    "--micro-batch-size",
    "--vocab-file",
    "--merge-file",
    "--tokenizer-type",
    "--seed",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vocab_dir):
    """(folder, model flags): a tiny GPT trained 4 iterations, checkpoint in folder/ckpt."""
    work = tmp_path_factory.mktemp("generate")
    args = tiny_gpt_args(preprocess(str(work), vocab_dir), vocab_dir, train_iters=4)
    args[args.index("--eval-iters") + 1] = "1"
    run_pretrain(args + ["--save", str(work / "ckpt"), "--save-interval", "4"])
    flags = []
    for flag in MODEL_FLAGS:
        flags += [flag, args[args.index(flag) + 1]]
    flags[flags.index("--micro-batch-size") + 1] = "3"  # batches of 3 prompts / samples
    return work, flags + ["--load", str(work / "ckpt")]


def _generate_cli(flags, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "generate_samples_gpt.py"), *flags],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _json_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_unconditional_samples_to_genfile(trained):
    work, flags = trained
    genfile = work / "out" / "samples.json"
    _generate_cli(
        flags
        + [
            "--num-samples",
            "4",
            "--genfile",
            str(genfile),
            "--out-seq-length",
            "12",
            "--temperature",
            "1.0",
            "--top_p",
            "0.9",
        ]
    )
    samples = _json_lines(genfile)
    assert len(samples) == 4  # two batches: 3, then 1
    for sample in samples:
        assert set(sample) == {"text", "length", "finished"}
        assert isinstance(sample["text"], str) and isinstance(sample["finished"], bool)
        assert 0 <= sample["length"] <= 12
        assert sample["finished"] or sample["length"] == 12
    assert len({s["text"] for s in samples}) > 1  # sampled, not one repeated string


@pytest.mark.slow
def test_conditional_greedy_cache_equals_recompute(trained):
    work, flags = trained
    prompts = work / "prompts.txt"
    long_prompt = "The history of the Python programming language began in"
    prompts.write_text(f"Hello world\n{long_prompt}\n\nData\n", encoding="utf-8")
    outputs = {}
    for mode in ("cache", "recompute"):
        out = work / f"{mode}.jsonl"
        extra = ["--recompute"] if mode == "recompute" else []
        _generate_cli(
            flags
            + [
                "--sample-input-file",
                str(prompts),
                "--sample-output-file",
                str(out),
                "--greedy",
                "--out-seq-length",
                "8",
                *extra,
            ]
        )
        outputs[mode] = _json_lines(out)
    assert outputs["cache"] == outputs["recompute"]
    rows = outputs["cache"]
    assert [r["prompt"] for r in rows] == ["Hello world", long_prompt, "", "Data"]
    for row in rows:
        assert row["finished"] or row["length"] == 8


@pytest.mark.slow
def test_non_utf8_prompts_are_named_before_the_model_loads(trained):
    work, flags = trained
    prompts = work / "latin1.txt"
    prompts.write_bytes("Hello\nCaf\u00e9 au lait\n".encode("latin-1"))
    out = work / "latin1.jsonl"
    proc = _generate_cli(flags + ["--sample-input-file", str(prompts),
                                  "--sample-output-file", str(out)], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"tools/generate_samples_gpt.py: error: --sample-input-file {prompts} "
                    "line 2: not UTF-8 text (byte 0xe9 at offset 9); save the prompts as UTF-8")
    assert "loading checkpoint" not in proc.stdout and not out.exists()


def _generate_script():
    spec = importlib.util.spec_from_file_location(
        "generate_samples_gpt", os.path.join(ROOT, "tools", "generate_samples_gpt.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --num-samples N (with --genfile) or --sample-input-file FILE"),
        (["--num-samples", "2"], "--num-samples needs --genfile FILE"),
        (
            ["--num-samples", "2", "--genfile", "s.json", "--out-seq-length", "0"],
            "--out-seq-length must be >= 1, got 0",
        ),
        (
            ["--sample-input-file", "p.txt", "--pipeline-model-parallel-size", "2"],
            "--pipeline-model-parallel-size 2 is not supported for generation",
        ),
        (
            ["--sample-input-file", "p.txt", "--load", "/nonexistent/ckpt"],
            "--load /nonexistent/ckpt: no checkpoint there",
        ),
        (
            ["--sample-input-file", "p.txt", "--load", "CKPT", "--top_p", "2"],
            "--top_p must be in [0, 1], got 2.0",
        ),
    ],
)
def test_generation_flags_are_checked(argv, message, tmp_path):
    from megatron.arguments import build_parser

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")  # a checkpoint folder
    argv = [str(tmp_path) if a == "CKPT" else a for a in argv]
    script = _generate_script()
    args = build_parser(script.add_text_generate_args).parse_args(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", *argv]
    )
    with pytest.raises(SystemExit) as exc:
        script.check_generation_args(args)
    assert str(exc.value).startswith(f"tools/generate_samples_gpt.py: error: {message}")


@pytest.mark.slow
def test_generation_benchmark_runs_tiny_on_cpu():
    """tools/bench/bench_generate_gpu.py --tiny: a RESULT line and a table row for this
    project's loop and for transformers' generate(), every row run to its length."""
    pytest.importorskip("transformers")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench", "bench_generate_gpu.py"),
         "--tiny", "--batches", "1,2", "--new-tokens", "6", "--repeats", "1"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    assert [(r["impl"], r["batch"]) for r in rows] == [
        ("megatron", 1), ("megatron", 2), ("hf", 1), ("hf", 2)]
    for r in rows:
        assert r["new_tokens"] == 6 and r["tokens_per_s"] > 0 and r["device"] == "cpu"
        assert f"| {r['impl']} | {r['batch']} |" in proc.stdout
