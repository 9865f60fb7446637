"""All-reduce bandwidth over the GPUs of one host, as the tensor-parallel layers use it.

    torchrun --nproc_per_node 2 tools/bench/bench_allreduce.py [--sizes-mb 1,16,64,256]

bf16 tensors, in-place torch.distributed.all_reduce on NCCL; rank 0 prints per size the
mean time and the bus bandwidth 2(n-1)/n * bytes / time (the NCCL-tests convention).
Environment variables such as NCCL_PROTO or NCCL_ALGO change what NCCL picks.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="1,4,16,64,256")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    n = dist.get_world_size()
    for mb in (int(x) for x in a.sizes_mb.split(",")):
        x = torch.ones(mb * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / a.iters
        busbw = 2 * (n - 1) / n * x.numel() * 2 / sec / 1e9
        if dist.get_rank() == 0:
            env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
            row = {"size_mb": mb, "ms": sec * 1e3, "busbw_GBps": busbw, "ranks": n, "env": env}
            print("RESULT " + json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
