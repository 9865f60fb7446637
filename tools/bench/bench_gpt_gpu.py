"""Training-step throughput of pretrain_gpt.py's model against two peers, same shapes.

    python tools/bench/bench_gpt_gpu.py --shape 1.3B --impls megatron,hf,compact,compact-compiled

Each implementation runs in its own process (a clean device and allocator), for the same
shape, batch and precision (bf16, flash attention, dropout 0, AdamW):

* megatron          GPTModel + Megatron's bf16 optimizer (fp32 master weights) through
                    megatron.training.train_step, the code path of pretrain_gpt.py;
* hf                transformers' GPT2LMHeadModel (LlamaForCausalLM for the llama shapes),
                    sdpa attention, bf16 autocast, fused AdamW;
* compact           a plain-torch GPT or LLaMA (below), bf16 autocast, fused AdamW, eager;
* compact-compiled  the same under torch.compile.

Prints one JSON line per implementation (tokens/s, TFLOP/s per GPU with the formula of the
log line, megatron.utils.num_floating_point_operations, peak memory) and a markdown table at
the end. The llama shapes run megatron with the LLaMA options (RoPE, SwiGLU, RMSNorm,
grouped-query attention, no linear biases).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

# environment variables that change the measured figure, recorded with each result
ENV_RECORDED = (
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "NCCL_NVLS_ENABLE",
    "NCCL_PROTO",
    "NCCL_MIN_NCHANNELS",
    "NCCL_MAX_NCHANNELS",
    "CUDA_VISIBLE_DEVICES",
)

@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    seq: int
    mbs: int
    vocab: int
    kv_heads: int | None = None  # set: a LLaMA-style model
    ffn: int | None = None
    rope_theta: float = 10000.0

    @property
    def llama(self) -> bool:
        return self.kv_heads is not None

    def flops(self, batch: int) -> float:
        """Model FLOPs of one step (forward + backward) for `batch` sequences."""
        from megatron.utils import num_floating_point_operations

        return num_floating_point_operations(
            batch, self.seq, self.layers, self.hidden, self.vocab,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            ffn_hidden_size=self.ffn, swiglu=self.llama,
        )

    def megatron_flags(self) -> list:
        flags = {
            "--num-layers": self.layers, "--hidden-size": self.hidden,
            "--num-attention-heads": self.heads, "--seq-length": self.seq,
            "--max-position-embeddings": self.seq, "--micro-batch-size": self.mbs,
            "--global-batch-size": self.mbs,
            # NullTokenizer adds one id (eod): the model's vocabulary is then exactly `vocab`
            "--vocab-size": self.vocab - 1,
        }
        out = [str(x) for kv in flags.items() for x in kv]
        if self.llama:
            out += [
                "--num-key-value-heads", str(self.kv_heads), "--ffn-hidden-size", str(self.ffn),
                "--use-rotary-position-embeddings", "--no-position-embedding",
                "--rotary-position-embeddings-theta", str(int(self.rope_theta)), "--swiglu",
                "--normalization", "rmsnorm", "--layernorm-epsilon", "1e-5",
                "--disable-bias-linear",
            ]
        return out


SHAPES = {
    "1.3B": Shape(24, 2048, 16, 2048, 8, 51200),
    "2.7B": Shape(32, 2560, 32, 2048, 8, 51200),
    "6.7B": Shape(32, 4096, 32, 2048, 8, 51200),
    "13B": Shape(40, 5120, 40, 2048, 8, 51200),
    "125M": Shape(12, 768, 12, 1024, 16, 51200),
    "tiny": Shape(2, 64, 4, 64, 2, 512),
    # LLaMA-3.2-1B: tied embeddings, 8 key/value heads, rope theta 500000
    "llama-1b": Shape(16, 2048, 32, 2048, 4, 128256, kv_heads=8, ffn=8192, rope_theta=500000.0),
    "llama-tiny": Shape(2, 64, 4, 64, 2, 512, kv_heads=2, ffn=128),
}


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return float("nan")


def _time_steps(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync()
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------- megatron
def run_megatron(shape, warmup, iters, extra_flags=()):
    import torch

    sh = SHAPES[shape]
    seq, vocab = sh.seq, sh.vocab
    from megatron import get_args, global_vars
    from megatron.initialize import initialize_megatron
    from megatron.training import setup_model_and_optimizer, train_step
    from megatron.utils import unwrap_model

    flags = sh.megatron_flags() + [
        "--lr", "1e-4", "--train-iters", "1000", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--clip-grad", "1.0", "--tokenizer-type", "NullTokenizer",
        "--make-vocab-size-divisible-by", "128",
    ]
    if _device().type == "cuda":
        flags += ["--bf16", "--use-flash-attn"]
    flags += list(extra_flags)
    initialize_megatron(args_list=flags)
    args = get_args()
    args.iteration = 0
    import pretrain_gpt

    # the same set-up as pretrain(): Megatron's optimizer, or the DeepSpeed engine
    model, optimizer, scheduler = setup_model_and_optimizer(pretrain_gpt.model_provider)

    rows = args.micro_batch_size  # --megatron-flags may override the shape's

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield {"text": torch.randint(0, vocab - 1, (rows, seq + 1), generator=g)}

    it = batches()
    assert global_vars.get_tokenizer() is not None

    def step():
        train_step(pretrain_gpt.forward_step, it, model, optimizer, scheduler)

    sec = _time_steps(step, warmup, iters)
    if os.environ.get("BENCH_PROFILE"):  # every rank profiles (the steps communicate)
        rank = os.environ.get("RANK")
        suffix = f".rank{rank}" if rank is not None else ""
        _profile(step, os.environ["BENCH_PROFILE"] + suffix)
    # ZeRO-3 partitions parameters: ds_numel is the full size
    params = sum(getattr(p, "ds_numel", p.numel()) for p in unwrap_model(model)[0].parameters())
    return sec, params, args.global_batch_size, args.world_size


def _profile(step, out_file: str, steps: int = 3) -> None:
    """Profile `steps` steps: per-step device time by kernel kind (GEMM, attention, NCCL,
    other), the NCCL time no compute kernel overlaps, and the top kernels, to out_file."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(out_file, "w") as f:
        if torch.cuda.is_available():
            f.write(_kernel_breakdown(prof.events(), steps) + "\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))


def _kernel_kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    if any(k in low for k in ("flash", "sdpa", "fmha", "attention")):
        return "attention"
    return "other"


def _union(intervals):
    """Merge [start, end) intervals into a sorted disjoint list."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _kernel_breakdown(events, steps: int) -> str:
    from torch.autograd import DeviceType

    totals, comm, compute = {}, [], []
    for evt in events:
        if evt.device_type != DeviceType.CUDA:
            continue
        kind = _kernel_kind(evt.name)
        start, end = evt.time_range.start, evt.time_range.end
        totals[kind] = totals.get(kind, 0.0) + (end - start)
        (comm if kind == "nccl" else compute).append((start, end))
    compute_u = _union(compute)
    exposed = 0.0
    for start, end in _union(comm):
        covered = sum(
            max(0.0, min(end, c_end) - max(start, c_start)) for c_start, c_end in compute_u
        )
        exposed += (end - start) - covered
    busy = sum(end - start for start, end in _union(compute + comm))
    lines = [f"per step (ms), {steps} profiled steps, device kernels only:"]
    for kind in ("gemm", "attention", "other", "nccl"):
        lines.append(f"  {kind:<10} {totals.get(kind, 0.0) / steps / 1000:9.2f}")
    lines.append(f"  nccl not overlapped by compute kernels {exposed / steps / 1000:9.2f}")
    lines.append(f"  device busy (union of all kernels)     {busy / steps / 1000:9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compact GPT
def build_compact(layers, hidden, heads, seq, vocab):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(hidden)
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            self.ln2 = nn.LayerNorm(hidden)
            self.fc = nn.Linear(hidden, 4 * hidden)
            self.out = nn.Linear(4 * hidden, hidden)

        def forward(self, x):  # x: (B, T, C)
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(hidden, dim=2)
            q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class CompactGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, hidden)
            self.wpe = nn.Embedding(seq, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(hidden)

        def forward(self, idx, targets):
            pos = torch.arange(idx.size(1), device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.float().view(-1, vocab), targets.reshape(-1))

    return CompactGPT()


def build_compact_llama(sh: Shape):
    """A plain-torch LLaMA: RMSNorm, fused QKV with grouped-query attention, rotate-half
    RoPE, SwiGLU, no biases, tied embeddings."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    hidden, heads, kv = sh.hidden, sh.heads, sh.kv_heads
    d = hidden // heads

    def rope(x, cos, sin):  # x: (B, nh, T, d)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = nn.RMSNorm(hidden, eps=1e-5)
            self.qkv = nn.Linear(hidden, (heads + 2 * kv) * d, bias=False)
            self.proj = nn.Linear(hidden, hidden, bias=False)
            self.n2 = nn.RMSNorm(hidden, eps=1e-5)
            self.gate_up = nn.Linear(hidden, 2 * sh.ffn, bias=False)
            self.down = nn.Linear(sh.ffn, hidden, bias=False)

        def forward(self, x, cos, sin):
            B, T, C = x.shape
            q, k, v = self.qkv(self.n1(x)).split([heads * d, kv * d, kv * d], dim=2)
            q = rope(q.view(B, T, heads, d).transpose(1, 2), cos, sin)
            k = rope(k.view(B, T, kv, d).transpose(1, 2), cos, sin)
            v = v.view(B, T, kv, d).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
            gate, up = self.gate_up(self.n2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    class CompactLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(sh.vocab, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(sh.layers))
            self.norm = nn.RMSNorm(hidden, eps=1e-5)
            inv = 1.0 / (sh.rope_theta ** (torch.arange(0, d, 2).float() / d))
            freqs = torch.outer(torch.arange(sh.seq).float(), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

        def forward(self, idx, targets):
            T = idx.size(1)
            x = self.wte(idx)
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
            for block in self.blocks:
                x = block(x, cos, sin)
            logits = self.norm(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.float().view(-1, sh.vocab), targets.reshape(-1))

    return CompactLlama()


def build_hf(sh: Shape):
    if sh.llama:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=sh.vocab, hidden_size=sh.hidden, intermediate_size=sh.ffn,
            num_hidden_layers=sh.layers, num_attention_heads=sh.heads,
            num_key_value_heads=sh.kv_heads, max_position_embeddings=sh.seq,
            rope_theta=sh.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=True,
            attention_dropout=0.0, attn_implementation="sdpa",
        )
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=sh.vocab, n_positions=sh.seq, n_embd=sh.hidden, n_layer=sh.layers,
        n_head=sh.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg)


def run_peer(impl, shape, warmup, iters):
    import torch

    sh = SHAPES[shape]
    seq, mbs, vocab = sh.seq, sh.mbs, sh.vocab
    device = _device()
    torch.manual_seed(0)
    if impl == "hf":
        model = build_hf(sh).to(device)
        print(f"hf attention: {model.config._attn_implementation}", flush=True)

        def loss_fn(x, y):
            return model(input_ids=x, labels=y).loss
    else:
        if sh.llama:
            model = build_compact_llama(sh).to(device)
        else:
            model = build_compact(sh.layers, sh.hidden, sh.heads, seq, vocab).to(device)
        fwd = torch.compile(model) if impl == "compact-compiled" else model

        def loss_fn(x, y):
            return fwd(x, y)

    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda"
    )
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        tokens = torch.randint(0, vocab - 1, (mbs, seq + 1), generator=g).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if impl == "hf":
            y = tokens[:, :-1]  # GPT2LMHeadModel shifts the labels itself
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _time_steps(step, warmup, iters)
    return sec, sum(p.numel() for p in model.parameters()), mbs, 1


def run_matmul():
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    _sync()
    return 2 * n**3 / ((time.perf_counter() - t0) / 20) / 1e12


def child(impl, shape, warmup, iters, extra):
    sh = SHAPES[shape]
    if impl == "matmul":
        print("RESULT " + json.dumps({"impl": "matmul", "tflops": run_matmul()}), flush=True)
        return
    if impl.startswith("megatron"):
        sec, params, batch, world = run_megatron(shape, warmup, iters, extra)
    else:
        sec, params, batch, world = run_peer(impl, shape, warmup, iters)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tokens = batch * sh.seq / sec / world
    tflops = sh.flops(batch) / sec / world / 1e12
    result = {
        "impl": impl, "shape": shape, "flags": " ".join(extra), "gpus": world,
        "params_rank0": params, "global_batch": batch, "step_ms": sec * 1000,
        "tokens_per_s_per_gpu": tokens, "tflops_per_gpu": tflops,
        "peak_mem_gib_rank0": _peak_gib(),
        "host_peak_rss_gib_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
    }
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.3B", choices=sorted(SHAPES))
    p.add_argument("--impls", default="matmul,megatron,hf,compact,compact-compiled")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--megatron-flags", default="", help="extra pretrain_gpt.py flags")
    p.add_argument("--nproc", type=int, default=1,
                   help="GPUs for the megatron runs (launched with torchrun)")
    p.add_argument("--json", help="append the results to this JSON-lines file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    extra = a.megatron_flags.split()
    if a.child:
        child(a.child, a.shape, a.warmup, a.iters, extra)
        return
    results = []
    for impl in a.impls.split(","):
        launcher = [sys.executable]
        if a.nproc > 1 and impl.startswith("megatron"):
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(a.nproc)]
        cmd = launcher + [__file__, "--child", impl, "--shape", a.shape, "--warmup",
                          str(a.warmup), "--iters", str(a.iters),
                          f"--megatron-flags={a.megatron_flags}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{impl}: failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n"
                  f"{proc.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print("\n| impl | shape | GPUs | flags | tokens/s per GPU | TFLOP/s per GPU | step (ms) "
          "| peak memory rank 0 (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["impl"] == "matmul":
            print(f"| bf16 matmul 8192³ | - | 1 | - | - | {r['tflops']:.0f} | - | - |")
            continue
        mem = r["peak_mem_gib_rank0"]
        print(f"| {r['impl']} | {r['shape']} | {r['gpus']} | {r['flags'] or '-'} | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {r['tflops_per_gpu']:.1f} | "
              f"{r['step_ms']:.1f} | {'-' if math.isnan(mem) else f'{mem:.1f}'} |")


if __name__ == "__main__":
    main()
