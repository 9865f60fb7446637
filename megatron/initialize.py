"""initialize_megatron(): arguments, torch.distributed, model-parallel groups, seeds, kernels."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch

from . import print_rank_0
from .accelerator import communication_backend, get_accelerator, is_gpu
from .global_vars import get_args, set_global_variables


def initialize_megatron(extra_args_provider=None, args_defaults=None, ignore_unknown_args=False,
                        allow_no_cuda=True, args_list=None):
    """Parse arguments, set globals, initialise torch.distributed and the model-parallel
    groups, seed every RNG, and build the fused kernels on a GPU machine.

    Works with world size 1 and no launcher (a single-rank group on a free local port).
    """
    from .arguments import parse_args
    from .errors import install_excepthook

    install_excepthook()
    args = parse_args(extra_args_provider, args_defaults or {}, ignore_unknown_args,
                      args_list=args_list)
    set_global_variables(args)
    _initialize_distributed(args)
    _set_random_seed(args.seed)
    _compile_dependencies(args)
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            init_method = "env://"
        else:
            if args.world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={args.world_size} but MASTER_ADDR is not set: start several "
                    "ranks with torchrun or python -m torch.distributed.launch"
                )
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        torch.distributed.init_process_group(
            backend=backend, init_method=init_method, world_size=args.world_size,
            rank=args.rank, timeout=timeout,
        )
        print_rank_0(f"> initialized torch.distributed with backend {backend} "
                     f"and world size {args.world_size}")
    if mpu.model_parallel_is_initialized():
        print_rank_0("model parallel is already initialized")
    else:
        mpu.initialize_model_parallel(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size,
            timeout=timeout,
        )
        print_rank_0(
            f"> initialized tensor model parallel with size "
            f"{mpu.get_tensor_model_parallel_world_size()}\n"
            f"> initialized pipeline model parallel with size "
            f"{mpu.get_pipeline_model_parallel_world_size()}\n"
            f"> initialized data parallel with size {mpu.get_data_parallel_world_size()}"
        )
    mpu.set_tensor_model_parallel_comm_overlap(getattr(args, "tp_comm_overlap", False))
    if mpu.get_tensor_model_parallel_comm_overlap():
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


__all__ = ["initialize_megatron", "set_jit_fusion_options", "get_args"]
