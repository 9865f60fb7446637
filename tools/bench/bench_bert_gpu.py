"""BERT pretraining throughput: pretrain_bert.py against transformers' BertForPreTraining.

    python tools/bench/bench_bert_gpu.py --data-path PREFIX --vocab-file VOCAB \
        [--impls megatron,hf] [--layers 24 --hidden 1024 --heads 16 --seq 512 --mbs 32]

* megatron  the real entry point, ``pretrain_bert.py``, on a corpus preprocessed with
            ``tools/preprocess_data.py --split-sentences`` (bf16, Megatron's optimizer);
            tokens/s is the mean of the log lines' "tokens per second" after the warm-up
            iterations, memory the "max allocated" of its memory report;
* hf        ``BertForPreTraining`` (sdpa attention, bf16 autocast, fused AdamW), masked-LM
            labels on 15% of the positions and the sentence-order label, random tokens of
            the same batch shape; timed over the same number of steps.

Both use dropout 0.1 as BERT does. Prints one JSON line per implementation and a markdown
table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run_megatron(a) -> dict:
    iters = a.warmup + a.iters
    log_interval = 5
    cmd = [
        sys.executable, os.path.join(ROOT, "pretrain_bert.py"),
        "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
        "--num-attention-heads", str(a.heads), "--seq-length", str(a.seq),
        "--max-position-embeddings", str(a.seq), "--micro-batch-size", str(a.mbs),
        "--global-batch-size", str(a.mbs), "--train-iters", str(iters),
        "--lr", "1e-4", "--lr-decay-style", "linear", "--min-lr", "1e-5",
        "--split", "949,50,1", "--data-path", a.data_path, "--vocab-file", a.vocab_file,
        "--tokenizer-type", "BertWordPieceLowerCase", "--log-interval", str(log_interval),
        "--eval-interval", str(10 * iters), "--eval-iters", "1", "--clip-grad", "1.0",
    ]
    if a.device == "cuda":
        cmd += ["--bf16"]
    cmd += a.megatron_flags.split()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-6000:], flush=True)
        raise SystemExit(f"pretrain_bert.py exited {proc.returncode}")
    rates = []
    for m in re.finditer(r"iteration\s+(\d+)/.*?tokens per second: ([\d.]+)", log):
        if int(m.group(1)) > a.warmup:
            rates.append(float(m.group(2)))
    mem = re.search(r"max allocated: ([\d.]+)", log)
    return {
        "impl": "megatron", "tokens_per_s": sum(rates) / max(len(rates), 1),
        "peak_gib": float(mem.group(1)) / 1024 if mem else float("nan"),
        "log_lines": len(rates), "wall_s": round(time.time() - start, 1),
    }


def run_hf(a) -> dict:
    import torch
    from transformers import BertConfig, BertForPreTraining

    device = torch.device(a.device)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30592, hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, intermediate_size=4 * a.hidden,
        max_position_embeddings=a.seq, attn_implementation="sdpa",
    )
    model = BertForPreTraining(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(1000, 30000, (a.mbs, a.seq), generator=g)
        labels = torch.where(torch.rand(a.mbs, a.seq, generator=g) < 0.15, ids, -100)
        order = torch.randint(0, 2, (a.mbs,), generator=g)
        types = (torch.arange(a.seq) >= a.seq // 2).long().expand(a.mbs, -1)
        batch = [t.to(device, non_blocking=True) for t in (ids, labels, order, types)]
        with autocast:
            out = model(input_ids=batch[0], token_type_ids=batch[3], labels=batch[1],
                        next_sentence_label=batch[2])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(a.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.time() - start) / a.iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"impl": "hf", "tokens_per_s": a.mbs * a.seq / sec, "peak_gib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--vocab-file", required=True)
    p.add_argument("--impls", default="megatron,hf")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mbs", type=int, default=32)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--megatron-flags", default="", help="extra pretrain_bert.py flags")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for impl in a.impls.split(","):
        row = run_megatron(a) if impl == "megatron" else run_hf(a)
        row["shape"] = f"l{a.layers} h{a.hidden} s{a.seq} mbs{a.mbs}"
        if impl == "megatron" and a.megatron_flags:
            row["flags"] = a.megatron_flags
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| impl | shape | tokens/s | peak GiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} {r.get('flags', '')} | {r['shape']} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
