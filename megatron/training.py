"""pretrain(): the training loop shared by pretrain_gpt.py, pretrain_bert.py, pretrain_t5.py.

DeepSpeed stays behind one seam: `setup_model_and_optimizer` chooses the training backend
once (megatron.backend.MegatronBackend, or deepspeed_engine.DeepSpeedBackend under
--deepspeed) and the loop steps, evaluates and saves through it alone. The run state
(iteration, consumed samples, curriculum length, ...) is a TrainState the loop owns; args
stay as validated.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from datetime import datetime

import torch

from . import (
    get_args,
    get_current_global_batch_size,
    get_num_microbatches,
    get_tensorboard_writer,
    get_timers,
    is_last_rank,
    mpu,
    print_rank_0,
    print_rank_last,
    update_num_microbatches,
)
from .accelerator import current_device
from .backend import (  # noqa: F401 - _allreduce_embedding_grads: importable here
    MegatronBackend,
    StepResult,
    TrainingBackend,
    _allreduce_embedding_grads,
    bind_train_state,
    empty_unused_memory,
)
from .checkpointing import check_save_folder, load_checkpoint, save_checkpoint  # noqa: F401
from .deepspeed_engine import DeepSpeedBackend
from .errors import NonFiniteLossError
from .initialize import initialize_megatron, require_vocabulary, set_jit_fusion_options
from .learning_rates import AnnealingLR
from .optimizer import get_megatron_optimizer
from .profiling import step_profiler
from .rank_progress import mark, named_timeouts
from .timers import STEP_TIMERS
from .train_state import TrainState
from .utils import (
    first_non_finite_parameter,
    model_flops_per_iteration,
    report_memory,
)

_TRAIN_START_TIME = time.time()


def print_datetime(string: str) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    print_rank_0(f"[{string}] datetime: {datetime.now().strftime('%Y-%m-%d %H:%M:%S')} ")


def pretrain(train_valid_test_dataset_provider, model_provider, forward_step_func,
             extra_args_provider=None, args_defaults=None, args_list=None):
    """Initialise, build model, optimizer and data, train, evaluate, save.

    train_valid_test_dataset_provider(train_val_test_num_samples) -> (train, valid, test)
    model_provider(pre_process=True, post_process=True) -> model for this pipeline stage
    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)
    """
    initialize_megatron(extra_args_provider=extra_args_provider,
                        args_defaults=args_defaults or {}, args_list=args_list)
    set_jit_fusion_options()
    with named_timeouts(get_args().distributed_timeout_minutes):
        return _pretrain(train_valid_test_dataset_provider, model_provider, forward_step_func)


def _pretrain(train_valid_test_dataset_provider, model_provider, forward_step_func):
    from .data.dataset_utils import check_data_paths

    args = get_args()
    update_train_iters(args)
    check_data_paths(args)  # data files, blend weights, train split: before anything is built
    print_datetime("after megatron is initialized")
    if _kill_switch_found(args):
        print_datetime(f"found the kill switch file {args.kill_switch_file}: exiting")
        sys.exit(0)
    timers = get_timers()
    _install_signal_handler(args)

    timers("train/valid/test-data-iterators-setup").start()
    datasets = build_train_valid_test_datasets(train_valid_test_dataset_provider)
    timers("train/valid/test-data-iterators-setup").stop()
    timers("model-and-optimizer-setup").start()
    state = TrainState()
    backend = setup_backend(model_provider, state)
    model = backend.model
    timers("model-and-optimizer-setup").stop()
    # before any step: --save holds no other run's newer checkpoints
    check_save_folder(state.iteration, state)
    print_datetime("after model, optimizer, and learning rate scheduler are built")

    timers("train/valid/test-data-iterators-setup").start()
    if args.virtual_pipeline_model_parallel_size is not None:
        iterators = [build_train_valid_test_data_iterators(datasets, state)
                     for _ in range(len(model))]
        train_data_iterator = [it[0] for it in iterators]
        valid_data_iterator = [it[1] for it in iterators]
        test_data_iterator = [it[2] for it in iterators]
    else:
        train_data_iterator, valid_data_iterator, test_data_iterator = (
            build_train_valid_test_data_iterators(datasets, state))
    timers("train/valid/test-data-iterators-setup").stop()
    print_datetime("after dataloaders are built")
    print_rank_0("done with setup ...")
    timers.log(["model-and-optimizer-setup", "train/valid/test-data-iterators-setup"])
    print_rank_0("training ...")

    forward_step_func = bind_train_state(forward_step_func, state)
    iteration = 0
    if args.skip_train:
        # --skip-train: evaluate the loaded model at its iteration; nothing is saved
        print_rank_0("skipping training (--skip-train): evaluation only")
        iteration = state.iteration
    elif state.do_train and args.train_iters > 0:
        iteration = train(forward_step_func, backend, state, train_data_iterator,
                          valid_data_iterator)
    print_datetime("after training is done")

    mark("end of training")
    if state.do_valid:
        evaluate_and_print_results("the end of training for val data", forward_step_func,
                                   valid_data_iterator, model, iteration, False,
                                   backend=backend, train_state=state)
    if (args.save and iteration != 0 and iteration != state.last_saved_iteration
            and not args.skip_train):
        save_checkpoint_and_time(backend, state)
    if state.do_test:
        evaluate_and_print_results("the end of training for test data", forward_step_func,
                                   test_data_iterator, model, 0, True,
                                   backend=backend, train_state=state)
    writer = get_tensorboard_writer()
    if writer is not None:
        writer.flush()
    return model


def update_train_iters(args) -> None:
    """With --train-samples, derive train_iters (walking the batch-size ramp-up)."""
    if args.train_iters is not None:
        return
    if args.rampup_batch_size is None:
        args.train_iters = args.train_samples // args.global_batch_size
        return
    iterations, consumed = 0, 0
    while consumed <= int(args.rampup_batch_size[2]):
        update_num_microbatches(consumed, consistency_check=False)
        consumed += get_current_global_batch_size()
        iterations += 1
    update_num_microbatches(0, consistency_check=False)
    iterations += (args.train_samples - consumed) // args.global_batch_size
    args.train_iters = iterations
    print_rank_0(f"setting training iterations to {args.train_iters}")


def get_model(model_provider_func):
    """Build this rank's model chunk(s), move to the device, wrap for fp16/bf16 and DDP."""
    args = get_args()
    require_vocabulary(args)
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp > 1 and args.virtual_pipeline_model_parallel_size is not None:
        model = []
        for i in range(args.virtual_pipeline_model_parallel_size):
            mpu.set_virtual_pipeline_model_parallel_rank(i)
            model.append(model_provider_func(pre_process=mpu.is_pipeline_first_stage(),
                                             post_process=mpu.is_pipeline_last_stage()))
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    else:
        model = [model_provider_func(pre_process=mpu.is_pipeline_first_stage(),
                                     post_process=mpu.is_pipeline_last_stage())]
    for chunk in model:
        for param in chunk.parameters():
            mpu.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if mpu.get_data_parallel_rank() == 0:
        n = sum(sum(p.nelement() for p in chunk.parameters()) for chunk in model)
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({mpu.get_tensor_model_parallel_rank()}, "
              f"{mpu.get_pipeline_model_parallel_rank()}): {n}", flush=True)
    device = current_device()
    for chunk in model:
        chunk.to(device)
    if args.fp16 or args.bf16:
        from .model import Float16Module

        model = [Float16Module(chunk, args.params_dtype) for chunk in model]
    if args.DDP_impl == "torch":
        model = [torch.nn.parallel.DistributedDataParallel(
            chunk, device_ids=[device.index] if device.type != "cpu" else None,
            process_group=mpu.get_data_parallel_group()) for chunk in model]
    elif args.DDP_impl == "local":
        from .model.distributed import DistributedDataParallel as LocalDDP

        model = [LocalDDP(chunk, args.accumulate_allreduce_grads_in_fp32,
                          args.use_contiguous_buffers_in_local_ddp,
                          args.gradient_accumulation_fusion,
                          args.use_distributed_optimizer) for chunk in model]
    else:
        raise ValueError(f"unknown --DDP-impl {args.DDP_impl!r}: choose local or torch")
    return model


def get_learning_rate_scheduler(optimizer):
    """AnnealingLR counted in iterations or in samples, as the flags say."""
    args = get_args()
    # --train-samples takes precedence: train_iters is derived from it at start-up
    if args.train_samples:
        decay_steps = (args.lr_decay_samples if args.lr_decay_samples is not None
                       else args.train_samples)
        if args.lr_warmup_fraction is not None:
            warmup_steps = args.lr_warmup_fraction * decay_steps
        else:
            warmup_steps = args.lr_warmup_samples
    elif args.train_iters:
        decay_steps = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
        decay_steps *= args.global_batch_size
        if args.lr_warmup_fraction is not None:
            warmup_steps = args.lr_warmup_fraction * decay_steps
        else:
            warmup_steps = args.lr_warmup_iters * args.global_batch_size
    else:
        raise ValueError("either --train-iters or --train-samples must be given")
    return AnnealingLR(
        optimizer, max_lr=args.lr, min_lr=args.min_lr, warmup_steps=warmup_steps,
        decay_steps=decay_steps, decay_style=args.lr_decay_style,
        use_checkpoint_lr_scheduler=args.use_checkpoint_lr_scheduler,
        override_lr_scheduler=args.override_lr_scheduler,
        # --lr-decay-tokens / --lr-warmup-tokens: the schedule in consumed tokens
        warmup_tokens=args.lr_warmup_tokens, decay_tokens=args.lr_decay_tokens,
        tokens_per_sample=args.seq_length,
    )


def setup_backend(model_provider_func, train_state: TrainState) -> TrainingBackend:
    """The training backend of this run, chosen once: DeepSpeed's engine under --deepspeed,
    else Megatron's model chunks, optimizer and lr scheduler; --load is loaded into it and
    its run state into train_state."""
    args = get_args()
    if args.deepspeed:
        return DeepSpeedBackend.build(model_provider_func, get_learning_rate_scheduler,
                                      train_state)
    model = get_model(model_provider_func)
    # the DDP-wrapped chunks: the distributed optimizer shards their gradient buffers
    optimizer = get_megatron_optimizer(model)
    backend = MegatronBackend(model, optimizer, get_learning_rate_scheduler(optimizer))
    train_state.iteration = 0
    if args.load is not None:
        timers = get_timers()
        timers("load-checkpoint").start()
        train_state.iteration = backend.load(train_state)
        timers("load-checkpoint").stop()
        timers.log(["load-checkpoint"])
    return backend


def setup_model_and_optimizer(model_provider_func, train_state: TrainState | None = None):
    """Model chunks (a DeepSpeed engine in a list under --deepspeed), optimizer and lr
    scheduler, with the checkpoint loaded: its run state into train_state, or, for a
    caller without one (a loop of its own, as tasks/ has), onto args as Megatron did
    (args.iteration, args.consumed_train_samples, ...)."""
    state = train_state if train_state is not None else TrainState()
    backend = setup_backend(model_provider_func, state)
    if train_state is None:
        state.to_args(get_args())
    return backend.model, backend.optimizer, backend.lr_scheduler


def backend_of(model, optimizer, lr_scheduler) -> TrainingBackend:
    """The backend for model chunks built by setup_model_and_optimizer (for callers that
    step them one at a time, like train_step)."""
    if getattr(model[0], "_is_deepspeed_engine", False):
        return DeepSpeedBackend(model[0], optimizer, lr_scheduler)
    return MegatronBackend(model, optimizer, lr_scheduler)


def train_step(forward_step_func, data_iterator, model, optimizer, lr_scheduler,
               train_state: TrainState | None = None):
    """One iteration of the model chunks setup_model_and_optimizer built (Megatron's step
    or the DeepSpeed engine's). Returns (loss dict, skipped_iter, grad_norm,
    num_zeros_in_grad, got_nan)."""
    if train_state is None:  # a caller's own loop: its iteration is on args
        train_state = TrainState(iteration=getattr(get_args(), "iteration", 0) or 0)
    state = train_state
    step = backend_of(model, optimizer, lr_scheduler).train_step
    return tuple(step(bind_train_state(forward_step_func, state), data_iterator, state))


def _format_log_line(args, state: TrainState, elapsed_ms, lr, batch_size, avg_losses,
                     loss_scale, grad_norm, num_zeros, params_norm, skipped, nan,
                     extra=None) -> str:
    """DESIGN.md's log line at state.iteration."""
    seq_len = state.seq_length(args.seq_length)
    tokens_per_sec = batch_size * seq_len / (elapsed_ms / 1000.0)
    flops = model_flops_per_iteration(args, batch_size, seq_len)
    tflops = flops / (elapsed_ms / 1000.0) / args.world_size / 1e12
    s = f" iteration {state.iteration:8d}/{args.train_iters:8d} |"
    s += f" consumed samples: {state.consumed_train_samples:12d} |"
    s += f" consumed tokens: {state.consumed_train_tokens:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {lr:.3E} |"
    s += f" global batch size: {batch_size:5d} |"
    for key, value in avg_losses.items():
        s += f" {key}: {value:.6E} |"
    s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        s += f" num zeros: {num_zeros:.1f} |"
    if params_norm is not None:
        s += f" params norm: {params_norm:.3f} |"
    if extra:
        for key, value in extra.items():
            s += f" {key}: {value} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    s += f" tokens per second: {tokens_per_sec:.1f} |"
    s += f" TFLOP/s per GPU: {tflops:.1f} |"
    return s


class _LogState:
    """Sums between two log lines."""

    def __init__(self):
        self.reset()
        self.tb_iters = 0  # iterations since the last TensorBoard write

    def reset(self):
        self.losses: dict[str, float] = {}
        self.iters = 0
        self.skipped = 0
        self.nan = 0


def _write_timers(args, timers, writer, iteration, log_state) -> None:
    """--log-timers-to-tensorboard: the step timers of --timing-log-level (as
    "<name>-time", the slowest rank's seconds per iteration since the last log line; the
    timers restart at each log line). Every rank joins the reduction."""
    if not args.log_timers_to_tensorboard:
        return
    timers.write(STEP_TIMERS, writer, iteration, normalizer=max(1, log_state.iters))


def _write_memory(writer, iteration) -> None:
    """--log-memory-to-tensorboard: the accelerator's allocator counters, in bytes."""
    from .accelerator import get_accelerator

    acc = get_accelerator()
    writer.add_scalar("mem-reserved-bytes", acc.memory_reserved(), iteration)
    writer.add_scalar("mem-allocated-bytes", acc.memory_allocated(), iteration)
    count = acc.memory_stats().get("allocation.all.current")
    if count is not None:
        writer.add_scalar("mem-allocated-count", count, iteration)


def optimizer_state_stats(optimizer) -> dict[str, float] | None:
    """L2 and L1 norms and the largest magnitude of Adam's second moment (variance), its
    square root, the first moment (momentum) and the weights, over the whole model: this
    rank's shards, summed (max for the largest) over the model-parallel group and, under
    ZeRO or the distributed optimizer (where each data-parallel rank holds a partition),
    the data-parallel group.
    Parameters replicated across tensor-parallel ranks count once. None without Adam
    state (SGD, or before the first step)."""
    from .mpu.layers import param_is_not_tensor_parallel_duplicate

    device = current_device()
    sums = torch.zeros(8, dtype=torch.float64, device=device)  # l2^2 x 4, then l1 x 4
    maxes = torch.zeros(4, dtype=torch.float64, device=device)
    found = False
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "exp_avg_sq" not in state:
                continue
            found = True
            # a duplicate: the tied embedding of the last pipeline stage, or a TP replica
            if getattr(param, "shared", False) or not param_is_not_tensor_parallel_duplicate(
                    param):
                continue
            variance = state["exp_avg_sq"].detach().double()
            tensors = (variance, variance.sqrt(), state["exp_avg"].detach().double(),
                       param.detach().double())
            for i, t in enumerate(tensors):
                sums[i] += t.square().sum()
                sums[4 + i] += t.abs().sum()
                maxes[i] = torch.maximum(maxes[i], t.abs().max())
    flag = torch.tensor([1.0 if found else 0.0], device=device)
    groups = [mpu.get_model_parallel_group()]
    if (getattr(get_args(), "deepspeed", False) and (get_args().zero_stage or 0) > 0
            or getattr(get_args(), "use_distributed_optimizer", False)):
        groups.append(mpu.get_data_parallel_group())
    for group in groups:
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if flag.item() == 0.0:
        return None
    names = ("variance", "variance_sqrt", "momentum", "weight")
    stats = {}
    for i, name in enumerate(names):
        stats[f"optimizer/{name}_l2"] = sums[i].item() ** 0.5
        stats[f"optimizer/{name}_l1"] = sums[4 + i].item()
        stats[f"optimizer/{name}_abs_max"] = maxes[i].item()
    return stats


def _write_optimizer_states(args, optimizer, writer, state: TrainState) -> None:
    """--log-optimizer-states-to-tensorboard (every rank joins the reductions)."""
    if not args.log_optimizer_states_to_tensorboard or optimizer is None:
        return
    stats = optimizer_state_stats(optimizer)
    if writer is not None and stats is not None:
        for key, value in stats.items():
            writer.add_scalar(key, value, state.iteration)
            writer.add_scalar(key + " vs tokens", value, state.consumed_train_tokens)


def training_log(loss_dict, log_state, learning_rate, state: TrainState, loss_scale,
                 report_memory_flag, skipped_iter, got_nan, grad_norm, params_norm,
                 num_zeros_in_grad, extra_columns=None, optimizer=None):
    """Accumulate this iteration (state.iteration) and print the log line every
    --log-interval iterations."""
    args = get_args()
    iteration = state.iteration
    timers = get_timers()
    writer = get_tensorboard_writer()
    log_state.skipped += skipped_iter
    log_state.nan += int(got_nan)
    log_state.iters += 1
    log_state.tb_iters += 1
    if iteration % args.tensorboard_log_interval == 0:
        # collectives (optimizer states) and timer resets: on every rank, writer or not
        _write_timers(args, timers, writer, iteration, log_state)
        _write_optimizer_states(args, optimizer, writer, state)
        log_state.tb_iters = 0
    if not skipped_iter:
        for key, value in loss_dict.items():
            log_state.losses[key] = log_state.losses.get(key, 0.0) + float(value)

    batch_size = args.micro_batch_size * args.data_parallel_size * get_num_microbatches()
    if writer is not None and iteration % args.tensorboard_log_interval == 0:
        if args.log_learning_rate_to_tensorboard:
            writer.add_scalar("learning-rate", learning_rate, iteration)
            writer.add_scalar("learning-rate vs samples", learning_rate,
                              state.consumed_train_samples)
        if args.log_batch_size_to_tensorboard:
            writer.add_scalar("batch-size", batch_size, iteration)
        if args.log_world_size_to_tensorboard:
            writer.add_scalar("world-size", args.world_size, iteration)
            writer.add_scalar("world-size vs samples", args.world_size,
                              state.consumed_train_samples)
        for key, value in loss_dict.items():
            writer.add_scalar(key, float(value), iteration)
            writer.add_scalar(key + " vs samples", float(value), state.consumed_train_samples)
        if args.log_loss_scale_to_tensorboard:
            writer.add_scalar("loss-scale", loss_scale, iteration)
        if grad_norm is not None:
            writer.add_scalar("grad-norm", grad_norm, iteration)
        if params_norm is not None:
            writer.add_scalar("params-norm", params_norm, iteration)
        if args.lr_decay_tokens is not None or args.train_tokens is not None:
            writer.add_scalar("learning-rate vs tokens", learning_rate,
                              state.consumed_train_tokens)
        if args.log_memory_to_tensorboard:
            _write_memory(writer, iteration)

    if iteration % args.log_interval == 0:
        elapsed = timers("interval-time").elapsed()
        elapsed_ms = elapsed * 1000.0 / log_state.iters
        if writer is not None:
            writer.add_scalar("iteration-time", elapsed_ms / 1000.0, iteration)
        counted = max(1, log_state.iters - log_state.skipped)
        avg = {k: v / counted for k, v in log_state.losses.items()}
        line = _format_log_line(args, state, elapsed_ms, learning_rate, batch_size, avg,
                                loss_scale, grad_norm, num_zeros_in_grad, params_norm,
                                log_state.skipped, log_state.nan, extra_columns)
        print_rank_last(line)
        timers.log(STEP_TIMERS, normalizer=log_state.iters)  # --timing-log-level/-option
        if report_memory_flag:
            report_memory(f"(after {iteration} iterations)")
            report_memory_flag = False
        log_state.reset()
    return report_memory_flag


def save_checkpoint_and_time(backend: TrainingBackend, state: TrainState) -> None:
    """Save state.iteration's checkpoint through the backend, timed."""
    timers = get_timers()
    timers("save-checkpoint").start()
    backend.save(state)
    timers("save-checkpoint").stop()
    timers.log(["save-checkpoint"])
    state.last_saved_iteration = state.iteration


_SIGNAL_RECEIVED = None


def _install_signal_handler(args) -> None:
    """--exit-signal-handler: on SIGTERM, save a checkpoint after the current iteration
    and exit 0."""
    if not args.exit_signal_handler:
        return

    def handler(signum, frame):
        global _SIGNAL_RECEIVED
        _SIGNAL_RECEIVED = signum
        print(f"received signal {signum}: will save a checkpoint and exit after this "
              "iteration", flush=True)

    signal.signal(signal.SIGTERM, handler)


def _any_rank_true(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=current_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _should_exit(args, state: TrainState, backend: TrainingBackend) -> bool:
    """Signal, duration and interval exits, each saving first."""
    iteration = state.iteration
    reason = None
    if args.exit_signal_handler and _any_rank_true(_SIGNAL_RECEIVED is not None):
        reason = "exiting on signal"
    elif args.exit_duration_in_mins:
        minutes = (time.time() - _TRAIN_START_TIME) / 60.0
        if _any_rank_true(minutes > args.exit_duration_in_mins):
            reason = f"exiting program after {minutes:.1f} minutes"
    if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
        reason = f"exiting program at iteration {iteration}"
    if reason is None and args.kill_switch_file and _any_rank_true(_kill_switch_found(args)):
        reason = f"found the kill switch file {args.kill_switch_file} at iteration {iteration}"
    if reason is None:
        return False
    if args.save and iteration != state.last_saved_iteration:
        save_checkpoint_and_time(backend, state)
    print_datetime(reason)
    return True


def _kill_switch_found(args) -> bool:
    """--kill-switch-file: whether the file exists (checked after every iteration; every
    rank's answer is combined by the caller, so all ranks stop at the same iteration)."""
    return bool(args.kill_switch_file) and os.path.exists(args.kill_switch_file)


def _publish_iteration(args, iteration: int) -> None:
    """get_args().iteration for scripts and hooks that read it, as in Megatron-DeepSpeed
    (nothing here reads it: the loop's TrainState is the run state)."""
    args.iteration = iteration


def train(forward_step_func, backend: TrainingBackend, state: TrainState,
          train_data_iterator, valid_data_iterator) -> int:
    """The training loop from state.iteration; returns the last iteration."""
    args = get_args()
    timers = get_timers()
    model = backend.model
    for chunk in model:
        chunk.train()
    if state.iteration > 0 and state.consumed_train_tokens == 0:
        # a checkpoint without the token count (saved before it was kept): samples x length
        state.consumed_train_tokens = state.consumed_train_samples * args.seq_length
    state.last_saved_iteration = state.iteration if args.load else None
    log_state = _LogState()
    timers("interval-time").start()
    print_datetime("before the start of training step")
    report_memory_flag = True
    overflow_guard = _OverflowGuard(args)
    loss_scale = backend.loss_scale()
    profiler = step_profiler(args)
    _publish_iteration(args, state.iteration)
    while state.iteration < args.train_iters and not _train_tokens_reached(args, state):
        update_num_microbatches(state.consumed_train_samples)
        backend.begin_iteration(state)
        seq_len = state.seq_length(args.seq_length)
        if hasattr(backend.lr_scheduler, "set_tokens_per_sample"):
            backend.lr_scheduler.set_tokens_per_sample(seq_len)
        mark(f"iteration {state.iteration + 1}: train step")
        profiler.begin(state.iteration + 1)  # --profile
        result = backend.train_step(forward_step_func, train_data_iterator, state)
        profiler.end()
        state.iteration += 1
        _publish_iteration(args, state.iteration)
        new_samples = (mpu.get_data_parallel_world_size() * args.micro_batch_size
                       * get_num_microbatches())
        state.consumed_train_samples += new_samples
        state.consumed_train_tokens += new_samples * seq_len
        state.skipped_iterations += result.skipped
        state.nan_iterations += int(result.got_nan)
        iteration = state.iteration
        overflow_guard.after_step(iteration, result.skipped, loss_scale, model)
        loss_scale = backend.loss_scale()
        params_norm = None
        if args.log_params_norm or iteration % args.log_interval == 0:
            params_norm = backend.params_norm()
        report_memory_flag = training_log(
            result.losses, log_state, backend.current_lr(), state, loss_scale,
            report_memory_flag, result.skipped, result.got_nan, result.grad_norm,
            params_norm, result.num_zeros, backend.extra_log_columns(state),
            optimizer=backend.logging_optimizer())
        if params_norm is not None and not math.isfinite(params_norm):
            raise NonFiniteLossError(
                f"iteration {iteration}: the parameter norm is {params_norm}; the run "
                "diverged: lower --lr or resume from an earlier checkpoint")

        if args.eval_interval and iteration % args.eval_interval == 0 and state.do_valid:
            mark(f"iteration {iteration}: evaluation")
            evaluate_and_print_results(f"iteration {iteration}", forward_step_func,
                                       valid_data_iterator, model, iteration, False,
                                       backend=backend, train_state=state)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            mark(f"iteration {iteration}: checkpoint save")
            save_checkpoint_and_time(backend, state)
        if _should_exit(args, state, backend):
            profiler.finish()
            sys.exit(0)
    profiler.finish()  # a --profile window that training ended inside
    return state.iteration


def _train_tokens_reached(args, state: TrainState) -> bool:
    """--train-tokens: the run ends once the consumed tokens reach it."""
    return args.train_tokens is not None and state.consumed_train_tokens >= args.train_tokens


class _OverflowGuard:
    """Stops an fp16 run that can no longer recover: an overflow with the dynamic loss
    scale already at --min-loss-scale, --max-consecutive-skipped-iterations skipped in a
    row, or weights that are no longer finite. fp32 and bf16 runs stop at the first
    non-finite loss in train_step."""

    def __init__(self, args):
        self.args = args
        self.consecutive = 0

    def after_step(self, iteration: int, skipped: int, scale_used: float, model) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        args = self.args
        bad = first_non_finite_parameter(model)
        if bad is not None:
            raise NonFiniteLossError(
                f"iteration {iteration}: the weights are no longer finite ({bad} holds NaN "
                "or inf); the run diverged: lower --lr or resume from an earlier checkpoint")
        dynamic = args.fp16 and args.loss_scale is None and not args.deepspeed
        if dynamic and scale_used <= args.min_loss_scale:
            raise NonFiniteLossError(
                f"iteration {iteration}: fp16 overflow with the loss scale at its minimum "
                f"({scale_used:g}, --min-loss-scale); the loss or gradients are NaN or inf "
                "at any scale: the run diverged (lower --lr, or resume from an earlier "
                "checkpoint)")
        limit = args.max_consecutive_skipped_iterations
        if limit and self.consecutive >= limit:
            raise NonFiniteLossError(
                f"iteration {iteration}: {self.consecutive} consecutive iterations skipped "
                f"for fp16 overflow (--max-consecutive-skipped-iterations {limit}); the run "
                "diverged (lower --lr, or resume from an earlier checkpoint)")


def evaluate(forward_step_func, data_iterator, model, verbose=False,
             backend: TrainingBackend | None = None, train_state: TrainState | None = None):
    """Average losses over --eval-iters iterations of the global batch (counting the
    validation samples read into train_state)."""
    args = get_args()
    backend = backend if backend is not None else backend_of(model, None, None)
    for chunk in model:
        chunk.eval()
    total = {}
    with torch.no_grad():
        for it in range(args.eval_iters):
            if verbose and it % args.log_interval == 0:
                print_rank_0(f"Evaluating iter {it}/{args.eval_iters}")
            losses = backend.eval_step(forward_step_func, data_iterator)
            empty_unused_memory(args, 1)
            if mpu.is_pipeline_last_stage(ignore_virtual=True):
                for d in losses:
                    for key, value in d.items():
                        total[key] = total.get(key, 0.0) + float(value)
            if train_state is not None:
                train_state.consumed_valid_samples += (
                    mpu.get_data_parallel_world_size() * args.micro_batch_size
                    * get_num_microbatches())
    for chunk in model:
        chunk.train()
    n = args.eval_iters * get_num_microbatches()
    return {k: v / n for k, v in total.items()}


def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration,
                               verbose=False, backend: TrainingBackend | None = None,
                               train_state: TrainState | None = None):
    """Print ' validation loss at {prefix} | lm loss value: ... | lm loss PPL: ... |'.

    Every rank must call it (callers check do_valid / do_test): ranks without a data
    iterator (TP rank > 0, middle pipeline stages) still join the collectives."""
    args = get_args()
    writer = get_tensorboard_writer()
    results = evaluate(forward_step_func, data_iterator, model, verbose, backend, train_state)
    samples = (train_state.consumed_train_samples if train_state is not None
               else getattr(args, "consumed_train_samples", 0))
    string = f" validation loss at {prefix} | "
    for key, value in results.items():
        ppl = math.exp(min(20.0, value))
        string += f"{key} value: {value:.6E} | {key} PPL: {ppl:.6E} | "
        if writer is not None and is_last_rank():
            writer.add_scalar(f"{key} validation", value, iteration)
            writer.add_scalar(f"{key} validation vs samples", value, samples)
            if args.log_validation_ppl_to_tensorboard:
                writer.add_scalar(f"{key} validation ppl", ppl, iteration)
    length = len(string) + 1
    print_rank_last("-" * length)
    print_rank_last(string)
    print_rank_last("-" * length)
    return results


def cyclic_iter(iterable):
    while True:
        yield from iterable


def build_train_valid_test_datasets(build_train_valid_test_datasets_provider):
    """(train, valid, test) datasets on TP rank 0 of each rank (None elsewhere). pretrain()
    builds them before the model, so that a data error ends the run before minutes of
    model building and checkpoint loading."""
    args = get_args()
    print_rank_0("> building train, validation, and test datasets ...")
    if mpu.get_tensor_model_parallel_rank() != 0:
        return None
    if args.train_samples:
        train_samples = args.train_samples
    else:
        train_samples = args.train_iters * args.global_batch_size
    eval_iters = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    test_iters = args.eval_iters
    num_samples = [train_samples, eval_iters * args.global_batch_size,
                   test_iters * args.global_batch_size]
    print_rank_0(" > datasets target sizes (minimum size):")
    print_rank_0(f"    train:      {num_samples[0]}")
    print_rank_0(f"    validation: {num_samples[1]}")
    print_rank_0(f"    test:       {num_samples[2]}")
    from .data.dataset_utils import index_cache_dir

    with index_cache_dir(args.data_cache_path):  # --data-cache-path
        return build_train_valid_test_datasets_provider(num_samples)


def build_train_valid_test_data_iterators(datasets, train_state: TrainState | None = None):
    """Data loaders over `datasets` (build_train_valid_test_datasets) resuming at
    train_state's consumed sample counts; sets its do_train/do_valid/do_test flags on
    every rank."""
    from .data.data_samplers import build_pretraining_data_loader

    args = get_args()
    state = train_state if train_state is not None else TrainState()
    train_dataloader = valid_dataloader = test_dataloader = None
    if state.iteration > 0 and state.consumed_train_samples == 0:
        state.consumed_train_samples = state.iteration * args.global_batch_size
    if args.skip_train:
        # evaluation only: the first --eval-iters batches of the validation split, whatever
        # the checkpoint had read of it
        state.consumed_valid_samples = 0
    elif (state.iteration > 0 and state.consumed_valid_samples == 0
          and args.train_samples is None):
        state.consumed_valid_samples = ((state.iteration // args.eval_interval)
                                        * args.eval_iters * args.global_batch_size)

    if mpu.get_tensor_model_parallel_rank() == 0:
        train_ds, valid_ds, test_ds = datasets
        train_dataloader = build_pretraining_data_loader(train_ds, state.consumed_train_samples)
        valid_dataloader = build_pretraining_data_loader(valid_ds, state.consumed_valid_samples)
        test_dataloader = build_pretraining_data_loader(test_ds, 0)
        flags = torch.tensor([
            int(train_dataloader is not None and args.train_iters > 0),
            int(valid_dataloader is not None and args.eval_iters > 0),
            int(test_dataloader is not None and args.eval_iters > 0)],
            dtype=torch.long, device=current_device())
    else:
        flags = torch.tensor([0, 0, 0], dtype=torch.long, device=current_device())
    torch.distributed.broadcast(flags, mpu.get_tensor_model_parallel_src_rank(),
                                group=mpu.get_tensor_model_parallel_group())
    state.do_train, state.do_valid, state.do_test = (bool(v) for v in flags.tolist())

    def _iterator(loader):
        if loader is None:
            return None
        return iter(loader) if args.dataloader_type == "single" else iter(cyclic_iter(loader))

    return _iterator(train_dataloader), _iterator(valid_dataloader), _iterator(test_dataloader)


__all__ = ["pretrain", "train", "train_step", "evaluate", "evaluate_and_print_results",
           "get_model", "setup_model_and_optimizer", "setup_backend", "backend_of",
           "build_train_valid_test_datasets", "build_train_valid_test_data_iterators",
           "TrainState", "NonFiniteLossError"]
