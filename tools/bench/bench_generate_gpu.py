"""Greedy generation speed of this project's decoding loop beside transformers' generate().

    python tools/bench/bench_generate_gpu.py                 # GPT 345M shape, one GPU
    python tools/bench/bench_generate_gpu.py --tiny          # a tiny shape on CPU (a check)

Both models have the GPT-2 345M shape (24 layers, hidden 1024, 16 heads, vocabulary
50257, 1024 positions) and random weights, bf16 on CUDA (fp32 on CPU), and generate
--new-tokens tokens (default 512) after a random --prompt-len-token prompt (default 16)
at each batch size of --batches (default 1,8), in the same process one after the other:

* megatron        megatron.text_generation_utils.generate_tokens on GPTModel (flash
                  attention through scaled_dot_product_attention, the preallocated
                  key/value cache, decode steps as a CUDA graph), the path of
                  tools/generate_samples_gpt.py and the text generation server;
* megatron-eager  the same with the decode steps run eagerly (MEGATRON_CUDA_GRAPHS=0;
                  CUDA only, on CPU the megatron row is already eager);
* hf              transformers' GPT2LMHeadModel.generate(), sdpa attention, use_cache,
                  greedy, exactly --new-tokens tokens.

No row stops early (no end-of-document token can end a row). Each figure is the best of
--repeats timed runs after one warm-up run; tokens/s counts new tokens of all rows. Prints
one RESULT JSON line per run and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SHAPES = {
    "345M": dict(layers=24, hidden=1024, heads=16, positions=1024, vocab=50257),
    "tiny": dict(layers=2, hidden=64, heads=4, positions=128, vocab=50257),
}


def _device() -> torch.device:
    from megatron.accelerator import current_device

    return torch.device(current_device())


def _sync() -> None:
    from megatron.accelerator import synchronize

    synchronize()


def _timed(run, repeats: int) -> float:
    run()  # warm-up (and, for megatron, the first CUDA graph capture)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        run()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def build_megatron(shape: dict, dtype: torch.dtype):
    from megatron import get_args
    from megatron.initialize import initialize_megatron
    from megatron.model import GPTModel
    from megatron.model.config import config_from_args

    flags = [
        "--num-layers", str(shape["layers"]), "--hidden-size", str(shape["hidden"]),
        "--num-attention-heads", str(shape["heads"]),
        "--seq-length", str(shape["positions"]),
        "--max-position-embeddings", str(shape["positions"]),
        "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(shape["vocab"]), "--hidden-dropout", "0",
        "--attention-dropout", "0", "--seed", "1234",
    ]  # fmt: skip
    if dtype == torch.bfloat16:
        flags += ["--bf16", "--use-flash-attn"]
    initialize_megatron(args_list=flags)
    model = GPTModel(config_from_args(get_args()), parallel_output=False)
    return model.to(_device(), dtype=dtype).eval()


def run_megatron(model, prompts: torch.Tensor, new_tokens: int, vocab: int, repeats: int,
                 cuda_graphs: bool) -> float:
    from megatron.text_generation_utils import SamplingParams, generate_tokens

    b, p = prompts.shape
    context = torch.zeros((b, p + new_tokens), dtype=torch.long, device=prompts.device)
    context[:, :p] = prompts
    lengths = torch.full((b,), p, dtype=torch.long, device=prompts.device)
    greedy = SamplingParams(greedy=True)

    def run():
        out = generate_tokens(model, context, lengths, new_tokens, eod=-1, params=greedy,
                              vocab_size=vocab, return_log_probs=False,
                              cuda_graphs=cuda_graphs)
        assert int(out.lengths.min()) == p + new_tokens

    return _timed(run, repeats)


def build_hf(shape: dict, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=shape["vocab"], n_positions=shape["positions"], n_embd=shape["hidden"],
        n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(_device(), dtype=dtype).eval()


def run_hf(model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    mask = torch.ones_like(prompts)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                pad_token_id=0, eos_token_id=None,
            )
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return _timed(run, repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="A 2-layer hidden-64 shape (CPU check).")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=None, help="Default 512 (--tiny: 32).")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--impls", default="megatron,megatron-eager,hf")
    a = p.parse_args(argv)
    shape = SHAPES["tiny" if a.tiny else "345M"]
    new_tokens = a.new_tokens or (32 if a.tiny else 512)
    if a.prompt_len + new_tokens > shape["positions"]:
        sys.exit(f"--prompt-len + --new-tokens must be <= {shape['positions']} positions")
    impls = a.impls.split(",")
    for impl in impls:
        if impl not in ("megatron", "megatron-eager", "hf"):
            sys.exit(f"--impls: unknown implementation {impl!r}")
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    batches = [int(x) for x in a.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, shape["vocab"], (b, a.prompt_len), generator=g).to(device)
               for b in batches}
    rows = []

    def record(impl, b, sec):
        row = {"impl": impl, "batch": b, "new_tokens": new_tokens, "prompt_len": a.prompt_len,
               "seconds": round(sec, 4), "tokens_per_s": round(b * new_tokens / sec, 1),
               "device": gpu, "dtype": str(dtype).replace("torch.", ""),
               "shape": "tiny" if a.tiny else "345M"}  # fmt: skip
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)

    if any(i.startswith("megatron") for i in impls):
        model = build_megatron(shape, dtype)
        for b in batches:
            for impl in ("megatron", "megatron-eager"):
                # on CPU there is no graph: "megatron" already runs eagerly
                if impl in impls and (impl == "megatron" or device.type == "cuda"):
                    graphs = impl == "megatron" and device.type == "cuda"
                    record(impl, b, run_megatron(model, prompts[b], new_tokens, shape["vocab"],
                                                 a.repeats, graphs))
        del model
    if "hf" in impls:
        model = build_hf(shape, dtype)
        for b in batches:
            record("hf", b, run_hf(model, prompts[b], new_tokens, a.repeats))
    print(f"\n{gpu}, {rows[0]['shape']} shape, {rows[0]['dtype']}, prompt {a.prompt_len}, "
          f"{new_tokens} new tokens, greedy\n")
    print("| implementation | batch | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
