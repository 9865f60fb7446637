"""Predicted step time of a layout: GEMMs at a per-shape efficiency, attention, the
memory-bound rest, TP / DP / PP / expert communication and the pipeline bubble.

One micro-batch of b sequences through one stage of L/p layers costs, on one GPU,

    t_mb = sum over the stage's GEMMs of 2 m n k / (peak * eff(m, n, k)) * (3, or 4 with
           full recompute: forward, two backward GEMMs, the recomputed forward)
         + attention 4 b s^2 a d / t per layer at the attention efficiency (same factors)
         + memory-bound work (norms, activations, dropout, softmax, dtype copies):
           elementwise_passes (5) x the layer's 16-bit activation bytes / HBM bandwidth
         + TP: 4 all-reduces (6 with full recompute) of s b h per layer, each
           2 (t - 1)/t x bytes / NVLink bandwidth (all-gather + reduce-scatter with
           sequence parallelism move the same bytes)

and the step is (m + (p - 1)/v) t_mb (1F1B; the bubble is (p - 1)/(v m) of the work),
plus PP p2p 2 v (m + p - 1) messages of s b h/t 16-bit values (scatter-gather over TP),
plus the DP gradient all-reduce (reduce-scatter + all-gather) 2 (d - 1)/d x gradient
bytes / bandwidth once a step (ZeRO-2/3 reduce every micro-batch, overlapped with the
backward, and ZeRO-3 also all-gathers the weights forward and backward each micro-batch),
plus the optimizer step (memory-bound, 30 bytes a local parameter).
A group stays on NVLink when it fits in a node (Megatron's rank order: TP fastest, then
DP, then PP), else it runs at the network bandwidth per GPU.

The default efficiency of a GEMM [m, k] x [k, n] is E_MAX x prod over m, n, k of
x / (x + 64): large GEMMs reach E_MAX, thin ones (a small n = 3h/t or k = f/t at large
t) lose. `--measured FILE` replaces it by the nearest measured shape (log distance).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from .memory import layer_activation_bytes
from .model import ModelShape

GEMM_HALF = 64.0  # the dimension at which a GEMM reaches half of E_MAX along it


@dataclass(frozen=True)
class Hardware:
    """One GPU model and its links; every figure can come from --measured."""

    name: str
    peak_tflops: float
    """Dense 16-bit tensor-core peak, TFLOP/s."""
    memory_gib: float
    """Memory per GPU."""
    hbm_gbps: float
    """HBM bandwidth, GB/s."""
    nvlink_gbps: float
    """All-reduce bus bandwidth inside a node, GB/s."""
    network_gbps: float
    """Bandwidth per GPU between nodes, GB/s."""
    e_max: float
    """GEMM efficiency of large shapes (fraction of peak)."""
    attention_eff: float = 0.40
    """Attention efficiency (flash attention, fraction of peak)."""
    gemms: tuple = field(default=(), compare=False)
    """Measured GEMMs: ((m, n, k, tflops), ...)."""
    latency_us: float = 10.0
    """Per-collective latency."""
    elementwise_passes: float = 5.0
    """Memory-bound traffic per step, in multiples of a layer's 16-bit activations."""


# Datasheet peaks; bandwidths are achieved all-reduce bus bandwidths (nccl-tests) and
# one 200 Gb/s (A100) or 400 Gb/s (H100/H200) NIC per GPU.
PRESETS = {
    "a100-80gb": Hardware("a100-80gb", 312.0, 80.0, 2039.0, 230.0, 23.0, 0.80, 0.45),
    "h100": Hardware("h100", 989.0, 79.6, 3350.0, 360.0, 46.0, 0.72, 0.40),
    "h200": Hardware("h200", 989.0, 139.8, 4800.0, 360.0, 46.0, 0.72, 0.40),
}


def load_measured(hw: Hardware, path: str) -> Hardware:
    """`hw` with the figures of the JSON file `path` (every key optional):

        {"peak_tflops": 989, "hbm_GBps": 4000, "nvlink_GBps": 350, "network_GBps": 45,
         "attention_tflops": 400, "memory_gib": 139.8, "elementwise_passes": 5,
         "gemm": [{"m": 16384, "n": 6144, "k": 2048, "tflops": 610.0}, ...]}
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--measured {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--measured {path}: expected a JSON object")
    keys = {"peak_tflops": "peak_tflops", "hbm_GBps": "hbm_gbps", "nvlink_GBps": "nvlink_gbps",
            "network_GBps": "network_gbps", "memory_gib": "memory_gib",
            "elementwise_passes": "elementwise_passes"}
    changes = {}
    for key, attr in keys.items():
        if key in data:
            changes[attr] = _positive(data[key], f"--measured {path}: {key}")
    peak = changes.get("peak_tflops", hw.peak_tflops)
    if "attention_tflops" in data:
        tf = _positive(data["attention_tflops"], f"--measured {path}: attention_tflops")
        changes["attention_eff"] = tf / peak
    gemms = []
    for i, row in enumerate(data.get("gemm", [])):
        where = f"--measured {path}: gemm[{i}]"
        if not isinstance(row, dict) or not {"m", "n", "k", "tflops"} <= set(row):
            raise ValueError(f"{where} needs m, n, k and tflops")
        gemms.append(tuple(_positive(row[k], f"{where}.{k}") for k in ("m", "n", "k", "tflops")))
    if gemms:
        changes["gemms"] = tuple(gemms)
    unknown = set(data) - set(keys) - {"attention_tflops", "gemm", "device", "note"}
    if unknown:
        raise ValueError(f"--measured {path}: unknown keys {sorted(unknown)}")
    return replace(hw, **changes)


def _positive(value, where: str) -> float:
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where} must be a positive number (got {value!r})")
    return float(value)


def gemm_efficiency(hw: Hardware, m: float, n: float, k: float) -> float:
    """Fraction of peak a [m, k] x [k, n] GEMM reaches (module docstring)."""
    if hw.gemms:
        def dist(row):
            return sum(math.log(a / b) ** 2 for a, b in zip(row[:3], (m, n, k)))

        best = min(hw.gemms, key=dist)
        return min(1.0, best[3] / hw.peak_tflops)
    eff = hw.e_max
    for x in (m, n, k):
        eff *= x / (x + GEMM_HALF)
    return eff


def layer_gemms(m: ModelShape, micro_batch: int, tp: int) -> list:
    """(m, n, k) of the forward GEMMs of one dense layer on one TP rank."""
    tokens = m.seq * micro_batch
    k2 = 2 if m.swiglu else 1
    return [
        (tokens, (m.heads + 2 * m.g) * m.d / tp, m.hidden),  # QKV
        (tokens, m.hidden, m.heads * m.d / tp),  # attention dense
        (tokens, k2 * m.f / tp, m.hidden),  # h -> f (gate and up)
        (tokens, m.hidden, m.f / tp),  # f -> h
    ]


def _gemm_seconds(hw: Hardware, shapes) -> float:
    return sum(2 * a * b * c / (hw.peak_tflops * 1e12 * gemm_efficiency(hw, a, b, c))
               for a, b, c in shapes)


def allreduce_seconds(nbytes: float, ranks: int, gbps: float, latency_us: float) -> float:
    """Ring all-reduce (or reduce-scatter + all-gather) of nbytes over `ranks` GPUs."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9) + latency_us * 1e-6


@dataclass
class StepTime:
    """Seconds of one step and its parts."""

    compute: float
    tp_comm: float
    bubble: float
    pp_comm: float
    dp_comm: float
    ep_comm: float
    optimizer: float

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.bubble + self.pp_comm + self.dp_comm
                + self.ep_comm + self.optimizer)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "compute", "tp_comm", "bubble", "pp_comm", "dp_comm", "ep_comm", "optimizer")}
        out["total"] = self.total
        return out


def step_time(
    m: ModelShape,
    hw: Hardware,
    *,
    tp: int,
    pp: int,
    dp: int,
    ep: int,
    vp: int,
    micro_batch: int,
    microbatches: int,
    sp: bool,
    recompute: str,
    sharding: str,
    params: int,
    grad_bytes: float,
    gpus_per_node: int,
    act_bytes: int = 2,
) -> StepTime:
    """The step of one GPU of the slowest stage (module docstring)."""
    passes = 4 if recompute == "full" else 3  # forward, 2x backward, recomputed forward
    b, s, h = micro_batch, m.seq, m.hidden
    layers = m.num_layers // pp
    moe_layers = sum(1 for n in range(1, m.num_layers + 1) if m.experts_of_layer(n) > 1)
    moe_per_stage = moe_layers / pp
    gemm = _gemm_seconds(hw, layer_gemms(m, b, tp))
    if moe_per_stage and m.topk > 1:  # each token runs through topk experts' MLPs
        mlp = _gemm_seconds(hw, layer_gemms(m, b, tp)[2:])
        gemm += mlp * (m.topk - 1) * moe_per_stage / layers
    attn_flops = 4 * b * s * s * m.heads * m.d / tp
    attention = attn_flops / (hw.peak_tflops * 1e12 * hw.attention_eff)
    if recompute == "none":  # the materialized s x s scores run as memory-bound ops too
        attention += 3 * m.heads * s * s * b * 5 / tp / (hw.hbm_gbps * 1e9)
    layer_bytes = layer_activation_bytes(m, b, tp, sp, "selective", act_bytes)
    elementwise = hw.elementwise_passes * layer_bytes / (hw.hbm_gbps * 1e9)
    per_layer = (gemm + attention) * passes + elementwise * passes / 3
    head = 2 * s * b * h * m.padded_vocab(tp) / tp
    head_seconds = 3 * head / (hw.peak_tflops * 1e12 * gemm_efficiency(
        hw, s * b, m.padded_vocab(tp) / tp, h))
    head_seconds += 2 * 14 * s * b * m.padded_vocab(tp) / tp / (hw.hbm_gbps * 1e9)
    # the last stage also runs the head and the loss; 1F1B runs at the slowest stage
    t_compute = layers * per_layer + head_seconds
    tp_bw = hw.nvlink_gbps if tp <= gpus_per_node else hw.network_gbps
    collectives = 6 if recompute == "full" else 4
    tp_mb = layers * collectives * allreduce_seconds(s * b * h * act_bytes, tp, tp_bw,
                                                     hw.latency_us)
    t_mb = t_compute + tp_mb
    compute = microbatches * t_compute
    tp_comm = microbatches * tp_mb
    bubble = (pp - 1) / vp * t_mb
    pp_link = hw.nvlink_gbps if tp * dp < gpus_per_node else hw.network_gbps
    msg = s * b * h * act_bytes / tp
    pp_comm = 0.0
    if pp > 1:
        pp_comm = 2 * vp * (microbatches + pp - 1) * (msg / (pp_link * 1e9) + hw.latency_us * 1e-6)
    dp_bw = hw.nvlink_gbps if tp * dp <= gpus_per_node else hw.network_gbps
    grad_total = params * grad_bytes
    if sharding in ("zero2", "zero3"):
        per_mb = allreduce_seconds(grad_total, dp, dp_bw, hw.latency_us) / 2  # reduce-scatter
        backward = t_compute * 2 / passes
        dp_comm = microbatches * max(0.0, per_mb - backward)
        if sharding == "zero3":  # weights gathered for forward and backward
            dp_comm += microbatches * 2 * allreduce_seconds(params * act_bytes, dp, dp_bw,
                                                            hw.latency_us) / 2
    else:
        dp_comm = allreduce_seconds(grad_total, dp, dp_bw, hw.latency_us)
    ep_comm = 0.0
    if moe_per_stage:  # 2 all-to-alls forward, 2 backward per MoE layer
        ep_bw = hw.nvlink_gbps if tp * ep <= gpus_per_node else hw.network_gbps
        a2a = s * b * h * act_bytes * (ep - 1) / max(ep, 1) / (ep_bw * 1e9)
        ep_comm = microbatches * moe_per_stage * (passes + 1) * a2a
    local = params / (dp if sharding != "none" else 1)
    optimizer = 30 * local / (hw.hbm_gbps * 1e9)
    return StepTime(compute, tp_comm, bubble, pp_comm, dp_comm, ep_comm, optimizer)
