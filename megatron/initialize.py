"""initialize_megatron(): arguments, torch.distributed, model-parallel groups, seeds, kernels."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch

from . import print_rank_0
from .accelerator import communication_backend, get_accelerator, is_gpu
from .global_vars import get_args, set_global_variables


def initialize_megatron(extra_args_provider=None, args_defaults=None, ignore_unknown_args=False,
                        allow_no_cuda=True, args_list=None):
    """Parse arguments, set globals, initialise torch.distributed and the model-parallel
    groups, seed every RNG, and build the fused kernels on a GPU machine.

    Works with world size 1 and no launcher (a single-rank group over an in-process store:
    no TCP port is opened). A run without --tokenizer-type is refused: the tokenizer gives
    the model its vocabulary (the rows of the word embedding).
    """
    from .arguments import parse_args
    from .errors import install_excepthook

    install_excepthook()
    args = parse_args(extra_args_provider, args_defaults or {}, ignore_unknown_args,
                      args_list=args_list)
    require_tokenizer_type(args)
    set_global_variables(args)
    _initialize_distributed(args)
    _set_random_seed(args.seed)
    _compile_dependencies(args)
    return args


def require_tokenizer_type(args) -> None:
    """An ArgumentError when no --tokenizer-type is given (the model would have a word
    embedding of 0 rows), naming the flags that give a vocabulary."""
    from .arguments import ArgumentError

    if getattr(args, "tokenizer_type", None):
        return
    raise ArgumentError(
        "--tokenizer-type is not given: the model's vocabulary (the rows of its word "
        "embedding) comes from the tokenizer; give --tokenizer-type with its --vocab-file "
        "(and --merge-file) or --tokenizer-model, or --tokenizer-type NullTokenizer "
        "--vocab-size N (or --use-checkpoint-args with a checkpoint that names one)"
    )


def require_vocabulary(args) -> None:
    """An ArgumentError before a model is built with a word embedding of 0 rows (no
    tokenizer was built, so the padded vocabulary size is unknown)."""
    from .arguments import ArgumentError

    rows = getattr(args, "padded_vocab_size", None)
    if rows:
        return
    tokenizer = getattr(args, "tokenizer_type", None)
    why = (f"--tokenizer-type {tokenizer} was given but no tokenizer was built"
           if tokenizer else "no --tokenizer-type was given")
    raise ArgumentError(
        f"the model would have {rows or 0} vocabulary rows (word-embedding rows): {why}; "
        "initialize_megatron() builds the tokenizer that sets the vocabulary size (give "
        "--tokenizer-type with its vocabulary files, or NullTokenizer with --vocab-size N)"
    )


def _single_process_store():
    """The rendezvous store of a world of one: in-process (no TCP port, so any number of
    single-process runs can start side by side on one machine)."""
    return torch.distributed.HashStore()


def _initialize_distributed(args) -> None:
    """torch.distributed from the launcher's environment (torchrun, torch.distributed.launch,
    deepspeed, srun with MASTER_ADDR set); nccl on CUDA, gloo on CPU."""
    from . import mpu

    acc = get_accelerator()
    if is_gpu() and acc.device_count() > 0:
        device = args.local_rank if args.local_rank is not None else args.rank % acc.device_count()
        acc.set_device(device)
    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    if not torch.distributed.is_initialized():
        backend = args.distributed_backend or communication_backend()
        if backend == "nccl" and not is_gpu():
            backend = "gloo"
        args.distributed_backend = backend
        if "MASTER_ADDR" in os.environ:
            rendezvous, where = {"init_method": "env://"}, ""
        else:
            if args.world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={args.world_size} but MASTER_ADDR is not set: start several "
                    "ranks with torchrun or python -m torch.distributed.launch"
                )
            rendezvous, where = {"store": _single_process_store()}, " (in-process store)"
        torch.distributed.init_process_group(
            backend=backend, world_size=args.world_size, rank=args.rank, timeout=timeout,
            **rendezvous,
        )
        print_rank_0(f"> initialized torch.distributed with backend {backend} "
                     f"and world size {args.world_size}{where}")
    if mpu.model_parallel_is_initialized():
        print_rank_0("model parallel is already initialized")
    else:
        mpu.initialize_model_parallel(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size,
            timeout=timeout,
            sequence_parallel_size=getattr(args, "ds_sequence_parallel_size", 1),
        )
        print_rank_0(
            f"> initialized tensor model parallel with size "
            f"{mpu.get_tensor_model_parallel_world_size()}\n"
            f"> initialized DeepSpeed-Ulysses sequence parallel with size "
            f"{mpu.get_sequence_parallel_world_size()}\n"
            f"> initialized pipeline model parallel with size "
            f"{mpu.get_pipeline_model_parallel_world_size()}\n"
            f"> initialized data parallel with size {mpu.get_data_parallel_world_size()}"
        )
    if getattr(args, "tp_comm_overlap", False):  # reaches the layers in TransformerConfig
        usable, why = mpu.symmetric_memory_available()
        if usable:
            print_rank_0("> tp-comm-overlap: sequence-parallel GEMMs overlap their all-gathers "
                         "and reduce-scatters through symmetric memory (copy engines)")
        else:
            print_rank_0(f"> tp-comm-overlap: {why}; each sequence-parallel GEMM and its "
                         "all-gather / reduce-scatter run one after the other")


def _set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and the model-parallel RNG tracker.

    Each pipeline stage gets a different seed (+100 per stage, as Megatron does) so that
    dropout differs between the layers of different stages."""
    from . import mpu

    if seed is None or seed <= 0:
        raise ValueError(f"--seed must be a positive integer, got {seed}")
    seed = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mpu.model_parallel_manual_seed(seed)


def _compile_dependencies(args) -> None:
    """Build the dataset index helpers and, on a GPU, the fused softmax kernels."""
    from .data._helpers import get_helpers

    get_helpers()
    from . import fused_kernels

    fused_kernels.load(args)


def set_jit_fusion_options() -> None:
    """Let the jit-scripted fusions (bias-gelu, bias-dropout-add) fuse on the device."""
    if is_gpu():
        torch._C._jit_set_profiling_executor(True)
        torch._C._jit_set_profiling_mode(True)
        torch._C._jit_override_can_fuse_on_cpu(False)
        torch._C._jit_override_can_fuse_on_gpu(False)
        try:
            torch._C._jit_set_texpr_fuser_enabled(False)
            torch._C._jit_set_nvfuser_enabled(True)
        except (AttributeError, RuntimeError):
            torch._C._jit_set_texpr_fuser_enabled(True)
        torch._C._debug_set_autodiff_subgraph_inlining(False)


__all__ = ["initialize_megatron", "require_tokenizer_type", "require_vocabulary",
           "set_jit_fusion_options", "get_args"]
