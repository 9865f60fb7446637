"""Plan a parallel layout: from the model flags and the GPUs to the layouts that fit,
ranked by predicted throughput, each with its memory, step time and command line.

    python tools/plan_parallelism.py --num-layers 24 --hidden-size 2048 \\
        --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 \\
        --vocab-size 51199 --global-batch-size 512 --num-gpus 8 --gpu-type h100

The model flags are pretrain_gpt.py's, parsed by the same parser and validated by the
same rules (megatron/arguments.py); every other training flag given (--lr, --data-path,
--train-iters, ...) goes through to the printed commands. A layout flag given
(--tensor-model-parallel-size, --pipeline-model-parallel-size, --micro-batch-size,
--num-layers-per-virtual-pipeline-stage, --checkpoint-activations, --use-flash-attn,
--deepspeed, --zero-stage, --use-distributed-optimizer, --sequence-parallel,
--moe-expert-parallel-size) fixes that choice. `--json` prints the result as JSON (with
--explain, the rejected layouts too). The memory and time models are in
megatron/planner/ (memory.py, timing.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron.arguments import ArgumentError, build_parser, given_dests, validate_args  # noqa: E402
from megatron.planner import memory, search, timing  # noqa: E402
from megatron.planner.model import (  # noqa: E402
    closed_form_params,
    meta_params,
    shape_from_args,
)

PLANNER_FLAGS = {  # flag -> takes a value
    "--num-gpus": True, "--gpus-per-node": True, "--gpu-memory-gib": True,
    "--gpu-type": True, "--measured": True, "--explain": False, "--json": False,
    "--top": True, "--recompute": True, "--sharding": True, "--reserved-memory-gib": True,
    "--count": True,
}
LAYOUT_FLAGS = {
    "--tensor-model-parallel-size": True, "--pipeline-model-parallel-size": True,
    "--micro-batch-size": True, "--global-batch-size": True,
    "--num-layers-per-virtual-pipeline-stage": True, "--sequence-parallel": False,
    "--use-flash-attn": False, "--checkpoint-activations": False, "--deepspeed": False,
    "--zero-stage": True, "--no-pipeline-parallel": False,
    "--use-distributed-optimizer": False, "--moe-expert-parallel-size": True,
    "--zero-reduce-bucket-size": True, "--zero-allgather-bucket-size": True,
}


def add_planner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="parallel layout planner")
    add = group.add_argument
    add("--num-gpus", type=int, required=True, help="GPUs of the job.")
    add("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain).")
    add("--gpu-type", choices=sorted(timing.PRESETS), default="h100",
        help="Peak FLOP/s, HBM and link bandwidths, memory (see megatron/planner/timing.py).")
    add("--gpu-memory-gib", type=float, help="Memory per GPU; the --gpu-type's if unset.")
    add("--reserved-memory-gib", type=float, default=1.5,
        help="Memory not available to tensors (CUDA context, NCCL, allocator slack).")
    add("--measured", type=str, help="JSON of figures measured on this machine.")
    add("--explain", action="store_true", help="Also print why each rejected layout was.")
    add("--json", action="store_true", help="Print JSON instead of the table.")
    add("--top", type=int, default=10, help="Layouts printed (all with --json).")
    add("--recompute", nargs="+", choices=memory.RECOMPUTE_MODES,
        help="Recompute modes to consider (default all): none, selective (flash "
        "attention: the attention core is recomputed in its backward), full "
        "(--checkpoint-activations).")
    add("--sharding", nargs="+", choices=("none", "distopt", "zero0", "zero1", "zero2",
                                           "zero3"),
        help="Optimizer sharding to consider (default all).")
    add("--count", choices=("meta", "closed"), default="meta",
        help="Count parameters on the meta device (default) or by the closed form.")
    return parser


def strip_flags(argv: list, flags: dict) -> list:
    """argv without the given flags (and their values)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in word
            continue
        out.append(word)
    return out


def _fail(message: str) -> None:
    print(f"plan_parallelism.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _vocab(args: argparse.Namespace, passthrough: list) -> int:
    """The tokenizer's vocabulary (before padding), as pretrain_gpt.py builds it."""
    if args.tokenizer_type is None and args.vocab_size is not None:
        passthrough += ["--tokenizer-type", "NullTokenizer"]
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type is None:
        _fail("give --vocab-size (NullTokenizer: one more id for end-of-document) or "
              "--tokenizer-type with its files, as for pretrain_gpt.py")
    from megatron.tokenizer.tokenizer import build_tokenizer

    probe = copy.copy(args)
    probe.rank = 1  # no log lines
    probe.tensor_model_parallel_size = 1
    try:
        return build_tokenizer(probe).vocab_size
    except (ValueError, OSError) as exc:
        _fail(str(exc))


def build_problem(argv: list) -> tuple:
    parser = build_parser(add_planner_args)
    args = parser.parse_args(argv)
    given = given_dests(parser, argv)
    if args.global_batch_size is None:
        _fail("--global-batch-size is required")
    if args.num_gpus < 1 or args.gpus_per_node < 1:
        _fail("--num-gpus and --gpus-per-node must be >= 1")
    passthrough = strip_flags(argv, {**PLANNER_FLAGS, **LAYOUT_FLAGS})
    if args.max_position_embeddings is None and args.seq_length is not None:
        args.max_position_embeddings = args.seq_length
        passthrough += ["--max-position-embeddings", str(args.seq_length)]
    if not (args.fp16 or args.bf16):
        args.bf16 = True  # planning mixed precision unless told otherwise
        passthrough.append("--bf16")
    precision = "fp16" if args.fp16 else "bf16"
    base = copy.copy(args)
    base.tensor_model_parallel_size = base.pipeline_model_parallel_size = 1
    base.num_layers_per_virtual_pipeline_stage = None
    base.micro_batch_size = 1
    base.global_batch_size = None
    base.deepspeed, base.zero_stage, base.sequence_parallel = False, None, False
    base.moe_expert_parallel_size = 1
    if hasattr(base, "use_distributed_optimizer"):
        base.use_distributed_optimizer = False
    try:
        validate_args(base, world_size=1, rank=1)
    except ArgumentError as exc:
        _fail(str(exc))
    base.checkpoint_activations = False
    shape = shape_from_args(base, _vocab(base, passthrough))
    hw = timing.PRESETS[args.gpu_type]
    if args.measured:
        try:
            hw = timing.load_measured(hw, args.measured)
        except ValueError as exc:
            _fail(str(exc))
    gib = args.gpu_memory_gib if args.gpu_memory_gib is not None else hw.memory_gib
    problem = search.Problem(
        args=base, shape=shape, hw=hw, num_gpus=args.num_gpus,
        gpus_per_node=args.gpus_per_node, global_batch=args.global_batch_size,
        precision=precision, passthrough=passthrough,
        usable_gib=gib - args.reserved_memory_gib, count=args.count,
        has_distopt=hasattr(args, "use_distributed_optimizer"),
    )
    fixed = {d: getattr(args, d) for d in search.LAYOUT_DESTS if d in given}
    return args, problem, fixed


def choices(args: argparse.Namespace, fixed: dict, problem: search.Problem) -> tuple:
    """Recompute modes and shardings to consider."""
    if args.recompute:
        recompute = list(args.recompute)
    elif fixed.get("checkpoint_activations"):
        recompute = ["full"]
    elif fixed.get("use_flash_attn"):
        recompute = ["selective"]
    else:
        recompute = list(memory.RECOMPUTE_MODES)
    if args.sharding:
        shardings = list(args.sharding)
    elif "zero_stage" in fixed:
        shardings = [f"zero{fixed['zero_stage']}"]
    elif fixed.get("deepspeed"):
        shardings = ["zero0", "zero1", "zero2", "zero3"]
    elif fixed.get("use_distributed_optimizer"):
        shardings = ["distopt"]
    else:
        shardings = ["none"] + (["distopt"] if problem.has_distopt else []) + [
            "zero1", "zero2", "zero3"]
    return recompute, shardings


def _result_json(res: search.Result) -> dict:
    lay = res.layout
    out = {"layout": lay.label(), "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
           "micro_batch": lay.micro_batch, "vp": lay.vp, "sequence_parallel": lay.sp,
           "ep": lay.ep, "recompute": lay.recompute, "sharding": lay.sharding}
    if res.fits:
        out.update(memory_gib=res.memory.as_gib(), peak_memory_gib=res.memory.total / memory.GIB,
                   step_time_s=res.time.as_dict(), tokens_per_s=res.tokens_per_s,
                   tflops_per_gpu=res.tflops_per_gpu, command=res.command)
    else:
        out["reasons"] = res.reasons
    return out


def model_summary(problem: search.Problem) -> dict:
    shape = problem.shape
    closed = closed_form_params(shape)
    counted = meta_params(problem.args, shape) if problem.count == "meta" else closed
    return {"parameters": counted, "parameters_closed_form": closed, "count": problem.count,
            "padded_vocab_tp1": shape.padded_vocab(1), "layers": shape.num_layers,
            "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.g,
            "ffn": shape.f, "seq": shape.seq, "precision": problem.precision}


def print_table(problem, summary, fits, rejected, top: int, explain: bool) -> None:
    hw = problem.hw
    print(f"model: {summary['parameters'] / 1e9:.3f}B parameters ({summary['count']} count; "
          f"closed form {summary['parameters_closed_form'] / 1e9:.3f}B), L={summary['layers']} "
          f"h={summary['hidden']} a={summary['heads']} g={summary['kv_heads']} "
          f"f={summary['ffn']} s={summary['seq']} V={summary['padded_vocab_tp1']} "
          f"{problem.precision}")
    print(f"machine: {problem.num_gpus} x {hw.name} ({problem.gpus_per_node} per node, "
          f"{problem.usable_gib:.1f} GiB usable, {hw.peak_tflops:.0f} TFLOP/s peak), global "
          f"batch {problem.global_batch}")
    print(f"{len(fits)} layouts fit, {len(rejected)} rejected"
          + ("" if explain else " (--explain says why)"))
    if fits:
        print(f"\n{'#':>3} {'layout':<58} {'GiB':>6} {'W/G/O/A/B GiB':>26} {'step s':>8} "
              f"{'tokens/s':>10} {'TF/GPU':>7} {'bubble':>6}")
    for i, res in enumerate(fits[:top], 1):
        g = res.memory.as_gib()
        parts = "/".join(f"{g[k]:.1f}" for k in (
            "weights", "grads", "optimizer", "activations", "buffers"))
        bubble = res.time.bubble / res.time.total
        print(f"{i:>3} {res.layout.label():<58} {g['total']:>6.1f} {parts:>26} "
              f"{res.time.total:>8.3f} {res.tokens_per_s:>10.0f} {res.tflops_per_gpu:>7.1f} "
              f"{bubble:>6.1%}")
    for i, res in enumerate(fits[:top], 1):
        print(f"\n[{i}] {res.command}")
    if explain and rejected:
        print("\nrejected:")
        for res in rejected:
            print(f"  {res.layout.label()}: " + "; ".join(res.reasons))


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with contextlib.redirect_stdout(sys.stderr):  # library log lines stay off the output
        args, problem, fixed = build_problem(argv)
        recompute, shardings = choices(args, fixed, problem)
        fits, rejected = search.plan(problem, fixed, recompute, shardings)
        summary = model_summary(problem)
    if args.json:
        out = {"model": summary, "hardware": {
            "name": problem.hw.name, "usable_gib": problem.usable_gib,
            "peak_tflops": problem.hw.peak_tflops, "num_gpus": problem.num_gpus,
            "gpus_per_node": problem.gpus_per_node},
            "layouts": [_result_json(r) for r in fits]}
        if args.explain:
            out["rejected"] = [_result_json(r) for r in rejected]
        print(json.dumps(out, indent=1))
    else:
        print_table(problem, summary, fits, rejected, args.top, args.explain)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
