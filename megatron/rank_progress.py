"""Where each rank is, so that a collective that times out can name the rank it waited for.

Every rank publishes its position ("iteration 12: forward-backward") in the job's
torch.distributed store before each step of the loop. When a collective times out
(--distributed-timeout-minutes), `named_timeouts()` reads all positions and raises
DistributedTimeoutError naming the ranks that are behind this one and where they are.
"""

from __future__ import annotations

import contextlib
import datetime

import torch

from .errors import DistributedTimeoutError

_KEY = "megatron_progress/{}"
_STATE = {"seq": 0, "where": "start-up"}


def _store():
    if not torch.distributed.is_initialized():
        return None
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def mark(where: str) -> None:
    """Publish this rank's position; a sequence number orders the positions."""
    _STATE["seq"] += 1
    _STATE["where"] = where
    store = _store()
    if store is None or torch.distributed.get_world_size() == 1:
        return
    try:
        store.set(_KEY.format(torch.distributed.get_rank()), f"{_STATE['seq']}|{where}")
    except RuntimeError:
        pass  # the store is gone: the job is ending anyway


def _positions(world_size: int) -> dict[int, tuple[int, str]]:
    """{rank: (sequence number, position)} of the ranks that published one."""
    store = _store()
    found = {}
    if store is None:
        return found
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
    except (RuntimeError, AttributeError):
        pass
    for rank in range(world_size):
        key = _KEY.format(rank)
        try:
            if store.check([key]):
                seq, _, where = store.get(key).decode().partition("|")
                found[rank] = (int(seq), where)
        except (RuntimeError, ValueError):
            continue
    return found


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_stall(exc: BaseException, timeout_minutes: float) -> str:
    """One line: which collective timed out here and which ranks did not answer."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    me = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    positions = _positions(world)
    seq = _STATE["seq"]
    behind = [f"rank {r} (still at '{where}')" for r, (s, where) in sorted(positions.items())
              if r != me and s < seq]
    silent = [str(r) for r in range(world) if r != me and r not in positions and seq > 0]
    if silent:
        behind.append(f"rank(s) {', '.join(silent)} (never reported)")
    who = "; ".join(behind) if behind else "no rank is behind this one (the stall is inside it)"
    cause = " ".join(str(exc).split())[:200]
    return (f"rank {me}: a collective in '{_STATE['where']}' timed out after "
            f"--distributed-timeout-minutes {timeout_minutes:g}; did not answer: {who} "
            f"[{cause}]")


@contextlib.contextmanager
def named_timeouts(timeout_minutes: float):
    """Turn a collective's timeout into DistributedTimeoutError naming the stalled ranks."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, DistributedTimeoutError) or not is_timeout(exc):
            raise
        raise DistributedTimeoutError(describe_stall(exc, timeout_minutes)) from exc
