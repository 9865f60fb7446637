"""--profile pt|pt-full: torch.profiler traces of chosen training steps on chosen ranks.

The window is Megatron-DeepSpeed's --profile_steps "<first>,<last>" (steps of this run,
counted from 1, both included; default 2,3), or Megatron-LM's --profile-step-start S
--profile-step-end E (the iterations after S up to E: S + 1 .. E of the global count).
--profile-ranks limits it to those ranks (all by default). pt records the operators (CPU,
and the GPU kernels on CUDA); pt-full adds the Python call stacks.

Each profiled rank writes one Chrome trace, <--tensorboard-dir>/rank<R>.<ms>.pt.trace.json,
when its window ends: TensorBoard's profiler plugin lists it under that folder, and
Perfetto (ui.perfetto.dev) or chrome://tracing open it directly.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def profile_window(args: argparse.Namespace) -> tuple[str, int, int]:
    """("local", first, last) steps of this run, or ("global", first, last) iterations,
    both ends included."""
    start = getattr(args, "profile_step_start", None)
    end = getattr(args, "profile_step_end", None)
    if start is not None or end is not None:
        return "global", start + 1, end
    first, last = (int(v) for v in args.profile_steps.split(","))
    return "local", first, last


class StepProfiler:
    """Calls around each training step: `begin(iteration)` before it (iteration: the
    global number of the step about to run, from 1), `end()` after it."""

    def __init__(self, args: argparse.Namespace, rank: int, device_type: str):
        self.enabled = bool(args.profile) and (
            args.profile_ranks is None or rank in args.profile_ranks)
        self.rank = rank
        self.out_dir = args.tensorboard_dir
        self.kind, self.first, self.last = profile_window(args) if args.profile else ("", 0, 0)
        self.full = args.profile == "pt-full"
        self.device_type = device_type
        self.steps = 0  # steps of this run
        self.profiler: torch.profiler.profile | None = None
        self.path: str | None = None
        self._current = 0

    def _in_window(self, count: int) -> bool:
        return self.first <= count <= self.last

    def begin(self, iteration: int) -> None:
        if not self.enabled:
            return
        self.steps += 1
        self._current = self.steps if self.kind == "local" else iteration
        if self.profiler is None and self.path is None and self._in_window(self._current):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # every step of the window recorded (and marked "ProfilerStep#<k>"), then
            # one trace written
            schedule = torch.profiler.schedule(
                wait=0, warmup=0, active=self.last - self._current + 1, repeat=1)
            self.profiler = torch.profiler.profile(
                activities=activities, schedule=schedule, on_trace_ready=self._export,
                record_shapes=self.full, with_stack=self.full)
            self.profiler.start()

    def end(self) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if self._current >= self.last:
            self.finish()

    def finish(self) -> None:
        """Stop, writing the trace if the window's last step did not (training ended
        inside the window)."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None

    def _export(self, profiler: torch.profiler.profile) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(
            self.out_dir, f"rank{self.rank}.{int(time.time() * 1000)}.pt.trace.json")
        profiler.export_chrome_trace(self.path)
        print(f"> profile: rank {self.rank} wrote the trace of {self.kind} steps {self.first}.."
              f"{self.last} to {self.path}", flush=True)


def step_profiler(args: argparse.Namespace) -> StepProfiler:
    """The profiler of this rank for the training loop."""
    from .accelerator import current_device

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return StepProfiler(args, rank, current_device().type)
