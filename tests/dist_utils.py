"""Run a function on several ranks inside one test: CPU ranks with the gloo backend, or
(backend="nccl", tests/gpu) one rank per GPU.

    def _check(rank, world_size, tp):          # module-level, so spawn can pickle it
        ...assertions...

    def test_something():
        run_distributed(_check, world_size=4, args=(2,))

Each rank is a fresh process (spawn) with RANK/WORLD_SIZE/MASTER_* set and a process
group initialised. An exception on any rank fails the test with that rank's
traceback; a rank that has not finished after `timeout` seconds fails it too (a hang
is a failure, never a stuck CI job).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn, world_size: int, args: tuple = (), timeout: float = 180.0, backend: str = "gloo"
):
    """Run fn(rank, world_size, *args) on `world_size` ranks (gloo; or nccl, rank r on
    GPU r); return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(fn, r, world_size, port, args, queue, backend), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as _queue
    import time

    deadline = time.time() + timeout
    while len(results) + len(errors) < world_size:
        remaining = deadline - time.time()
        if remaining <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(remaining, 1.0))
        except _queue.Empty:
            if errors or any(p.exitcode not in (None, 0) for p in procs):
                # a rank died without reporting (segfault, OOM); give the others a moment
                if time.time() > deadline - timeout + 5 and all(
                    p.exitcode is not None for p in procs
                ):
                    break
            continue
        (results if status == "ok" else errors)[rank] = payload
        if errors:
            # one rank failed: the others may block forever in a collective
            deadline = min(deadline, time.time() + 10)
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(
            f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s "
            f"(exit codes {codes}): hang or crash"
        )
    return [results[r] for r in range(world_size)]
