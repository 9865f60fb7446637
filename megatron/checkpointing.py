"""Megatron checkpoints: save, load, and the safety rules around them.

Layout (as Megatron writes it):

    {save}/latest_checkpointed_iteration.txt         "100" or "release"
    {save}/iter_0000100/mp_rank_00/model_optim_rng.pt           (PP = 1)
    {save}/iter_0000100/mp_rank_01_003/model_optim_rng.pt       (TP rank 1, PP rank 3)

Nothing is lost: every file is written under a temporary name, flushed and renamed; the
tracker is written last, by rank 0, after a barrier that every rank reaches only once its
own file is in place. A save killed midway leaves the tracker pointing at the previous
complete checkpoint.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from . import mpu, print_rank_0
from .accelerator import get_accelerator, is_gpu
from .global_vars import get_args
from .utils import unwrap_model

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_CHECKPOINT_VERSION = None

# Flags that fix the shapes of the weights: a checkpoint made with other values cannot load.
MODEL_ARGS_TO_CHECK = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("padded_vocab_size", "padded vocab size"),
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file or flag."""


def set_checkpoint_version(value) -> None:
    global _CHECKPOINT_VERSION
    _CHECKPOINT_VERSION = value


def get_checkpoint_version():
    return _CHECKPOINT_VERSION


def get_checkpoint_name(checkpoints_path: str, iteration: int, release: bool = False,
                        tensor_rank: int | None = None, pipeline_rank: int | None = None,
                        pipeline_parallel: bool | None = None) -> str:
    """Path of this rank's model_optim_rng.pt."""
    directory = "release" if release else f"iter_{iteration:07d}"
    if tensor_rank is None:
        tensor_rank = mpu.get_tensor_model_parallel_rank()
    if pipeline_rank is None:
        pipeline_rank = mpu.get_pipeline_model_parallel_rank()
    if pipeline_parallel is None:
        pipeline_parallel = mpu.get_pipeline_model_parallel_world_size() > 1
    if pipeline_parallel:
        sub = f"mp_rank_{tensor_rank:02d}_{pipeline_rank:03d}"
    else:
        sub = f"mp_rank_{tensor_rank:02d}"
    return os.path.join(checkpoints_path, directory, sub, "model_optim_rng.pt")


def get_checkpoint_tracker_filename(checkpoints_path: str) -> str:
    return os.path.join(checkpoints_path, TRACKER_FILENAME)


def inference_checkpoint_problem(args, purpose: str) -> str | None:
    """Why `args` cannot load a checkpoint for `purpose` (generation, evaluation), as one
    line naming the flag, or None: Megatron checkpoints at pipeline parallel 1 only."""
    if args.pipeline_model_parallel_size > 1:
        return (
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size} is not "
            f"supported for {purpose}; reshape the checkpoint to pipeline parallel 1 "
            "with tools/checkpoint_util.py"
        )
    if args.deepspeed:
        return (
            f"--deepspeed checkpoints are not read by {purpose}; convert with "
            "tools/convert_checkpoint/deepspeed_to_megatron.py and drop --deepspeed"
        )
    if args.load is None:
        return "--load (the checkpoint folder) is required"
    tracker = get_checkpoint_tracker_filename(args.load)
    if not os.path.isfile(tracker):
        return f"--load {args.load}: no checkpoint there ({tracker} not found)"
    return None


def read_metadata(tracker_filename: str) -> tuple[int, bool]:
    """(iteration, release) from the tracker; a corrupt tracker is an error naming it."""
    with open(tracker_filename) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"corrupt checkpoint tracker {tracker_filename}: expected an iteration number or "
            f"'release', found {text[:40]!r}; fix or remove the file (refusing to start "
            "from scratch over an existing checkpoint)"
        ) from None
    if iteration < 0:
        raise CheckpointError(f"corrupt checkpoint tracker {tracker_filename}: "
                              f"negative iteration {iteration}")
    return iteration, False


def _atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get_rng_state() -> dict:
    """Python, numpy, torch, device and tracker RNG states of this rank."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": mpu.get_cuda_rng_tracker().get_states(),
    }
    if is_gpu():
        state["cuda_rng_state"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if is_gpu() and "cuda_rng_state" in state:
        get_accelerator().set_rng_state(state["cuda_rng_state"])
    if not state.get("rng_tracker_states"):
        raise KeyError("rng_tracker_states")
    mpu.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _model_state(model) -> dict:
    models = unwrap_model(model if isinstance(model, list) else [model])
    if len(models) == 1:
        return {"model": models[0].state_dict_for_save_checkpoint()}
    state = {}
    for i, m in enumerate(models):
        mpu.set_virtual_pipeline_model_parallel_rank(i)
        state[f"model{i}"] = m.state_dict_for_save_checkpoint()
    return state


def save_checkpoint(iteration: int, model, optimizer, lr_scheduler) -> None:
    """Save this rank's model (and optimizer, scheduler, RNG unless --no-save-*) at
    `iteration`, then, after every rank is done, point the tracker at it."""
    args = get_args()
    if getattr(args, "deepspeed", False):
        from .deepspeed_engine import save_deepspeed_checkpoint

        return save_deepspeed_checkpoint(iteration, model, optimizer, lr_scheduler)
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save}")
    if mpu.get_data_parallel_rank() == 0:
        state = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": args.consumed_train_samples,
            "consumed_valid_samples": args.consumed_valid_samples,
        }
        state.update(_model_state(model))
        if not args.no_save_optim:
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            if lr_scheduler is not None:
                state["lr_scheduler"] = lr_scheduler.state_dict()
        if not args.no_save_rng:
            state.update(get_rng_state())
        _atomic_torch_save(state, get_checkpoint_name(args.save, iteration))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _atomic_write_text(get_checkpoint_tracker_filename(args.save), str(iteration))
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_checkpoint_args(checkpoint_args, args=None) -> None:
    """Stop, naming every mismatch, when the checkpoint's model shape differs from ours."""
    args = args or get_args()
    problems = []
    for name, flag in MODEL_ARGS_TO_CHECK:
        ours = getattr(args, name, None)
        theirs = getattr(checkpoint_args, name, None)
        if theirs is not None and ours is not None and ours != theirs:
            problems.append(f"{flag}: checkpoint has {theirs}, this run has {ours}")
    if problems:
        raise CheckpointError(
            f"checkpoint in {args.load} does not match this model: " + "; ".join(problems)
        )


def _missing_rank_file_error(path: str, load_dir: str) -> CheckpointError:
    parent = os.path.dirname(os.path.dirname(path))
    found = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    return CheckpointError(
        f"checkpoint file {path} not found (this run: tensor parallel "
        f"{mpu.get_tensor_model_parallel_world_size()}, pipeline parallel "
        f"{mpu.get_pipeline_model_parallel_world_size()}; {parent} holds {found}). "
        f"To change the parallel layout, reshape {load_dir} with tools/checkpoint_util.py"
    )


def load_checkpoint(model, optimizer, lr_scheduler, load_arg: str = "load",
                    strict: bool = True) -> int:
    """Load the latest (or release) checkpoint from args.<load_arg>; return the iteration
    to resume from (0 for a fresh start or --finetune)."""
    args = get_args()
    load_dir = getattr(args, load_arg)
    if getattr(args, "deepspeed", False):
        from .deepspeed_engine import load_deepspeed_checkpoint

        return load_deepspeed_checkpoint(model, optimizer, lr_scheduler, load_dir, strict)
    models = unwrap_model(model if isinstance(model, list) else [model])
    tracker = get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        print_rank_0(f"WARNING: could not find the metadata file {tracker}\n"
                     "    will not load any checkpoints and will start from random")
        return 0
    iteration, release = read_metadata(tracker)
    path = get_checkpoint_name(load_dir, iteration, release)
    if not os.path.isfile(path):
        raise _missing_rank_file_error(path, load_dir)
    print_rank_0(f" loading checkpoint from {load_dir} at iteration {iteration}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"could not read checkpoint file {path}: {e}") from e
    set_checkpoint_version(state.get("checkpoint_version", 0))

    if "args" in state:
        check_checkpoint_args(state["args"], args)
        if not args.finetune and not release:
            args.consumed_train_samples = state.get(
                "consumed_train_samples", getattr(state["args"], "consumed_train_samples", 0))
            args.consumed_valid_samples = state.get(
                "consumed_valid_samples", getattr(state["args"], "consumed_valid_samples", 0))
            from .global_vars import update_num_microbatches

            update_num_microbatches(args.consumed_train_samples, consistency_check=False)

    if len(models) == 1:
        models[0].load_state_dict(state["model"], strict=strict)
    else:
        for i, m in enumerate(models):
            mpu.set_virtual_pipeline_model_parallel_rank(i)
            m.load_state_dict(state[f"model{i}"], strict=strict)

    if args.finetune or release:
        iteration = 0
    if not release and not args.finetune and not args.no_load_optim:
        try:
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            if lr_scheduler is not None:
                lr_scheduler.load_state_dict(state["lr_scheduler"])
        except KeyError as e:
            raise CheckpointError(
                f"unable to load optimizer state from {path} (missing {e}); use "
                "--no-load-optim or --finetune to load only the model"
            ) from e
    if not release and not args.finetune and not args.no_load_rng:
        try:
            set_rng_state(state)
        except KeyError as e:
            raise CheckpointError(
                f"unable to load RNG state from {path} (missing {e}); use --no-load-rng or "
                "--finetune to load only the model"
            ) from e

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    print_rank_0(f"  successfully loaded checkpoint from {load_dir} at iteration {iteration}")
    return iteration


def load_model_weights_only(model, load_dir: str, strict: bool = True) -> int:
    """Load just the weights (for generation and evaluation tasks)."""
    args = get_args()
    saved = (args.load, args.finetune, args.no_load_optim, args.no_load_rng)
    args.load, args.no_load_optim, args.no_load_rng = load_dir, True, True
    try:
        return load_checkpoint(model, None, None, strict=strict)
    finally:
        args.load, args.finetune, args.no_load_optim, args.no_load_rng = saved

