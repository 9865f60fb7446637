"""Run pretrain_gpt.py like a user would, on a tiny GPT, and read its log lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from ..dist_utils import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CORPUS = os.path.join(ROOT, "tests", "data", "corpus_small.jsonl")

LOG_RE = re.compile(
    r"iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) \|.*?learning rate: ([0-9.E+-]+) \|"
    r" global batch size:\s+\d+ \|(?: lm loss: ([0-9.E+-]+|nan|inf) \|)? loss scale: ([0-9.E+-]+|inf) \|"
    r".*?number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+)"
)


def preprocess(tmp_dir: str, vocab_dir: str) -> str:
    """Preprocess the small test corpus with the real GPT-2 vocabulary; return the prefix."""
    prefix = os.path.join(tmp_dir, "my-gpt2")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
         "--input", CORPUS, "--output-prefix", prefix,
         "--vocab", os.path.join(vocab_dir, "gpt2-vocab.json"),
         "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
         "--dataset-impl", "mmap", "--tokenizer-type", "GPT2BPETokenizer", "--append-eod"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return prefix + "_text_document"


def small_vocab_dataset(tmp_dir: str, vocab_size: int = 100) -> str:
    """A random-token corpus for the NullTokenizer (fp16 on CPU is only fast with a small
    vocabulary); returns the data prefix."""
    import numpy as np

    from megatron.data.indexed_dataset import make_builder

    prefix = os.path.join(tmp_dir, "small_text_document")
    rng = np.random.default_rng(0)
    builder = make_builder(prefix + ".bin", "mmap", vocab_size=vocab_size)
    for _ in range(64):
        builder.add_item(rng.integers(0, vocab_size, size=int(rng.integers(20, 200))))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_gpt_args(data_path: str, vocab_dir: str, train_iters: int = 50) -> list[str]:
    """A tiny GPT (2 layers, hidden 64) that trains in a fraction of a second per step."""
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "0.001", "--min-lr", "0.0001", "--lr-decay-style", "cosine",
        "--lr-decay-iters", "50", "--lr-warmup-iters", "5", "--train-iters", str(train_iters),
        "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--vocab-file", os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type", "GPT2BPETokenizer",
        "--data-path", data_path, "--split", "949,50,1",
        "--log-interval", "1", "--eval-interval", "25", "--eval-iters", "2",
        "--num-workers", "0",
    ]


def run_pretrain(args: list[str], timeout: float = 300, check: bool = True,
                 extra_env: dict | None = None, script: list[str] | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_ADDR", None)
    env.update(extra_env or {})
    cmd = script or [sys.executable, os.path.join(ROOT, "pretrain_gpt.py")]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pretrain_gpt.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def parse_log(stdout: str) -> dict[int, dict]:
    """{iteration: {'loss', 'lr', 'consumed', 'scale', 'skipped', 'nan'}} from log lines."""
    rows = {}
    for m in LOG_RE.finditer(stdout):
        rows[int(m.group(1))] = {
            "consumed": int(m.group(3)),
            "lr": m.group(4),
            "loss": m.group(5),
            "scale": float(m.group(6)),
            "skipped": int(m.group(7)),
            "nan": int(m.group(8)),
        }
    return rows


# "| grad norm: G | moe loss: M |" of a MoE run's log line: (iteration, grad norm, moe loss)
MOE_RE = re.compile(r"iteration\s+(\d+)/.*?\| grad norm: ([0-9.]+) \|(?: params norm: [0-9.]+ \|)?"
                    r" moe loss: ([0-9.E+-]+) \|")


def rel_close(a: float, b: float, rel_tol: float) -> bool:
    """|a - b| <= rel_tol * |b|."""
    return abs(a - b) <= rel_tol * abs(b)


def pretrain_in_process(args_list: list[str], tokenizer_type: str) -> str:
    """Run pretrain_gpt.py's pretrain() in this (spawned, distributed) process after
    resetting Megatron's globals and model-parallel state; return what it printed."""
    import contextlib
    import io

    import torch

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron import deepspeed_engine, mpu
    from megatron.global_vars import reset_global_variables
    from megatron.training import pretrain

    reset_global_variables()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    deepspeed_engine._LOG_STATE.clear()
    torch.distributed.barrier()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pretrain(
            pretrain_gpt.train_valid_test_datasets_provider,
            pretrain_gpt.model_provider,
            pretrain_gpt.forward_step,
            args_defaults={"tokenizer_type": tokenizer_type},
            args_list=args_list,
        )
    return buf.getvalue()


def launch(
    nproc: int,
    args: list[str],
    launcher: str = "torchrun",
    script: str = "pretrain_gpt.py",
    timeout: float = 240,
) -> str:
    """Run `script` on nproc CPU ranks like a user; return stdout. The launcher and every
    rank run in a new session that is killed on timeout."""
    port = str(free_port())
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, script)]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--nnodes",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            script,
        ]
    else:  # python -m torch.distributed.launch: passes --local-rank to every rank
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.launch",
            "--nproc_per_node",
            str(nproc),
            "--nnodes",
            "1",
            "--node_rank",
            "0",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            script,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        cmd + args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{nproc}-rank run did not finish in {timeout}s (hang)\n"
            f"{out[-3000:]}\n{err[-3000:]}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:3])} exited {proc.returncode}\n--- stdout\n"
            f"{out[-4000:]}\n--- stderr\n{err[-6000:]}"
        )
    return out
