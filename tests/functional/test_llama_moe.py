"""pretrain_gpt.py --deepspeed with a tiny LLaMA (the LLAMA_FLAGS of
test_llama_training.py: RoPE, SwiGLU, RMSNorm, grouped-query attention, untied output,
no linear biases) whose second layer is a MoE layer of 2 SwiGLU experts (top-1, no token
dropped, --moe-loss-coeff 0.01), fp32, dropout 0, NullTokenizer with 128 ids.

One rank (ZeRO-1) trains and saves; two ranks in one spawned world run
  * expert parallelism 2 (one expert per rank, DP=2, tokens exchanged by all-to-all)
    under ZeRO-2, and
  * TP=2 with --sequence-parallel and --tp-comm-overlap (experts split column / row-wise,
    the fused gate/up weight with stride 2; the MoE layer routes the gathered sequence),
and must give the one-rank run's LM and moe losses within a relative 2e-6 (7 printed
digits; measured: identical or 1 in the last digit) and its printed grad norms, as
tests/functional/test_moe_tensor_parallel.py asks of a GPT. --use-cpu-initialization gives
the TP=2 shards the TP=1 weights, --make-vocab-size-divisible-by 128 / TP the same padded
vocabulary. The in-process check of the expert against a SwiGLU formula is
tests/unit/model/test_llama_moe.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..dist_utils import run_distributed
from .gpt_runs import (
    MOE_RE,
    parse_log,
    pretrain_in_process,
    rel_close,
    run_pretrain,
    small_vocab_dataset,
    tiny_gpt_args,
)
from .test_llama_training import LLAMA_FLAGS

pytestmark = pytest.mark.slow

ITERS = 10
REL_TOL = 2e-6
PARALLEL_RUNS = {  # name: (TP, ZeRO stage, flags)
    "EP=2 x ZeRO-2": (1, 2, ["--moe-expert-parallel-size", "2"]),
    "TP=2 sequence parallel": (2, 1, ["--sequence-parallel", "--tp-comm-overlap"]),
}


def _args(data: str, tp: int = 1, zero_stage: int = 1, extra: list[str] | None = None):
    """The tiny MoE LLaMA at tensor-parallel size `tp`."""
    args = tiny_gpt_args(data, "", ITERS)
    for flag in ("--vocab-file", "--merge-file", "--hidden-dropout", "--attention-dropout",
                 "--eval-iters"):  # fmt: skip
        i = args.index(flag)
        del args[i : i + 2]
    return args + LLAMA_FLAGS + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--make-vocab-size-divisible-by", str(128 // tp), "--use-cpu-initialization",
        "--tensor-model-parallel-size", str(tp), "--deepspeed", "--zero-stage", str(zero_stage),
        "--num-experts", "2", "--expert-interval", "2", "--topk", "1",
        "--moe-loss-coeff", "0.01", "--disable-moe-token-dropping"] + (extra or [])  # fmt: skip


def _world(rank: int, world_size: int, data: str) -> dict:
    """Every two-rank run in one world; {name: stdout}."""
    logs = {}
    for name, (tp, zero_stage, extra) in PARALLEL_RUNS.items():
        logs[name] = pretrain_in_process(_args(data, tp, zero_stage, extra), "NullTokenizer")
        torch.distributed.barrier()
    return logs


def _rows(stdout: str) -> dict[int, tuple[float, float, str]]:
    """{iteration: (lm loss, moe loss, grad norm as printed)}."""
    rows = parse_log(stdout)
    moe = {int(m.group(1)): (float(m.group(3)), m.group(2)) for m in MOE_RE.finditer(stdout)}
    iters = list(range(1, ITERS + 1))
    assert sorted(rows) == iters and sorted(moe) == iters, stdout[-3000:]
    return {i: (float(rows[i]["loss"]),) + moe[i] for i in iters}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("llama_moe")
    data = small_vocab_dataset(str(tmp))
    save = str(tmp / "ckpt")
    serial = run_pretrain(_args(data) + ["--save", save, "--save-interval", str(ITERS)],
                          timeout=180).stdout  # fmt: skip
    parallel = run_distributed(_world, 2, args=(data,), timeout=300)
    return {"serial": serial, "save": save, **parallel[1]}


def test_llama_moe_trains_and_saves_swiglu_experts(runs):
    """The loss falls, the moe loss is coeff 0.01 x l_aux (in [1, 2]) every iteration, and
    the DeepSpeed expert files hold SwiGLU experts: dense_h_to_4h [2 ffn, h] (gate rows,
    then up rows), dense_4h_to_h [h, ffn], no bias."""
    rows = _rows(runs["serial"])
    losses = [rows[i][0] for i in range(1, ITERS + 1)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert all(0.0099 < rows[i][1] < 0.021 for i in rows), rows
    step = os.path.join(runs["save"], f"global_step{ITERS}")
    prefix = "language_model.transformer.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts"
    for e in (0, 1):
        path = os.path.join(step, f"layer_0_expert_{e}_mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            f"{prefix}.{e}.dense_h_to_4h.weight": (256, 64),
            f"{prefix}.{e}.dense_4h_to_h.weight": (64, 128),
        }


@pytest.mark.parametrize("name", list(PARALLEL_RUNS))
def test_llama_moe_parallel_equals_one_rank(runs, name):
    """Per iteration: LM loss and moe loss within REL_TOL and the same printed grad norm
    (4 digits; the expert shards and the sequence-parallel norm gradients are counted
    once each, so clipping is the same)."""
    want, got = _rows(runs["serial"]), _rows(runs[name])
    for i in want:
        assert rel_close(got[i][0], want[i][0], REL_TOL), f"{name} lm loss, iteration {i}"
        assert rel_close(got[i][1], want[i][1], REL_TOL), f"{name} moe loss, iteration {i}"
        assert got[i][2] == want[i][2], f"{name} grad norm, iteration {i}: {got} vs {want}"
