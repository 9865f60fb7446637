"""megatron/timers.py: --timing-log-level picks the timers recorded, --timing-log-option
how `log` reduces them over ranks (2 gloo ranks, each timing a different sleep)."""

from __future__ import annotations

import re
import time

import pytest

from megatron.timers import LOG_LEVELS, Timers

from ..dist_utils import run_distributed


class _Recorder:
    """add_scalar calls, as a TensorBoard writer receives them."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _world(rank: int, world_size: int) -> dict:
    out = {}
    for option in ("max", "minmax", "all"):
        for level in (0, 1, 2):
            timers = Timers(level, option)
            timers("interval-time").start()
            for _ in range(2):  # two iterations of (rank + 1) x 30 ms
                fb = timers("forward-backward")
                fb.start()
                time.sleep(0.03 * (rank + 1))
                fb.stop()
                gen = timers("batch-generator")
                gen.start()
                gen.stop()
            if rank == 0:  # a timer only one rank has
                timers("save-checkpoint").start()
                time.sleep(0.01)
                timers("save-checkpoint").stop()
            names = ["forward-backward", "batch-generator", "save-checkpoint"]
            recorder = _Recorder() if rank == world_size - 1 else None
            timers.write(names, recorder, 7, normalizer=2)
            text = timers.log(names, normalizer=2)
            out[(option, level)] = (text, recorder.scalars if recorder else None,
                                    sorted(timers.timers))
    return out


@pytest.fixture(scope="module")
def logs():
    return run_distributed(_world, 2, timeout=120)


def _ms(text: str, name: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
    return [float(v) for v in re.findall(r"\d+\.\d+", line.split(":", 1)[1])]


def test_levels_choose_the_timers_recorded(logs):
    assert LOG_LEVELS["interval-time"] == LOG_LEVELS["save-checkpoint"] == 0
    assert LOG_LEVELS["forward-backward"] == 1 and "batch-generator" not in LOG_LEVELS
    by_level = {level: logs[0][("minmax", level)][2] for level in (0, 1, 2)}
    assert by_level[0] == ["interval-time", "save-checkpoint"]
    assert by_level[1] == ["forward-backward", "interval-time", "save-checkpoint"]
    assert by_level[2] == ["batch-generator", "forward-backward", "interval-time",
                           "save-checkpoint"]
    # rank 1 at level 0 has no timer of these names: only rank 0's save-checkpoint
    text = logs[0][("minmax", 0)][0]
    assert "forward-backward" not in text and "save-checkpoint" in text


def test_minmax_max_and_all_reduce_over_ranks(logs):
    text = logs[1][("minmax", 1)][0]
    assert text.splitlines()[0] == "(min, max) time across ranks (ms):"
    low, high = _ms(text, "forward-backward")  # per iteration: 30 ms and 60 ms
    assert 29 <= low < 45 and 59 <= high < 80, text
    assert _ms(text, "save-checkpoint")[0] == _ms(text, "save-checkpoint")[1]  # one rank
    text = logs[1][("max", 1)][0]
    assert text.splitlines()[0] == "max time across ranks (ms):"
    (high,) = _ms(text, "forward-backward")
    assert 59 <= high < 80, text
    text = logs[1][("all", 2)][0]
    lines = text.splitlines()
    assert lines[0] == "times across ranks (ms):"
    i = lines.index("  forward-backward:")
    r0, r1 = (float(v.split(":")[1]) for v in lines[i + 1:i + 3])
    assert lines[i + 1].startswith("     rank  0:") and lines[i + 2].startswith("     rank  1:")
    assert 29 <= r0 < 45 and 59 <= r1 < 80, text
    # save-checkpoint: rank 0 only
    j = lines.index("  save-checkpoint:")
    assert lines[j + 1].startswith("     rank  0:") and (
        j + 2 == len(lines) or not lines[j + 2].startswith("     rank  1:"))


def test_write_is_the_slowest_rank_on_the_writer_rank(logs):
    scalars = logs[1][("minmax", 1)][1]
    tags = {tag: (value, step) for tag, value, step in scalars}
    assert set(tags) == {"forward-backward-time", "save-checkpoint-time"}
    value, step = tags["forward-backward-time"]
    assert step == 7 and 0.059 <= value < 0.08  # seconds per iteration, rank 1's
    assert logs[0][("minmax", 1)][1] is None  # rank 0 has no writer, but joined


def test_bad_level_or_option_refused():
    with pytest.raises(ValueError, match="--timing-log-level"):
        Timers(3, "max")
    with pytest.raises(ValueError, match="--timing-log-option"):
        Timers(0, "median")
    with pytest.raises(RuntimeError, match="above --timing-log-level"):
        Timers(0, "max")("forward-backward").elapsed()
