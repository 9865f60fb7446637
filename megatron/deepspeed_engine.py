"""The DeepSpeed seam: the one module that imports deepspeed for training.

* DeepSpeedBackend (megatron.backend's interface), chosen once by
  training.setup_model_and_optimizer under --deepspeed. DeepSpeedBackend.build makes the
  model (GPTModel, or GPTModelPipe for DeepSpeed's pipeline engine; inside
  deepspeed.zero.Init under --zero-stage 3), Megatron's param groups in a plain torch
  optimizer and AnnealingLR, all handed to deepspeed.initialize(model, optimizer,
  lr_scheduler, mpu, config) with a config reconciled against Megatron's flags
  (reconcile_deepspeed_config). Its train_step runs each of the n micro-batches through
  forward, engine.backward and engine.step (or the pipeline engine's train_batch); the
  engine's gradient_accumulation_steps is n, so it scales each loss by 1/n and updates the
  weights at the n-th step, where AnnealingLR advances by the global batch in samples.
  The MoE loss column and the curriculum scheduler belong to the backend (one per run).
* save_deepspeed_checkpoint / load_deepspeed_checkpoint: DeepSpeed's folders
  (global_stepN/, latest) plus Megatron's tracker, with Megatron's client state (the
  run's TrainState).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
from typing import Any, Callable, Dict, List

import torch

from . import get_args, get_num_microbatches, mpu, print_rank_0, update_num_microbatches
from .backend import StepResult, TrainingBackend, bind_train_state, empty_unused_memory
from .checkpointing import (
    CHECKPOINT_VERSION,
    DS_STEP_RE,
    CheckpointError,
    LoadOptions,
    adopt_lineage,
    agree,
    check_checkpoint_args,
    check_save_folder,
    check_weights_finite,
    checkpoint_header,
    finish_save,
    get_rng_state,
    missing_checkpoint_error,
    out_of_space_error,
    prepare_save_folder,
    set_checkpoint_version,
    set_rng_state,
)
from .checkpointing import deepspeed_load_tag as _load_tag  # noqa: F401 - importable here
from .checkpointing import refuse_untracked_deepspeed as _refuse_untracked
from .deepspeed_comm import prepare_deepspeed
from .errors import NonFiniteLossError
from .initialize import require_vocabulary
from .optimizer import get_megatron_optimizer
from .train_state import TrainState

_MOE_LOSS_KEY = "moe loss"


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config and Megatron's flags disagree; the message names both."""


def load_deepspeed_config(path: str | None) -> dict:
    """The JSON of --deepspeed_config ({} without one); a bad file is an error naming it."""
    if not path:
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DeepSpeedConfigError(f"cannot read --deepspeed_config {path}: {e}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: expected a JSON object")
    return config


def _agree(config: dict, key: str, value, flag: str, source: str) -> None:
    """config[key] = value, unless config already holds a different value (an error)."""
    if key in config and config[key] != value:
        raise DeepSpeedConfigError(
            f"{flag} contradicts {key} {json.dumps(config[key])} in {source}"
        )
    config[key] = value


def _precision_block(config: dict, name: str, enabled: bool, source: str) -> dict:
    block = config.setdefault(name, {})
    if "enabled" in block and bool(block["enabled"]) != enabled:
        flag = f"--{name}" if enabled else f"no --{name}"
        raise DeepSpeedConfigError(
            f"{flag} contradicts {name}.enabled {json.dumps(block['enabled'])} in {source}"
        )
    block["enabled"] = enabled
    return block


def _fill_fp16(block: dict, args) -> None:
    """Megatron's loss-scale flags as DeepSpeed's fp16 keys (where the JSON has none)."""
    block.setdefault("loss_scale", float(args.loss_scale or 0))
    block.setdefault("initial_scale_power", int(round(math.log2(args.initial_loss_scale))))
    block.setdefault("loss_scale_window", int(args.loss_scale_window))
    block.setdefault("hysteresis", int(args.hysteresis))
    block.setdefault("min_loss_scale", float(args.min_loss_scale))


def _fill_zero(config: dict, args, source: str) -> None:
    zero = config.setdefault("zero_optimization", {})
    if args.zero_stage is None:
        args.zero_stage = int(zero.get("stage", 0))
    elif "stage" in zero and int(zero["stage"]) != args.zero_stage:
        raise DeepSpeedConfigError(
            f"--zero-stage {args.zero_stage} contradicts "
            f"zero_optimization.stage {zero['stage']} in {source}"
        )
    zero["stage"] = args.zero_stage
    if args.zero_reduce_scatter:
        zero.setdefault("reduce_scatter", True)
    if args.zero_contigious_gradients:
        zero.setdefault("contiguous_gradients", True)
    if args.zero_reduce_bucket_size:
        zero.setdefault("reduce_bucket_size", args.zero_reduce_bucket_size)
    if args.zero_allgather_bucket_size:
        zero.setdefault("allgather_bucket_size", args.zero_allgather_bucket_size)
    if args.zero_stage == 3 and args.remote_device != "none":
        zero.setdefault(
            "offload_param", {"device": args.remote_device, "pin_memory": bool(args.use_pin_memory)}
        )
    if args.cpu_optimizer and args.zero_stage > 0:
        zero.setdefault(
            "offload_optimizer", {"device": "cpu", "pin_memory": bool(args.use_pin_memory)}
        )
    if args.zero_stage > 0:
        # the optimizer is Megatron's (param groups, AdamW or DeepSpeedCPUAdam)
        config.setdefault("zero_allow_untested_optimizer", True)
    if "offload_optimizer" in zero and not args.cpu_optimizer:
        config.setdefault("zero_force_ds_cpu_optimizer", False)


def _fill_activation_checkpointing(config: dict, args) -> None:
    if not args.deepspeed_activation_checkpointing:
        return
    block = config.setdefault("activation_checkpointing", {})
    block.setdefault("partition_activations", bool(args.partition_activations))
    block.setdefault("contiguous_memory_optimization", bool(args.contigious_checkpointing))
    block.setdefault("cpu_checkpointing", bool(args.checkpoint_in_cpu))
    block.setdefault("synchronize_checkpoint_boundary", bool(args.synchronize_each_layer))
    block.setdefault("number_checkpoints", args.num_layers)


def _take_curriculum(config: dict, args, source: str) -> dict | None:
    """Remove the curriculum_learning block (this DeepSpeed no longer reads it; the
    training loop schedules the sequence length itself) and check it against the flag."""
    block = config.pop("curriculum_learning", None)
    enabled = bool(block and block.get("enabled", False))
    if args.curriculum_learning and not enabled:
        raise DeepSpeedConfigError(
            f"--curriculum-learning needs a curriculum_learning block "
            f'with "enabled": true in {source}'
        )
    if enabled and not args.curriculum_learning:
        raise DeepSpeedConfigError(
            f"no --curriculum-learning contradicts curriculum_learning.enabled true in {source}"
        )
    if not enabled:
        return None
    kind = block.get("curriculum_type", "seqlen")
    if kind != "seqlen":
        raise DeepSpeedConfigError(
            f"curriculum_learning.curriculum_type {kind!r} in {source}: only 'seqlen' is supported"
        )
    if int(block.get("max_difficulty", args.seq_length)) > args.seq_length:
        raise DeepSpeedConfigError(
            f"curriculum_learning.max_difficulty "
            f"{block['max_difficulty']} in {source} exceeds "
            f"--seq-length {args.seq_length}"
        )
    return {k: v for k, v in block.items() if k not in ("enabled", "curriculum_type")}


# The optimizer block's params and the Megatron flags they stand for.
_OPTIMIZER_PARAMS = {
    "lr": ("lr", "--lr"),
    "weight_decay": ("weight_decay", "--weight-decay"),
    "eps": ("adam_eps", "--adam-eps"),
    "momentum": ("sgd_momentum", "--sgd-momentum"),
}
_OPTIMIZER_TYPES = {"adam": "adam", "adamw": "adam", "fusedadam": "adam", "sgd": "sgd"}
# Params that change nothing in Megatron's AdamW / SGD when they hold these values.
_OPTIMIZER_NEUTRAL = {"adam_w_mode": True, "bias_correction": True, "torch_adam": None}


@functools.lru_cache(maxsize=1)
def _default_parser():
    from .arguments import build_parser

    return build_parser()


def _flag_default(dest: str):
    return _default_parser().get_default(dest)


def _take_param(args, dest: str, flag: str, value, key: str, source: str) -> None:
    """args.dest = value where the flag was left at its default; a different value given
    on the command line contradicts the JSON."""
    current = getattr(args, dest, None)
    if current is not None and current != _flag_default(dest) and current != value:
        raise DeepSpeedConfigError(
            f"{flag} {current} contradicts {key} {json.dumps(value)} in {source}")
    if current != value:
        print_rank_0(f"> {key} {json.dumps(value)} from {source} (sets {flag})")
        setattr(args, dest, value)


def _take_optimizer(config: dict, args, source: str) -> None:
    """Honour the JSON optimizer block through Megatron's optimizer flags (the optimizer
    handed to DeepSpeed is Megatron's, built from them), or refuse what they cannot say."""
    block = config.pop("optimizer", None)
    if block is None:
        return
    kind = str(block.get("type", "")).lower()
    if kind not in _OPTIMIZER_TYPES:
        raise DeepSpeedConfigError(
            f"optimizer.type {json.dumps(block.get('type'))} in {source}: the optimizer is "
            "Megatron's, built from --optimizer (adam or sgd); use type Adam, AdamW or SGD "
            "or remove the optimizer block")
    _take_param(args, "optimizer", "--optimizer", _OPTIMIZER_TYPES[kind], "optimizer.type",
                source)
    for name, value in dict(block.get("params", {})).items():
        key = f"optimizer.params.{name}"
        if name == "betas":
            betas = list(value)
            _take_param(args, "adam_beta1", "--adam-beta1", betas[0], key, source)
            _take_param(args, "adam_beta2", "--adam-beta2", betas[1], key, source)
        elif name in _OPTIMIZER_PARAMS:
            dest, flag = _OPTIMIZER_PARAMS[name]
            _take_param(args, dest, flag, value, key, source)
        elif name in _OPTIMIZER_NEUTRAL and _OPTIMIZER_NEUTRAL[name] in (None, value):
            continue
        else:
            raise DeepSpeedConfigError(
                f"{key} {json.dumps(value)} in {source} has no Megatron flag (the optimizer "
                "is Megatron's AdamW or SGD); remove it")
    if args.lr is not None and args.min_lr > args.lr:
        raise DeepSpeedConfigError(
            f"--min-lr {args.min_lr} is larger than the learning rate {args.lr} of {source}")


def _refuse_scheduler(config: dict, source: str) -> None:
    if "scheduler" in config:
        raise DeepSpeedConfigError(
            f"scheduler block ({json.dumps(config['scheduler'].get('type'))}) in {source}: "
            "the learning-rate schedule is Megatron's, from --lr-decay-style, "
            "--lr-warmup-* and --lr-decay-*; remove the block")


def reconcile_deepspeed_config(config: dict, args, source: str = "ds_config.json") -> dict:
    """Make the DeepSpeed config agree with Megatron's flags; returns a new dict.

    Batch: train_micro_batch_size_per_gpu = --micro-batch-size, train_batch_size =
    --global-batch-size, gradient_accumulation_steps = global / (micro x data-parallel
    size). Precision: fp16.enabled = --fp16, bf16.enabled = --bf16 (loss-scale flags fill
    the fp16 block). zero_optimization.stage = --zero-stage (taken from the config into
    args.zero_stage when the flag is absent), gradient_clipping = --clip-grad. Missing
    keys are filled from the flags; a present key that differs raises
    DeepSpeedConfigError naming the flag and the key. An optimizer block sets the
    optimizer flags left at their defaults (--lr, --weight-decay, --adam-beta1/2,
    --adam-eps, --optimizer) and contradicts any given otherwise; a scheduler block is
    refused (the schedule comes from the flags). Sets args.zero_stage and
    args.ds_curriculum (the curriculum_learning block, or None).
    """
    config = copy.deepcopy(config)
    dp = args.data_parallel_size
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    _agree(
        config,
        "train_micro_batch_size_per_gpu",
        args.micro_batch_size,
        f"--micro-batch-size {args.micro_batch_size}",
        source,
    )
    _agree(
        config,
        "train_batch_size",
        args.global_batch_size,
        f"--global-batch-size {args.global_batch_size}",
        source,
    )
    _agree(
        config,
        "gradient_accumulation_steps",
        num_micro,
        f"{num_micro} micro-batches (--global-batch-size {args.global_batch_size} / "
        f"(--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}))",
        source,
    )
    if "bfloat16" in config:  # DeepSpeed's older spelling
        config.setdefault("bf16", config.pop("bfloat16"))
    fp16 = _precision_block(config, "fp16", bool(args.fp16), source)
    if args.fp16:
        _fill_fp16(fp16, args)
    _precision_block(config, "bf16", bool(args.bf16), source)
    clip = float(args.clip_grad)
    _agree(config, "gradient_clipping", clip, f"--clip-grad {args.clip_grad}", source)
    _fill_zero(config, args, source)
    _take_optimizer(config, args, source)
    _refuse_scheduler(config, source)
    _fill_activation_checkpointing(config, args)
    _fill_pipeline_partitioning(config, args, source)
    args.ds_curriculum = _take_curriculum(config, args, source)
    if getattr(args, "universal_checkpoint", False):
        config.setdefault("checkpoint", {})["load_universal"] = True
    config.setdefault("steps_per_print", 2**31 - 1)  # Megatron prints its own log line
    config.setdefault("wall_clock_breakdown", False)
    return config


def _fill_pipeline_partitioning(config: dict, args, source: str) -> None:
    """DeepSpeed's pipeline engine by default sends 1/TP of each activation and gradient
    per tensor-parallel rank and gathers the rest, which assumes the TP ranks hold the same
    tensor. Under --sequence-parallel they hold different parts of the sequence, so with
    TP > 1 both kinds of partitioning are switched off; a config that turns them on is
    refused."""
    if not (getattr(args, "sequence_parallel", False) and args.tensor_model_parallel_size > 1):
        return
    pipeline = config.setdefault("pipeline", {})
    for key in ("pipe_partitioned", "grad_partitioned"):
        if pipeline.get(key, False):
            raise DeepSpeedConfigError(
                f'{source}: "pipeline": {{"{key}": true}} cannot be used with '
                f"--sequence-parallel at --tensor-model-parallel-size "
                f"{args.tensor_model_parallel_size} (the tensor-parallel ranks hold different "
                "parts of the sequence); set it to false or leave it out"
            )
        pipeline[key] = False


def build_deepspeed_config(args) -> dict:
    """--deepspeed_config reconciled with the flags (reconcile_deepspeed_config)."""
    source = args.deepspeed_config or "the DeepSpeed config (no --deepspeed_config)"
    return reconcile_deepspeed_config(load_deepspeed_config(args.deepspeed_config), args, source)


def configure_activation_checkpointing(args) -> None:
    """--deepspeed-activation-checkpointing: mpu.checkpoint and mpu's RNG tracker then
    run through deepspeed.checkpointing (partitioned / contiguous / CPU-held activations);
    its tracker is seeded as initialize_megatron seeded Megatron's, so dropout draws the
    same masks and the recompute restores them."""
    if not args.deepspeed_activation_checkpointing:
        return
    import deepspeed

    deepspeed.checkpointing.configure(
        mpu,
        partition_activations=args.partition_activations,
        contiguous_checkpointing=args.contigious_checkpointing,
        num_checkpoints=args.num_layers,
        checkpoint_in_cpu=args.checkpoint_in_cpu,
        synchronize=args.synchronize_each_layer,
        profile=False,
    )
    mpu.model_parallel_manual_seed(args.seed + 100 * mpu.get_pipeline_model_parallel_rank())


def zero3_init_context(args) -> contextlib.AbstractContextManager:
    """deepspeed.zero.Init for --zero-stage 3: every parameter is partitioned over the
    data-parallel group as soon as its module is built (no rank ever holds the full
    model); with --remote-device cpu the partitions live in host memory."""
    import deepspeed

    prepare_deepspeed()
    remote = None if args.remote_device == "none" else args.remote_device
    return deepspeed.zero.Init(
        data_parallel_group=mpu.get_data_parallel_group(),
        remote_device=remote,
        config_dict_or_path=build_deepspeed_config(args),
        enabled=args.zero_stage == 3,
        pin_memory=args.use_pin_memory,
        mpu=mpu,
    )


class SamplesLR:
    """AnnealingLR as the pipeline engine steps it: PipelineEngine.train_batch calls
    lr_scheduler.step() without arguments, so the increment (samples per iteration) is
    set here before each batch. Everything else (state_dict, get_lr, ...) is AnnealingLR's.
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.increment = 1

    def step(self, increment: int | None = None) -> float:
        return self.scheduler.step(increment=self.increment if increment is None else increment)

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)


def _engine(model_list):
    return model_list[0] if isinstance(model_list, list) else model_list


def _is_pipe_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _build_model(model_provider_func, args):
    """The bare model for the engine (the engine does precision and data parallelism)."""
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp > 1 and not args.ds_pipeline_enabled:
        raise ValueError(
            f"--deepspeed with --pipeline-model-parallel-size {pp} trains through DeepSpeed's "
            "pipeline engine: drop --no-pipeline-parallel"
        )
    require_vocabulary(args)
    # --zero-stage 3: every parameter is partitioned as soon as its module is built
    building = zero3_init_context(args) if args.zero_stage == 3 else contextlib.nullcontext()
    with building:
        model = model_provider_func(pre_process=True, post_process=True)
    for param in model.parameters():
        mpu.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if mpu.get_data_parallel_rank() == 0:
        n = sum(getattr(p, "ds_numel", p.nelement()) for p in model.parameters())
        print(
            f" > number of parameters on (tensor, pipeline) model parallel rank "
            f"({mpu.get_tensor_model_parallel_rank()}, "
            f"{mpu.get_pipeline_model_parallel_rank()}): {n}",
            flush=True,
        )
    return model


def _has_moe(model) -> bool:
    from deepspeed.moe.layer import MoE

    return any(isinstance(m, MoE) for m in model.modules())


def _name_moe_groups(optimizer) -> None:
    """DeepSpeed's ZeRO looks up the expert-data-parallel group of a 'moe' param group by
    the group's name: name each after its experts' group (e.g. 'ep_size_2')."""
    for group in optimizer.param_groups:
        if group.get("moe"):
            names = {getattr(p, "group_name", None) for p in group["params"]}
            if len(names) != 1 or None in names:
                raise ValueError(
                    f"MoE param group {group.get('name')!r} mixes expert groups "
                    f"{sorted(map(str, names))}"
                )
            group["name"] = names.pop()


def setup_deepspeed_model_and_optimizer(
    model_provider_func: Callable,
    get_learning_rate_scheduler: Callable,
    train_state: TrainState | None = None,
):
    """Build the model, optimizer and AnnealingLR, wrap them in a DeepSpeed engine and
    load --load into `train_state`. Returns ([engine], optimizer, lr_scheduler)."""
    backend = DeepSpeedBackend.build(model_provider_func, get_learning_rate_scheduler,
                                     train_state if train_state is not None else TrainState())
    return backend.model, backend.optimizer, backend.lr_scheduler


def _curriculum_scheduler(block: dict | None):
    """DeepSpeed's CurriculumScheduler for the config's curriculum_learning block."""
    if block is None:
        return None
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    return CurriculumScheduler(block)


# Kept for callers that clear it between in-process runs; the log state of a run (MoE
# losses since the last log line, the last curriculum length) lives in its DeepSpeedBackend.
_LOG_STATE: Dict[str, Any] = {}


def _check_finite(loss: torch.Tensor, args, iteration: int) -> None:
    if torch.isfinite(loss).all() or args.fp16:
        return
    raise NonFiniteLossError(
        f"iteration {iteration + 1}: the loss is {loss.item()}; stopping before the "
        "optimizer step so that the weights stay finite"
    )


def _sum_sequence_parallel_grads_in_backward(model) -> None:
    """The engine reduces gradients itself (ZeRO-2 inside backward), so the partial sums
    of the `sequence_parallel` parameters (layer norms, row-parallel biases: each TP rank
    sees its slice of the sequence) are made where each gradient arrives: a hook adds it
    up across the tensor group before the engine accumulates it (linear, so per
    micro-batch is the same as once per step)."""
    if not get_args().sequence_parallel or mpu.get_tensor_model_parallel_world_size() == 1:
        return
    group = mpu.get_tensor_model_parallel_group()

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if param.requires_grad and getattr(param, "sequence_parallel", False):
            param.register_hook(summed)


def _sync_batch_size(engine, args) -> int:
    """Keep the engine's accumulation steps equal to Megatron's micro-batch count (it
    changes under --rampup-batch-size); returns the global batch in samples."""
    num_micro = get_num_microbatches()
    global_batch = num_micro * args.micro_batch_size * mpu.get_data_parallel_world_size()
    if engine.gradient_accumulation_steps() != num_micro:
        engine.set_train_batch_size(global_batch)
    return global_batch


class DeepSpeedBackend(TrainingBackend):
    """DeepSpeed's engine (ZeRO, MoE, the pipeline engine for GPTModelPipe): it runs the
    forward, backward and optimizer step and saves and loads DeepSpeed's folders.

    The engine's gradient_accumulation_steps is the micro-batch count n, so it scales each
    loss by 1/n and updates the weights at the n-th step (the accumulation boundary),
    where AnnealingLR advances by the global batch in samples."""

    name = "deepspeed"

    def __init__(self, engine, optimizer, lr_scheduler, curriculum=None):
        super().__init__([engine], optimizer, lr_scheduler)
        self.engine = engine
        self.pipe = _is_pipe_engine(engine)
        self.curriculum = curriculum  # DeepSpeed's CurriculumScheduler, or None
        self.moe_losses: List[float] = []  # since the last log line
        self.seqlen: int | None = None  # the last curriculum length given to the engine

    @classmethod
    def build(cls, model_provider_func: Callable, get_learning_rate_scheduler: Callable,
              state: TrainState) -> DeepSpeedBackend:
        """The model, Megatron's param groups in a plain torch optimizer and AnnealingLR,
        handed to deepspeed.initialize with the config reconciled against the flags; then
        --load is loaded into `state`."""
        import deepspeed
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
        from deepspeed.runtime.pipe.module import PipelineModule

        args = get_args()
        prepare_deepspeed()
        config = build_deepspeed_config(args)
        configure_activation_checkpointing(args)
        model = _build_model(model_provider_func, args)
        pipe = isinstance(model, PipelineModule)
        moe = _has_moe(model)
        if moe and not args.create_moe_param_group:
            print_rank_0("> MoE model: expert parameters get their own param groups "
                         "(as --create-moe-param-group)")
        # saved by the engine with every checkpoint, for ds_to_universal
        names = [name for name, _ in model.named_parameters()]
        tp = mpu.get_tensor_model_parallel_world_size()
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info(names, tp))
        optimizer = get_megatron_optimizer([model], bare=True, moe_param_groups=moe or None)
        _name_moe_groups(optimizer)
        lr_scheduler = get_learning_rate_scheduler(optimizer)
        if pipe:
            lr_scheduler = SamplesLR(lr_scheduler)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mpu=None if pipe else mpu,
            config=config,
            dist_init_required=False,
        )
        engine._is_deepspeed_engine = True
        if pipe:
            batch_fn = getattr(model, "_megatron_batch_fn", None)
            if batch_fn is None:
                raise ValueError(
                    "GPTModelPipe needs _megatron_batch_fn (set by model_provider in "
                    "pretrain_gpt.py) to turn data-loader samples into pipe inputs"
                )
            engine.set_batch_fn(bind_train_state(batch_fn, state))
        _sum_sequence_parallel_grads_in_backward(model)
        backend = cls(engine, optimizer, lr_scheduler, _curriculum_scheduler(args.ds_curriculum))
        state.iteration = 0
        if args.load is not None:
            state.iteration = backend.load(state)
        return backend

    def train_step(self, forward_step_func, data_iterator, state: TrainState) -> StepResult:
        """One iteration through the engine. A 'moe loss' entry of the loss dicts is taken
        out for its own log column."""
        args = get_args()
        engine = self.engine
        global_batch = _sync_batch_size(engine, args)
        if self.pipe:
            self.lr_scheduler.increment = global_batch
            loss = engine.train_batch(data_iter=data_iterator)
            _check_finite(loss, args, state.iteration)
            losses = [{"lm loss": loss.detach()}]
        else:
            losses = []
            for _ in range(get_num_microbatches()):
                output_tensor, loss_func = forward_step_func(data_iterator, engine)
                loss, loss_reduced = loss_func(output_tensor)
                _check_finite(loss, args, state.iteration)
                engine.backward(loss)
                engine.step(lr_kwargs={"increment": global_batch})
                losses.append(loss_reduced)
        empty_unused_memory(args, 1)  # the engine ran forward, backward and step
        skipped_iter = 0 if engine.was_step_applied() else 1
        got_nan = bool(
            skipped_iter
            and not all(torch.isfinite(torch.as_tensor(v)).all()
                        for d in losses for v in d.values())
        )
        grad_norm = engine.get_global_grad_norm()
        if torch.is_tensor(grad_norm):
            grad_norm = grad_norm.item()
        if grad_norm is not None and not math.isfinite(grad_norm):
            grad_norm = None
        averaged = {}
        for key in losses[0]:
            averaged[key] = sum(float(d[key]) for d in losses) / len(losses)
        moe = averaged.pop(_MOE_LOSS_KEY, None)
        if moe is not None and not skipped_iter:
            self.moe_losses.append(moe)
        return StepResult(averaged, skipped_iter, grad_norm, None, got_nan)

    def eval_step(self, forward_step_func, data_iterator) -> list:
        """The pipeline engine's forward-only batch: the mean loss over the micro-batches,
        once per micro-batch (evaluate() averages over eval iterations x micro-batches)."""
        if not self.pipe:
            return super().eval_step(forward_step_func, data_iterator)
        loss = self.engine.eval_batch(data_iter=data_iterator)
        return [{"lm loss": float(loss)} for _ in range(get_num_microbatches())]

    def begin_iteration(self, state: TrainState) -> None:
        """The curriculum's sequence length at (1-based) iteration state.iteration + 1;
        resets the pipeline engine's activation shapes when it changes."""
        if not getattr(get_args(), "curriculum_learning", False):
            state.curriculum_seqlen = None
            return
        if self.curriculum is None:
            state.curriculum_seqlen = get_args().seq_length
            return
        seqlen = int(self.curriculum.update_difficulty(state.iteration + 1))
        if self.pipe and seqlen != self.seqlen:
            self.engine.reset_activation_shape()
        self.seqlen = seqlen
        state.curriculum_seqlen = seqlen

    def extra_log_columns(self, state: TrainState) -> Dict[str, str]:
        """'moe loss' (mean since the last log line) and 'curriculum seqlen' columns."""
        columns = {}
        if self.moe_losses:
            columns[_MOE_LOSS_KEY] = f"{sum(self.moe_losses) / len(self.moe_losses):.6E}"
            if state.iteration % get_args().log_interval == 0:
                self.moe_losses.clear()
        if self.curriculum is not None:
            columns["curriculum seqlen"] = str(state.curriculum_seqlen)
        return columns

    def loss_scale(self) -> float:
        """The engine's current loss scale (1.0 without fp16)."""
        optimizer = self.engine.optimizer
        for name in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, name, None)
            if value is not None and not callable(value):
                return float(value)
        return 1.0

    def logging_optimizer(self):
        return self.optimizer if self.optimizer is not None else self.engine.optimizer

    def params_norm(self) -> float | None:
        """None under ZeRO-3, where each rank holds only a partition."""
        if (get_args().zero_stage or 0) >= 3:
            return None
        return super().params_norm()

    def save(self, state: TrainState) -> None:
        save_deepspeed_checkpoint(state.iteration, self.model, self.optimizer,
                                  self.lr_scheduler, train_state=state)

    def load(self, state: TrainState) -> int:
        args = get_args()
        iteration = load_deepspeed_checkpoint(self.model, self.optimizer, self.lr_scheduler,
                                              args.load, train_state=state)
        if self.optimizer is not None:
            check_save_folder(iteration, state)
        return iteration


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _run_model_options() -> tuple:
    """(--swiglu, the padded vocabulary size) of this run; (False, None) before args."""
    try:
        args = get_args()
    except RuntimeError:  # not initialised: a bare call
        return False, None
    return bool(getattr(args, "swiglu", False)), getattr(args, "padded_vocab_size", None)


def universal_checkpoint_info(
    param_names: List[str],
    tp: int,
    swiglu: bool | None = None,
    padded_vocab_size: int | None = None,
) -> dict:
    """How ds_to_universal merges the tensor-parallel shards of Megatron's parameters.

    ds_to_universal matches each pattern from the start of a parameter name (re.match),
    so every pattern begins with `.*`:
        replicated      layer norms and RMSNorm weights, row-parallel biases, position and
                        token-type embeddings, MoE gates
        row-parallel    attention.dense and dense_4h_to_h weights: joined on dim 1
        2 sub-params    --swiglu's dense_h_to_4h (weight, bias): each shard is [G_r; U_r]
                        (partition stride 2), so the gate halves and the up halves are
                        joined separately to [G; U], and split the same way on load
        vocabulary      word_embeddings and the untied output_layer: joined on dim 0
                        with all padded_vocab_size rows (original_vocab_size): the padding
                        rows are trained logits that the softmax sees, so a resume with
                        the same padded vocabulary is exact; the loading engine zero-pads
                        them for a larger one (DeepSpeed refuses a smaller one: give that
                        run a --make-vocab-size-divisible-by that pads at least as far)
        the rest        column-parallel, joined on dim 0 (query_key_value: its rows are
                        whole key/value groups, so a plain join is right for GQA too)
    Only patterns that match a parameter are listed (the tool rejects unused ones). The
    tables do not depend on `tp`: with one rank nothing is joined, but the loading engine
    still needs them to split for its own TP size. `swiglu` and `padded_vocab_size`
    default to this run's args."""
    from deepspeed.checkpoint import constants as c

    del tp  # the same tables for every TP size
    run_swiglu, run_vocab = _run_model_options()
    swiglu = run_swiglu if swiglu is None else swiglu
    padded_vocab_size = run_vocab if padded_vocab_size is None else padded_vocab_size
    tables = {
        c.TP_REPLICATED_PARAMETER_PATTERNS: [
            r".*position_embeddings\.weight$",
            r".*tokentype_embeddings\.weight$",
            r".*layernorm\.(weight|bias)$",
            r".*attention\.dense\.bias$",
            r".*dense_4h_to_h\.bias$",
            r".*deepspeed_moe\.gate\.wg\.weight$",
            r".*coefficient\.(weight|bias)$",
        ],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            r".*attention\.dense\.weight$",
            r".*dense_4h_to_h\.weight$",
        ],
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: (
            [r".*dense_h_to_4h\.(weight|bias)$"] if swiglu else []
        ),
        c.VOCABULARY_PARAMETER_PATTERNS: (
            [r".*(word_embeddings|output_layer)\.weight$"] if padded_vocab_size else []
        ),
    }
    info = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    for key, patterns in tables.items():
        used = [p for p in patterns if any(re.match(p, n) for n in param_names)]
        if used:
            info[key] = used
    if c.VOCABULARY_PARAMETER_PATTERNS in info:
        info[c.ORIGINAL_VOCAB_SIZE] = padded_vocab_size
    return info


def _client_state(args, iteration: int, train_state: TrainState | None = None) -> dict:
    state = checkpoint_header(args, iteration, train_state)
    if not args.no_save_rng:
        state.update(get_rng_state())
    return state


def save_deepspeed_checkpoint(iteration: int, model_list, optimizer, lr_scheduler,
                              train_state: TrainState | None = None) -> None:
    """engine.save_checkpoint(save, tag=global_step{iteration}) with Megatron's client
    state (train_state's counters), then (every rank done) Megatron's tracker file. As for
    Megatron checkpoints: nothing is written when a weight is NaN or inf or when the tag
    folder belongs to another run; a full disk is one CheckpointSpaceError line;
    --keep-last-checkpoints prunes the oldest global_step* folders."""
    del optimizer, lr_scheduler  # saved by the engine
    args = get_args()
    engine = _engine(model_list)
    check_weights_finite([engine.module], iteration)
    tag = f"global_step{iteration}"
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save}")
    folder = os.path.join(args.save, tag)
    prepare_save_folder(args, folder, iteration, train_state)
    error = None
    try:
        engine.save_checkpoint(args.save, tag=tag,
                               client_state=_client_state(args, iteration, train_state))
    except Exception as e:  # noqa: BLE001 - every rank must learn of it
        error = out_of_space_error(e, f"checkpoint {folder}")
    agree(error)
    finish_save(args, iteration, DS_STEP_RE, train_state)
    torch.distributed.barrier()
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")


def load_deepspeed_checkpoint(
    model_list, optimizer, lr_scheduler, load_dir: str, strict: bool = True,
    options: LoadOptions | None = None, train_state: TrainState | None = None,
) -> int:
    """engine.load_checkpoint(load_dir, tag) (a universal checkpoint with
    --universal-checkpoint); restores the counters into train_state, the RNG and the run's
    lineage as `options` (default from the flags) say; returns the iteration."""
    del optimizer, lr_scheduler  # restored by the engine
    args = get_args()
    options = options or LoadOptions.from_args(args)
    engine = _engine(model_list)
    has_latest = any(
        os.path.isfile(os.path.join(load_dir, n)) for n in ("latest", "latest_universal")
    )
    tag = _load_tag(load_dir, args.universal_checkpoint, getattr(args, "load_tag", None))
    if tag is None and not has_latest:
        _refuse_untracked(load_dir)
        if options.require_checkpoint:
            raise missing_checkpoint_error(load_dir, "no DeepSpeed checkpoint there (no "
                                           "latest file, no tracker)")
        print_rank_0(
            f"WARNING: no DeepSpeed checkpoint (latest file) in {load_dir}; starting from random"
        )
        return 0
    load_optim = options.load_optim and options.restores_run
    # bf16 without ZeRO: the engine saves BF16_Optimizer's state (fp32 master weights, Adam
    # moments) in bf16_zero_pp_rank_* files, but its load_checkpoint hands the model file's
    # copy to the optimizer in the wrong form; read the bf16_zero files instead.
    bf16_states = load_optim and engine.bfloat16_enabled() and not engine.zero_optimization()
    path, state = engine.load_checkpoint(
        load_dir,
        tag=tag,
        load_module_strict=strict,
        load_optimizer_states=load_optim and not bf16_states,
        load_lr_scheduler_states=load_optim and options.load_lr,
        load_module_only=not load_optim,
    )
    if path is None:
        raise CheckpointError(
            f"DeepSpeed could not load a checkpoint from {load_dir} (tag {tag or 'latest'})"
        )
    if bf16_states and not engine._load_zero_checkpoint(
        load_dir, os.path.basename(os.path.dirname(path)), load_optimizer_states=True
    ):
        raise CheckpointError(
            f"{os.path.dirname(path)} has no bf16_zero_pp_rank_*_optim_states.pt files: the "
            "bf16 optimizer state (fp32 master weights) is missing; pass --no-load-optim to "
            "start the optimizer afresh from the saved weights"
        )
    state = state or {}
    # (the client state of a universal checkpoint may not carry the version)
    version = state.get("checkpoint_version", CHECKPOINT_VERSION)
    if not 2.0 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint_version {version}: DeepSpeed checkpoints are read at versions "
            f"2.0 to {CHECKPOINT_VERSION} (the [np, 3, hn] query_key_value row order)"
        )
    set_checkpoint_version(version)
    restore = options.restores_counters
    iteration = int(state.get("iteration", engine.global_steps)) if restore else 0
    if options.weights_only:
        iteration = int(state.get("iteration", engine.global_steps))
    else:
        adopt_lineage(args, os.path.dirname(path), not restore, train_state)
    if options.reset_iteration and options.restores_run:
        # the engine counts from 0 too (its step count drives its own lr schedule)
        engine.global_steps = 0
        engine.global_samples = 0
        print_rank_0(" > --reset-iteration: the iteration and consumed samples start at 0")
    if restore:
        train_state = train_state if train_state is not None else TrainState()
        train_state.restore(state, args.seq_length, iteration)
        update_num_microbatches(train_state.consumed_train_samples, consistency_check=False)
        if options.load_rng and "rng_tracker_states" in state:
            set_rng_state(state)
    torch.distributed.barrier()
    print_rank_0(f"  successfully loaded checkpoint from {load_dir} at iteration {iteration}")
    return iteration


def load_deepspeed_module_weights(module: torch.nn.Module, load_dir: str, model_args) -> int:
    """Into `module` (not wrapped in an engine: a distillation teacher), the weights of
    load_dir's DeepSpeed checkpoint that `latest` names, the experts of an MoE model from
    their own files as DeepSpeed's engine reads them; model_args holds the shape the
    checkpoint must have. Returns its iteration."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from .model.moe import moe_layers
    from .utils import unwrap_model

    with open(os.path.join(load_dir, "latest"), encoding="utf-8") as f:
        tag = f.read().strip()
    path = os.path.join(load_dir, tag,
                        f"mp_rank_{mpu.get_tensor_model_parallel_rank():02d}_model_states.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.join(load_dir, 'latest')} names {tag!r} but {path} "
                              "is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"could not read checkpoint file {path}: {exc}") from exc
    if "args" in state:
        check_checkpoint_args(state["args"], model_args, load_dir)
    module = unwrap_model([module])[0]
    weights = dict(state["module"])
    layers = moe_layers(module)
    if layers:
        for layer in layers:  # expert groups, as the engine sets them up for its model
            layer.set_deepspeed_parallelism()
        DeepSpeedEngine.load_moe_state_dict(load_dir, tag, state_dict=weights,
                                            old_moe_load=False, model=module, mpu=mpu,
                                            num_experts=list(model_args.num_experts))
    module.load_state_dict(weights, strict=True)
    return int(state.get("iteration", state.get("global_steps", 0)) or 0)


__all__ = [
    "prepare_deepspeed",
    "zero3_init_context",
    "DeepSpeedBackend",
    "setup_deepspeed_model_and_optimizer",
    "save_deepspeed_checkpoint",
    "load_deepspeed_module_weights",
    "load_deepspeed_checkpoint",
    "SamplesLR",
]
