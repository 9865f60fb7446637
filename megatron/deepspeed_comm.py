"""deepspeed.comm on this run's process group: what a model layer built on DeepSpeed's
collectives (DeepSpeed-Ulysses' DistributedAttention) and the training seam
(megatron.deepspeed_engine) both need, with nothing of the training loop behind it."""

from __future__ import annotations

import os

import torch


def prepare_deepspeed() -> None:
    """Import DeepSpeed and keep its CPU communication on plain gloo.

    DeepSpeed's CPU backend otherwise JIT-compiles a shared-memory all-reduce op on the
    first deepspeed.initialize (minutes on a small machine, and a stale build lock hangs
    every later run); gloo does the same collectives. MEGATRON_DS_SHM_COMM=1 keeps it.
    """
    import deepspeed

    from .accelerator import is_gpu

    if not is_gpu() and os.environ.get("MEGATRON_DS_SHM_COMM", "0") != "1":
        ops = deepspeed.ops
        if "__compatible_ops__" not in vars(ops):
            ops.__compatible_ops__ = {}
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed reads LOCAL_RANK, which only launchers set (not a plain `python` run)
    os.environ.setdefault(
        "LOCAL_RANK",
        str(
            int(os.environ.get("RANK", "0"))
            % max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
        ),
    )
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False
        )


__all__ = ["prepare_deepspeed"]
