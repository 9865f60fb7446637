"""--wandb-project/--wandb-exp-name/--wandb-save-dir (the real wandb client, offline),
--timing-log-level/--timing-log-option, --log-world-size-to-tensorboard and --profile
with --profile_steps/--profile-ranks, in one pretrain_gpt.py run on 2 gloo ranks.

The wandb run is read back from its .wandb file (a LevelDB-style log of wandb's own
protobuf Records); the TensorBoard scalars with TensorBoard's EventAccumulator; the
profiler trace as the Chrome trace JSON that TensorBoard and Perfetto open.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest

from ..dist_utils import run_distributed
from .gpt_runs import parse_log, pretrain_in_process, small_vocab_dataset, tiny_gpt_args

pytestmark = pytest.mark.slow

ITERS = 4


def _args(data: str, tmp: str) -> list[str]:
    args = tiny_gpt_args(data, "", ITERS)
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-type", "--eval-interval",
                 "--eval-iters", "--log-interval"):
        i = args.index(flag)
        del args[i:i + 2]
    return args + [
        "--vocab-size", "100", "--eval-interval", "100", "--eval-iters", "1",
        "--log-interval", "2",
        "--tensorboard-dir", os.path.join(tmp, "tb"), "--log-timers-to-tensorboard",
        "--log-world-size-to-tensorboard",
        "--timing-log-level", "1", "--timing-log-option", "minmax",
        "--wandb-project", "tiny-gpt", "--wandb-exp-name", "flags-run",
        "--wandb-save-dir", os.path.join(tmp, "wandb"),
        "--profile", "pt", "--profile_steps", "2,3", "--profile-ranks", "1",
    ]


def _world(rank: int, world_size: int, data: str, tmp: str) -> str:
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    from megatron.global_vars import reset_global_variables

    try:
        return pretrain_in_process(_args(data, tmp), "NullTokenizer")
    finally:
        reset_global_variables()  # closes the writer: the wandb run finishes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("logging_profiling"))
    data = small_vocab_dataset(tmp)
    out = run_distributed(_world, 2, args=(data, tmp), timeout=300)
    return tmp, out


def _wandb_records(path: str):
    """wandb's protobuf Records of a .wandb file: a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle,
    last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_run_trains_and_prints_the_timers_on_the_last_rank(run):
    _, out = run
    assert sorted(parse_log(out[1])) == [2, 4], out[1][-3000:]
    assert "(min, max) time across ranks (ms):" not in out[0]
    lines = out[1].splitlines()
    # the setup timers once, then the step timers after each of the 2 log lines
    starts = [i for i, line in enumerate(lines) if line == "(min, max) time across ranks (ms):"]
    assert len(starts) == 3, out[1][-3000:]
    assert lines[starts[0] + 1].split()[0] == "model-and-optimizer-setup"
    assert lines[starts[1] - 1].startswith(" iteration        2/")
    names = []
    for line in lines[starts[1] + 1:]:
        if not line.startswith("    "):
            break
        names.append(line.split()[0])
    # level 1: the step's phases, not the level-2 batch generator
    assert "forward-backward" in names and "optimizer" in names, names
    assert "batch-generator" not in names
    assert "> flash attention" not in out[1]


def test_world_size_and_timers_in_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = run
    acc = EventAccumulator(os.path.join(tmp, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    world = [(e.step, e.value) for e in acc.Scalars("world-size")]
    assert world == [(i, 2.0) for i in range(1, ITERS + 1)]
    assert [e.value for e in acc.Scalars("world-size vs samples")] == [2.0] * ITERS
    assert all(e.value > 0 for e in acc.Scalars("forward-backward-time"))


def test_wandb_offline_run_holds_the_tensorboard_scalars(run):
    tmp, out = run
    runs = glob.glob(os.path.join(tmp, "wandb", "wandb", "offline-run-*"))
    assert len(runs) == 1, runs  # the last rank's only
    assert "> wandb: logging to project 'tiny-gpt', run 'flags-run'" in out[1]
    assert "> wandb:" not in out[0]
    (path,) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    rows, config, name = {}, {}, None
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            rows.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":
            name, project = record.run.display_name, record.run.project
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                           for i in record.run.config.update})
    assert (name, project) == ("flags-run", "tiny-gpt")
    assert config["num_layers"] == 2 and config["world_size"] == 2
    assert sorted(rows) == list(range(1, ITERS + 1)), sorted(rows)
    for step in range(1, ITERS + 1):
        row = rows[step]
        for key in ("lm loss", "learning-rate", "loss-scale", "grad-norm", "world-size",
                    "lm loss vs samples", "learning-rate vs samples", "samples"):
            assert key in row, (step, sorted(row))
        assert row["world-size"] == 2 and row["samples"] == 8 * step
    assert rows[2]["forward-backward-time"] > 0 and "forward-backward-time" in rows[4]
    # the same values as the log line
    log = parse_log(out[1])
    assert rows[4]["learning-rate"] == pytest.approx(float(log[4]["lr"]), rel=1e-3)


def test_profile_trace_for_the_chosen_rank_and_steps(run):
    tmp, out = run
    traces = glob.glob(os.path.join(tmp, "tb", "*.pt.trace.json"))
    assert [os.path.basename(p).split(".")[0] for p in traces] == ["rank1"], traces
    assert "wrote the trace of local steps 2..3" in out[1]
    assert "> profile:" not in out[0]
    with open(traces[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert len(steps) == 2, steps  # two profiled steps
    ops = {e["name"] for e in events if e.get("cat") == "cpu_op"}
    # the forward's GEMMs and the backward's autograd functions were recorded
    assert {"aten::mm", "aten::addmm"} & ops, sorted(ops)[:40]
    assert any(op.startswith("autograd::engine::evaluate_function") for op in ops)
