"""TensorBoard scalars of --log-timers-to-tensorboard, --log-memory-to-tensorboard and
--log-optimizer-states-to-tensorboard, read back from the event files with TensorBoard's
EventAccumulator; --empty-unused-memory-level's calls of the accelerator's empty_cache.

Two in-process runs of pretrain_gpt.py in one spawned single-rank world: level 2 with
the three logging flags, then level 1 without them.
"""

from __future__ import annotations

import inspect
import re

import pytest

from ..dist_utils import run_distributed
from .gpt_runs import parse_log, pretrain_in_process, small_vocab_dataset, tiny_gpt_args

pytestmark = pytest.mark.slow

ITERS = 4
TIMERS = ("forward-backward-time", "backward-params-all-reduce-time",
          "backward-embedding-all-reduce-time", "optimizer-time")
OPTIMIZER_TAGS = [f"optimizer/{name}_{stat}"
                  for name in ("variance", "variance_sqrt", "momentum", "weight")
                  for stat in ("l2", "l1", "abs_max")]


def _args(data: str, level: int, tb: str | None) -> list[str]:
    args = tiny_gpt_args(data, "", ITERS)
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-type", "--eval-interval",
                 "--eval-iters"):
        i = args.index(flag)
        del args[i:i + 2]
    args += ["--vocab-size", "100", "--eval-interval", "2", "--eval-iters", "1",
             "--empty-unused-memory-level", str(level), "--log-params-norm"]
    if tb is not None:
        # the step timers are level 1 (--timing-log-level 0, the default, records none)
        args += ["--tensorboard-dir", tb, "--log-timers-to-tensorboard", "--timing-log-level", "1",
                 "--log-memory-to-tensorboard", "--log-optimizer-states-to-tensorboard"]
    return args


def _run_counting_empty_cache(args: list[str]) -> tuple[str, dict[str, int]]:
    """stdout of the run and {calling function: empty_cache calls}."""
    from megatron.accelerator import get_accelerator

    acc = get_accelerator()
    calls: dict[str, int] = {}

    def empty_cache():
        caller = inspect.stack()[2].function  # past training._empty_unused_memory
        calls[caller] = calls.get(caller, 0) + 1

    original = acc.empty_cache
    acc.empty_cache = empty_cache
    try:
        stdout = pretrain_in_process(args, "NullTokenizer")
    finally:
        acc.empty_cache = original
    return stdout, calls


def _scalars(tb: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _world(rank: int, world_size: int, data: str, tb: str) -> dict:
    out = {}
    out["level2"] = _run_counting_empty_cache(_args(data, 2, tb))
    out["level1"] = _run_counting_empty_cache(_args(data, 1, None))
    out["scalars"] = _scalars(tb)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb_logging")
    data = small_vocab_dataset(str(tmp))
    tb = str(tmp / "tb")
    return run_distributed(_world, 1, args=(data, tb), timeout=300)[0]


def _evaluations(stdout: str) -> int:
    return len(re.findall(r" validation loss at ", stdout))


def test_empty_cache_called_after_forward_backward_and_step(runs):
    for level, per_step in (("level2", 2), ("level1", 1)):
        stdout, calls = runs[level]
        assert sorted(parse_log(stdout)) == list(range(1, ITERS + 1)), stdout[-2000:]
        evaluations = _evaluations(stdout)  # at iterations 2 and 4, and after training
        assert evaluations >= 3, stdout[-2000:]
        # one call per forward-backward (training and each eval iteration), and at
        # level 2 one more after each optimizer step
        assert calls == {"train_step": per_step * ITERS, "evaluate": evaluations}, (level, calls)


def test_timer_scalars(runs):
    scalars = runs["scalars"]
    for tag in TIMERS:
        assert [s for s, _ in scalars[tag]] == list(range(1, ITERS + 1)), tag
        assert all(v >= 0.0 for _, v in scalars[tag]), tag
    # the forward-backward of a real model takes time; it is most of the step
    assert all(v > 0.0 for _, v in scalars["forward-backward-time"])


def test_memory_scalars(runs):
    scalars = runs["scalars"]
    for tag in ("mem-reserved-bytes", "mem-allocated-bytes"):
        assert [s for s, _ in scalars[tag]] == list(range(1, ITERS + 1)), tag
        assert all(v > 0 for _, v in scalars[tag]), tag


def test_optimizer_state_scalars(runs):
    scalars = runs["scalars"]
    for tag in OPTIMIZER_TAGS:
        assert [s for s, _ in scalars[tag]] == list(range(1, ITERS + 1)), tag
        assert [s for s, _ in scalars[tag + " vs tokens"]] == [
            it * 8 * 32 for it in range(1, ITERS + 1)], tag
        assert all(v > 0.0 for _, v in scalars[tag]), tag
    params_norm = dict(scalars["params-norm"])
    for i in range(ITERS):
        step, weight_l2 = scalars["optimizer/weight_l2"][i]
        # the optimizer's parameters are the model's (fp32): their norm is the params norm
        assert weight_l2 == pytest.approx(params_norm[step], rel=1e-5)
        # sum of sqrt(v)^2 is the sum of v (v >= 0): |sqrt v|_2^2 == |v|_1
        _, sqrt_l2 = scalars["optimizer/variance_sqrt_l2"][i]
        _, var_l1 = scalars["optimizer/variance_l1"][i]
        assert sqrt_l2**2 == pytest.approx(var_l1, rel=1e-5)
        _, sqrt_max = scalars["optimizer/variance_sqrt_abs_max"][i]
        _, var_max = scalars["optimizer/variance_abs_max"][i]
        assert sqrt_max**2 == pytest.approx(var_max, rel=1e-5)
        _, weight_max = scalars["optimizer/weight_abs_max"][i]
        assert weight_max <= weight_l2


def test_flagged_tags_are_exactly_these(runs):
    """The flags add the tags above and no other timer, memory or optimizer tag."""
    tags = set(runs["scalars"])
    flagged = set(TIMERS) | {"mem-reserved-bytes", "mem-allocated-bytes"} | set(
        OPTIMIZER_TAGS) | {t + " vs tokens" for t in OPTIMIZER_TAGS}
    assert flagged <= tags
    assert {"lm loss", "learning-rate", "params-norm", "iteration-time"} <= tags
    others = tags - flagged - {"iteration-time"}
    assert not any(t.startswith(("mem-", "optimizer/")) or t.endswith("-time")
                   for t in others), sorted(others)
