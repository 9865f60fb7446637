"""Per-GPU memory of a layout: weights, gradients, optimizer states, activations.

Model states, in bytes per parameter this GPU holds (N of them, DP = d):

    precision / sharding        weights   gradients         optimizer (master + Adam m, v)
    bf16, Megatron (no ZeRO)    2         4 (fp32 main_grad) 12              = 18
    fp16, Megatron              2         2                  12              = 16
    fp32, Megatron              4         4                  8               = 16
    --use-distributed-optimizer as above  as above           12/d (8/d fp32)
    DeepSpeed ZeRO-0            as Megatron
    DeepSpeed ZeRO-1 (16-bit)   2         2 + 4/d            12/d
    DeepSpeed ZeRO-2 (16-bit)   2         2/d + 4/d          12/d
    DeepSpeed ZeRO-3 (16-bit)   2/d       2/d + 4/d          12/d

(the 4/d of ZeRO is the fp32 gradient of this rank's partition that DeepSpeed makes
for the step). ZeRO-2/3 also hold their reduce / all-gather buckets (2 bytes an
element of --zero-reduce-bucket-size and --zero-allgather-bucket-size); ZeRO-3 holds
the gathered parameters of the layer being computed and of the one prefetched.

Activations per layer and micro-batch of b sequences (Korthikanti et al. 2022, 16-bit
tensors, 1-byte dropout masks), written for any shape so that GPT (a d = h, g = a,
f = 4h) gives the paper's sbh(34 + 5as/h):

    replicated over TP   s b (2h + 2h [norm inputs] + 2h [QKV input] + 2h [MLP input]
                              + h + h [two dropout masks])                 = 10 sbh
    split over TP        s b (2ad [Q] + 4gd [K, V] + 2ad [dense input]
                              + 2kf [h -> f output] + 2f [activation output]) = 24 sbh
    attention scores     5 a s^2 b (softmax 2, its dropout mask 1 and output 2)

none: all three, the split terms / t (the replicated ones / t too with sequence
parallelism); selective (the attention core recomputed: here flash attention, which
keeps no s x s tensor): no score term; full (--checkpoint-activations): the layer input
only, 2sbh (/t with sequence parallelism), plus one layer's activations while it is
recomputed. With 1F1B the first stage holds the activations of min(p, m) micro-batches
(interleaved: (p - 1) * 2 + (v - 1) * p + 1 chunks of L/(p v) layers, at most m v).
The last stage adds the loss: 2-byte logits and three fp32 [s, b, V/t] tensors (the
upcast, the max-shifted logits and the softmax kept for the backward) = 14 s b V/t.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import ModelShape

GIB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
SHARDINGS = ("none", "distopt", "zero1", "zero2", "zero3")
DEFAULT_BUCKET = 50_000_000  # elements, as examples/ds_config_gpt_zero*.json


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter: weights, gradients, optimizer states."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def state_bytes(precision: str, sharding: str, dp: int) -> StateBytes:
    """Bytes per parameter of the model states (the table of the module docstring).

    precision is 'bf16', 'fp16' or 'fp32'; sharding one of SHARDINGS."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    half = precision in ("bf16", "fp16")
    if not half:
        weights, grads, optim = 4.0, 4.0, 8.0
    else:
        weights, grads, optim = 2.0, (4.0 if precision == "bf16" else 2.0), 12.0
    if sharding == "distopt":
        return StateBytes(weights, grads, optim / dp)
    if sharding == "none":
        return StateBytes(weights, grads, optim)
    grad16 = 2.0 if half else 4.0
    fp32_part = 4.0 / dp if half else 0.0
    if sharding == "zero1":
        return StateBytes(weights, grad16 + fp32_part, optim / dp)
    if sharding == "zero2":
        return StateBytes(weights, grad16 / dp + fp32_part, optim / dp)
    return StateBytes(weights / dp, grad16 / dp + fp32_part, optim / dp)


def layer_activation_bytes(
    m: ModelShape, micro_batch: int, tp: int, sp: bool, recompute: str, act_bytes: int = 2
) -> float:
    """Activations one layer keeps for one micro-batch (module docstring)."""
    s, b, h = m.seq, micro_batch, m.hidden
    k = 2 if m.swiglu else 1
    scale = act_bytes / 2.0  # the formulas count 16-bit tensors; masks stay 1 byte
    if recompute == "full":
        return 2 * s * b * h * scale / (tp if sp else 1)
    replicated = s * b * (8 * h * scale + 2 * h)
    split = s * b * (4 * m.heads * m.d + 4 * m.g * m.d + 2 * k * m.f + 2 * m.f) * scale
    scores = m.heads * s * s * b * (4 * scale + 1) if recompute == "none" else 0.0
    return replicated / (tp if sp else 1) + (split + scores) / tp


def korthikanti_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                          recompute: str = "none") -> float:
    """The paper's per-layer formulas for GPT, in bytes (a cross-check of the above):
    sbh(10 + 24/t + 5as/(ht)) without sequence parallelism, sbh/t (34 + 5as/h) with it;
    selective drops the 5as/h term; full keeps 2sbh (/t with sequence parallelism)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    scores = 5 * a * s / h if recompute == "none" else 0.0
    if sp:
        return s * b * h / t * (34 + scores)
    return s * b * h * (10 + 24 / t + scores / t)


def in_flight(pp: int, microbatches: int, vp: int, rank: int = 0) -> float:
    """Micro-batches whose activations stage `rank` holds at its peak under 1F1B, in units
    of one micro-batch through the whole stage (interleaved: chunk count / vp)."""
    if pp == 1:
        return 1.0
    if vp <= 1:
        return float(min(pp - rank, microbatches))
    chunks = min((pp - rank - 1) * 2 + (vp - 1) * pp + 1, microbatches * vp)
    return chunks / vp


def logits_bytes(m: ModelShape, micro_batch: int, tp: int, act_bytes: int = 2) -> float:
    """The loss on the last stage: logits and three fp32 [s, b, V/t] tensors."""
    elements = m.seq * micro_batch * m.padded_vocab(tp) / tp
    return elements * ((act_bytes if act_bytes < 4 else 0) + 12)


@dataclass
class MemoryBreakdown:
    """Bytes on one GPU (of its most loaded pipeline stage)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    stage: int
    in_flight: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    def as_gib(self) -> dict:
        out = {k: getattr(self, k) / GIB for k in (
            "weights", "grads", "optimizer", "activations", "buffers")}
        out["total"] = self.total / GIB
        out["stage"] = self.stage
        out["in_flight_microbatches"] = self.in_flight
        return out


def stage_memory(
    m: ModelShape,
    params: int,
    expert_params: int,
    *,
    rank: int,
    tp: int,
    pp: int,
    dp: int,
    ep: int,
    vp: int,
    micro_batch: int,
    microbatches: int,
    sp: bool,
    recompute: str,
    precision: str,
    sharding: str,
    layer_param_count: int,
    bucket: int = DEFAULT_BUCKET,
) -> MemoryBreakdown:
    """Memory of one GPU on pipeline stage `rank` holding `params` parameters (of which
    `expert_params` are experts, sharded over dp / ep instead of dp)."""
    act_bytes = 4 if precision == "fp32" else 2
    dense = state_bytes(precision, sharding, dp)
    expert = state_bytes(precision, sharding, max(1, dp // ep))
    other = params - expert_params

    def states(name: str) -> float:
        return other * getattr(dense, name) + expert_params * getattr(expert, name)

    layers = m.num_layers // pp
    per_layer = layer_activation_bytes(m, micro_batch, tp, sp, recompute, act_bytes)
    flight = in_flight(pp, microbatches, vp, rank)
    act = flight * layers * per_layer
    if recompute == "full":  # the layer being recomputed holds its full activations
        act += layer_activation_bytes(m, micro_batch, tp, sp, "selective", act_bytes)
    if rank == pp - 1:
        act += logits_bytes(m, micro_batch, tp, act_bytes)
    buffers = 0.0
    if sharding in ("zero2", "zero3"):
        buffers += 2.0 * 2 * bucket
    if sharding == "zero3":
        buffers += 2.0 * 2 * max(layer_param_count, bucket)
    return MemoryBreakdown(
        weights=states("weights"), grads=states("grads"), optimizer=states("optimizer"),
        activations=act, buffers=buffers, stage=rank, in_flight=flight,
    )
