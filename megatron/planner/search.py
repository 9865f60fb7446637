"""Layouts: enumerate TP x PP x DP x micro-batch x interleaving x recompute x optimizer
sharding, check each with the training flags' own validation (megatron.arguments
.validate_args, so a layout is rejected exactly where pretrain_gpt.py would refuse it)
and the planner's rules, predict its memory and step time, and write its command line.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from dataclasses import dataclass, field

from megatron.arguments import ArgumentError, validate_args
from megatron.utils import num_floating_point_operations

from . import memory, timing
from .model import ModelShape, closed_form_params, expert_params, layer_params, meta_params


@dataclass(frozen=True)
class Layout:
    """One parallel layout and its training options."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    vp: int = 1
    """Model chunks per pipeline stage (interleaved 1F1B when > 1)."""
    recompute: str = "selective"
    sharding: str = "none"
    """'none' (Megatron's optimizer), 'distopt', 'zero0'..'zero3' (DeepSpeed)."""
    sp: bool = False
    ep: int = 1

    @property
    def deepspeed(self) -> bool:
        return self.sharding.startswith("zero")

    @property
    def zero_stage(self) -> int | None:
        return int(self.sharding[4:]) if self.deepspeed else None

    @property
    def memory_sharding(self) -> str:
        return "none" if self.sharding == "zero0" else self.sharding

    def label(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}", f"mb={self.micro_batch}"]
        if self.vp > 1:
            parts.append(f"v={self.vp}")
        if self.sp:
            parts.append("SP")
        if self.ep > 1:
            parts.append(f"EP={self.ep}")
        parts += [f"recompute={self.recompute}", self.sharding_label()]
        return " ".join(parts)

    def sharding_label(self) -> str:
        return {"none": "no-ZeRO", "distopt": "dist-opt"}.get(
            self.sharding, f"ZeRO-{self.zero_stage}")


@dataclass
class Result:
    layout: Layout
    reasons: list = field(default_factory=list)
    memory: memory.MemoryBreakdown | None = None
    time: timing.StepTime | None = None
    tokens_per_s: float = 0.0
    tflops_per_gpu: float = 0.0
    command: str = ""

    @property
    def fits(self) -> bool:
        return not self.reasons


@dataclass
class Problem:
    """What is planned: the model, the machine, the batch."""

    args: argparse.Namespace
    """The validated training arguments (the model flags)."""
    shape: ModelShape
    hw: timing.Hardware
    num_gpus: int
    gpus_per_node: int
    global_batch: int
    precision: str
    passthrough: list
    """Training flags of the user's command line that the layout does not set."""
    usable_gib: float
    count: str = "meta"
    """'meta' (build on the meta device) or 'closed' (closed-form count)."""
    has_distopt: bool = False
    _cache: dict = field(default_factory=dict)

    def params(self, tp: int, pp: int, rank: int, ep: int) -> int:
        key = (tp, pp, rank, ep)
        if key not in self._cache:
            if self.count == "meta":
                self._cache[key] = meta_params(self.args, self.shape, tp, pp, rank, ep)
            else:
                self._cache[key] = closed_form_params(self.shape, tp, pp, rank, ep)
        return self._cache[key]


LAYOUT_DESTS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
    "num_layers_per_virtual_pipeline_stage", "checkpoint_activations", "use_flash_attn",
    "zero_stage", "deepspeed", "use_distributed_optimizer", "sequence_parallel",
    "moe_expert_parallel_size", "no_pipeline_parallel",
)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(problem: Problem, fixed: dict, recompute: list, shardings: list) -> list:
    """Every layout to consider; `fixed` maps LAYOUT_DESTS the user gave to their value."""
    n, shape = problem.num_gpus, problem.shape
    out = []
    tps = [fixed["tensor_model_parallel_size"]] if "tensor_model_parallel_size" in fixed \
        else _divisors(n)
    for tp in tps:
        if n % tp:
            continue
        pps = [fixed["pipeline_model_parallel_size"]] if "pipeline_model_parallel_size" in \
            fixed else _divisors(n // tp)
        for pp in pps:
            if n % (tp * pp):
                continue
            dp = n // (tp * pp)
            if "micro_batch_size" in fixed:
                mbs = [fixed["micro_batch_size"]]
            else:
                top = max(1, problem.global_batch // dp)
                mbs = [1 << i for i in range(0, 7) if (1 << i) <= top]
            if "num_layers_per_virtual_pipeline_stage" in fixed:
                per = fixed["num_layers_per_virtual_pipeline_stage"]
                vps = [max(1, shape.num_layers // (pp * per))] if per else [1]
            else:
                vps = [1] + ([2, 4] if pp > 1 else [])
            if "moe_expert_parallel_size" in fixed:
                eps = [fixed["moe_expert_parallel_size"]]
            elif shape.has_moe:
                eps = [e for e in _divisors(dp) if all(x % e == 0 for x in shape.num_experts
                                                        if x > 1)]
            else:
                eps = [1]
            sps = [bool(fixed["sequence_parallel"]) and tp > 1] if "sequence_parallel" in \
                fixed else [tp > 1]
            for mb in mbs:
                for vp in vps:
                    for rc in recompute:
                        for sh in shardings:
                            for ep in eps:
                                for sp in sps:
                                    out.append(Layout(tp, pp, dp, mb, vp, rc, sh, sp, ep))
    return out


def training_namespace(problem: Problem, lay: Layout) -> argparse.Namespace:
    """The training arguments of this layout, as pretrain_gpt.py would parse them."""
    args = copy.copy(problem.args)
    args.tensor_model_parallel_size = lay.tp
    args.pipeline_model_parallel_size = lay.pp
    args.micro_batch_size = lay.micro_batch
    args.global_batch_size = problem.global_batch
    args.num_layers_per_virtual_pipeline_stage = (
        problem.shape.num_layers // (lay.pp * lay.vp) if lay.vp > 1 else None)
    args.sequence_parallel = lay.sp
    args.checkpoint_activations = lay.recompute == "full"
    args.use_flash_attn = lay.recompute != "none"
    args.deepspeed = lay.deepspeed
    args.zero_stage = lay.zero_stage
    args.no_pipeline_parallel = lay.deepspeed and lay.pp == 1
    args.moe_expert_parallel_size = lay.ep
    if problem.has_distopt:
        args.use_distributed_optimizer = lay.sharding == "distopt"
    return args


def planner_rules(problem: Problem, lay: Layout) -> list:
    """Why the layout cannot run, beyond the training flags' validation."""
    reasons = []
    if lay.tp > problem.gpus_per_node:
        reasons.append(f"TP {lay.tp} > GPUs per node {problem.gpus_per_node} (tensor "
                       "parallelism all-reduces every layer: it stays on NVLink)")
    if lay.sharding == "distopt" and not problem.has_distopt:
        reasons.append("--use-distributed-optimizer is not a flag of this version")
    if lay.deepspeed and lay.pp > 1 and lay.zero_stage > 1:
        reasons.append(f"ZeRO-{lay.zero_stage} with PP {lay.pp}: DeepSpeed's pipeline engine "
                       "runs ZeRO stage 0 or 1 only")
    if lay.deepspeed and lay.vp > 1:
        reasons.append("interleaving (v > 1) is Megatron's schedule; DeepSpeed's pipeline "
                       "engine has none")
    if lay.deepspeed and lay.pp > 1 and problem.shape.num_layers % lay.pp:
        reasons.append(f"--num-layers ({problem.shape.num_layers}) is not divisible by PP "
                       f"({lay.pp}): DeepSpeed's engine would balance uneven stages, this "
                       "planner sizes equal ones")
    layers = problem.shape.num_layers
    if lay.vp > 1 and layers % (lay.pp * lay.vp):
        reasons.append(f"--num-layers ({layers}) is not divisible by PP x v "
                       f"({lay.pp} x {lay.vp}): every model chunk needs the same layers")
    m = problem.global_batch // max(1, lay.micro_batch * lay.dp)
    if lay.vp > 1 and m % lay.pp:
        reasons.append(f"interleaved 1F1B needs the micro-batches ({m}) to be a multiple "
                       f"of PP ({lay.pp})")
    return reasons


def evaluate(problem: Problem, lay: Layout) -> Result:
    """Check, size and time one layout."""
    res = Result(lay)
    res.reasons += planner_rules(problem, lay)
    if lay.vp > 1 and problem.shape.num_layers % (lay.pp * lay.vp):
        return res  # no --num-layers-per-virtual-pipeline-stage spells this layout
    args = training_namespace(problem, lay)
    try:
        validate_args(args, world_size=problem.num_gpus, rank=1)
    except ArgumentError as exc:
        res.reasons.append(f"pretrain_gpt.py refuses it: {exc}")
    if res.reasons:
        return res
    shape = problem.shape
    microbatches = problem.global_batch // (lay.micro_batch * lay.dp)
    layer_count = layer_params(shape, lay.tp)
    worst = None
    for rank in sorted({0, lay.pp - 1}):
        params = problem.params(lay.tp, lay.pp, rank, lay.ep)
        experts = expert_params(shape, lay.tp, lay.pp, rank, lay.ep)
        mem = memory.stage_memory(
            shape, params, experts, rank=rank, tp=lay.tp, pp=lay.pp, dp=lay.dp, ep=lay.ep,
            vp=lay.vp, micro_batch=lay.micro_batch, microbatches=microbatches, sp=lay.sp,
            recompute=lay.recompute, precision=problem.precision,
            sharding=lay.memory_sharding, layer_param_count=layer_count,
        )
        if worst is None or mem.total > worst.total:
            worst = mem
    res.memory = worst
    if worst.total / memory.GIB > problem.usable_gib:
        terms = {k: v for k, v in worst.as_gib().items() if k in (
            "weights", "grads", "optimizer", "activations", "buffers")}
        big = max(terms, key=terms.get)
        res.reasons.append(
            f"does not fit: {worst.total / memory.GIB:.1f} GiB on stage {worst.stage} > "
            f"{problem.usable_gib:.1f} GiB usable (largest term: {big} "
            f"{terms[big]:.1f} GiB)")
    grad_bytes = memory.state_bytes(problem.precision, lay.memory_sharding, 1).grads
    if lay.deepspeed and lay.zero_stage > 0:
        grad_bytes = 2.0 if problem.precision != "fp32" else 4.0
    last = problem.params(lay.tp, lay.pp, lay.pp - 1, lay.ep)
    res.time = timing.step_time(
        shape, problem.hw, tp=lay.tp, pp=lay.pp, dp=lay.dp, ep=lay.ep, vp=lay.vp,
        micro_batch=lay.micro_batch, microbatches=microbatches, sp=lay.sp,
        recompute=lay.recompute, sharding=lay.memory_sharding, params=last,
        grad_bytes=grad_bytes, gpus_per_node=problem.gpus_per_node,
        act_bytes=4 if problem.precision == "fp32" else 2,
    )
    step = res.time.total
    res.tokens_per_s = problem.global_batch * shape.seq / step
    flops = model_flops(shape, problem.global_batch, lay.tp, lay.recompute == "full")
    res.tflops_per_gpu = flops / step / problem.num_gpus / 1e12
    res.command = command_line(problem, lay)
    return res


def model_flops(m: ModelShape, batch: int, tp: int, recompute: bool) -> float:
    """FLOPs of a step as the training log counts them (megatron.utils)."""
    return num_floating_point_operations(
        batch, m.seq, m.num_layers, m.hidden, m.padded_vocab(tp), recompute,
        num_attention_heads=m.heads, kv_channels=m.d, num_key_value_heads=m.g,
        ffn_hidden_size=m.f, swiglu=m.swiglu,
    )


def layout_flags(problem: Problem, lay: Layout) -> list:
    """The flags that select this layout on pretrain_gpt.py's command line."""
    flags = ["--tensor-model-parallel-size", str(lay.tp),
             "--pipeline-model-parallel-size", str(lay.pp),
             "--micro-batch-size", str(lay.micro_batch),
             "--global-batch-size", str(problem.global_batch)]
    if lay.vp > 1:
        flags += ["--num-layers-per-virtual-pipeline-stage",
                  str(problem.shape.num_layers // (lay.pp * lay.vp))]
    if lay.sp:
        flags.append("--sequence-parallel")
    if lay.recompute != "none":
        flags.append("--use-flash-attn")
    if lay.recompute == "full":
        flags.append("--checkpoint-activations")
    if lay.ep > 1:
        flags += ["--moe-expert-parallel-size", str(lay.ep)]
    if lay.sharding == "distopt":
        flags.append("--use-distributed-optimizer")
    if lay.deepspeed:
        flags += ["--deepspeed", "--zero-stage", str(lay.zero_stage)]
        if lay.pp == 1:
            flags.append("--no-pipeline-parallel")
        if lay.zero_stage > 1:
            flags += ["--zero-reduce-bucket-size", str(memory.DEFAULT_BUCKET),
                      "--zero-allgather-bucket-size", str(memory.DEFAULT_BUCKET)]
    return flags


def command_line(problem: Problem, lay: Layout) -> str:
    """The launcher and pretrain_gpt.py command of this layout."""
    per_node = min(problem.gpus_per_node, problem.num_gpus)
    nodes = problem.num_gpus // per_node
    if lay.deepspeed:
        launcher = ["deepspeed"]
        if nodes > 1:
            launcher += ["--num_nodes", str(nodes), "--hostfile", "hostfile"]
        launcher += ["--num_gpus", str(per_node)]
    else:
        launcher = ["torchrun", "--nproc-per-node", str(per_node)]
        if nodes > 1:
            launcher += ["--nnodes", str(nodes), "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "$MASTER_ADDR:29500"]
    words = launcher + ["pretrain_gpt.py"] + problem.passthrough + layout_flags(problem, lay)
    return " ".join(w if w == "$MASTER_ADDR:29500" else shlex.quote(w) for w in words)


def plan(problem: Problem, fixed: dict, recompute: list, shardings: list) -> tuple:
    """(layouts that fit, best first; rejected results)."""
    fits, rejected = [], []
    for lay in candidates(problem, fixed, recompute, shardings):
        res = evaluate(problem, lay)
        (fits if res.fits else rejected).append(res)
    fits.sort(key=lambda r: (-r.tokens_per_s, r.memory.total))
    return fits, rejected
