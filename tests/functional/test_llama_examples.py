"""The LLaMA example scripts run as a user runs them, on CPU ranks with tiny shapes set
through their environment variables.

examples/pretrain_llama2_distributed.sh (Megatron-DeepSpeed's llama2 flags: TP=2, PP=2 on
DeepSpeed's pipeline engine, GQA, SentencePiece, bf16) trains on 4 ranks, saves, and resumed
from its first checkpoint repeats the same losses; examples/pretrain_llama_1b.sh passes the
LLaMA-3.2-1B shape by default and trains on --mock-data.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from megatron.arguments import build_parser

from ..unit.tokenizer.test_gpt_sentencepiece import corpus_texts, train_sentencepiece
from .gpt_runs import CORPUS, ROOT, free_port, parse_log

pytestmark = pytest.mark.slow
pytest.importorskip("sentencepiece")

LLAMA2 = os.path.join(ROOT, "examples", "pretrain_llama2_distributed.sh")
LLAMA_1B = os.path.join(ROOT, "examples", "pretrain_llama_1b.sh")
TINY = {
    "HIDDEN_SIZE": "64", "FFN_HIDDEN_SIZE": "128", "NUM_LAYERS": "2", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "SEQ_LENGTH": "64", "MICRO_BATCH_SIZE": "2",
    "GLOBAL_BATCH_SIZE": "4",
}  # fmt: skip


def _run(script: str, env: dict, args=(), timeout: float = 300) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(key, None)
    full.update(env)
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                          env=full, cwd=env.get("BASE_PATH", ROOT), timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-4000:]}" \
        f"\n{proc.stderr[-4000:]}"
    return proc


def _losses(stdout: str) -> dict[int, float]:
    return {it: float(row["loss"]) for it, row in parse_log(stdout).items()}


def test_llama2_script_trains_saves_and_resumes_exactly(tmp_path):
    tokenizer = train_sentencepiece(corpus_texts(), str(tmp_path / "tokenizer"))
    prefix = str(tmp_path / "llama")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", CORPUS,
         "--output-prefix", prefix, "--dataset-impl", "mmap", "--tokenizer-type",
         "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer, "--append-eod"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    ckpt = tmp_path / "ckpt"
    env = dict(
        TINY, BASE_PATH=str(tmp_path), DATASET_1=prefix + "_text_document",
        TOKENIZER_PATH=tokenizer, CHECKPOINT_PATH=str(ckpt), GPUS_PER_NODE="4",
        TRAIN_STEPS="6", LR_WARMUP_STEPS="2", SAVE_INTERVAL="3", EVAL_INTERVAL="3",
        EVAL_ITERS="1", MASTER_ADDR="127.0.0.1",
    )
    first = _run(LLAMA2, dict(env, MASTER_PORT=str(free_port()))).stdout
    losses = _losses(first)
    assert sorted(losses) == list(range(1, 7)), first[-3000:]
    # the script's flags took effect: SentencePiece, GQA, DeepSpeed's pipeline engine, bf16
    for line in ("tokenizer_type .................................. GPTSentencePieceTokenizer",
                 "num_key_value_heads ............................. 2",
                 "ds_pipeline_enabled ............................. True",
                 "bf16 ............................................ True"):
        assert line in first, line
    step3 = ckpt / "global_step3"
    assert (step3 / "layer_03-model_01-model_states.pt").is_file()  # PP stage 1, TP rank 1
    assert sorted(p.name for p in step3.glob("mp_rank_*_model_states.pt")) == [
        f"mp_rank_{r:02d}_model_states.pt" for r in range(4)
    ]
    # resumed from iteration 3, iterations 4-6 repeat the first run's losses
    again = _run(LLAMA2, dict(env, MASTER_PORT=str(free_port())),
                 args=("--load-tag", "global_step3")).stdout
    resumed = _losses(again)
    assert sorted(resumed) == [4, 5, 6], again[-3000:]
    for it in (4, 5, 6):
        assert resumed[it] == losses[it], (it, resumed[it], losses[it])


def _script_flags(script: str, env: dict, tmp_path) -> list[str]:
    """The flags the script passes to pretrain_gpt.py (a `python` on PATH records them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    fake.chmod(0o755)
    _run(script, dict(env, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    argv = record.read_text().splitlines()
    assert argv[0].endswith("pretrain_gpt.py"), argv
    return argv[1:]


def test_llama_1b_script_is_the_llama_3_2_1b_shape_and_trains(tmp_path):
    args = build_parser().parse_args(_script_flags(LLAMA_1B, {}, tmp_path))
    shape = (args.num_layers, args.hidden_size, args.num_attention_heads,
             args.num_key_value_heads, args.ffn_hidden_size, args.seq_length)
    assert shape == (16, 2048, 32, 8, 8192, 2048)
    assert args.vocab_size + 1 == 128256 and args.tokenizer_type == "NullTokenizer"
    assert args.mock_data and args.bf16 and args.use_flash_attn and args.swiglu
    assert args.normalization == "rmsnorm" and args.rope_theta == 500000
    assert not args.add_bias_linear and not args.add_position_embedding
    assert not args.untie_embeddings_and_output_weights  # LLaMA-3.2-1B ties them
    env = dict(TINY, VOCAB_SIZE="512", TRAIN_ITERS="5", LR_WARMUP_ITERS="1", LOG_INTERVAL="1",
               CHECKPOINT_PATH=str(tmp_path / "ckpt"), PRECISION_ARGS="")
    out = _run(LLAMA_1B, env).stdout
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5], out[-3000:]
    assert (tmp_path / "ckpt" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt").is_file()
