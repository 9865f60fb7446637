"""pretrain_gpt.py --use-distributed-optimizer on CPU gloo ranks: equal to the local DDP
with the unsharded optimizer, resumed exactly at the same data-parallel size, and resumed
at another one.

The tiny GPT of tests/functional/gpt_runs.tiny_gpt_args (2 layers, hidden 64, fp32,
dropout 0, --clip-grad 1.0, AdamW with weight decay) on the NullTokenizer's 128 ids,
global batch 8, micro-batch 2, 6 iterations; --make-vocab-size-divisible-by 128 / TP keeps
one padded vocabulary for every layout. Two spawned worlds run pretrain() in process:

* 2 ranks (DP=2): the local DDP, saving at iteration 3, and the distributed optimizer
  resumed from that plain checkpoint; the distributed optimizer, saving at iteration 3 (and
  6); a resume from iteration 3 (--load-tag 3); and the local DDP refused on that
  checkpoint.
* 4 ranks: a DP=4 resume from the DP=2 checkpoint of iteration 3 (the sharded state
  re-split for 4 ranks); TP=2 x DP=2 with and without the distributed optimizer; and the
  interleaved pipeline PP=2 x DP=2 (4 layers, 2 model chunks per stage, so 2 gradient
  buffers per rank and the tied embedding's gradient summed across stages before the
  reduce-scatter) with and without it, saving at iteration 3, and resumed from there.

Sharding changes only the order of floating-point sums (reduce-scatter versus all-reduce,
the grad norm summed over shards), so the printed 7-digit losses agree within REL_TOL
relative; the resume at the same DP size must print the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..dist_utils import run_distributed
from .gpt_runs import parse_log, pretrain_in_process, small_vocab_dataset, tiny_gpt_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ITERS = 6
SAVE_AT = 3
REL_TOL = 2e-5
DISTOPT = ["--use-distributed-optimizer"]
INTERLEAVED = ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
               "--num-layers-per-virtual-pipeline-stage", "1"]


def _args(data: str, tp: int = 1, extra: list[str] | None = None) -> list[str]:
    args = tiny_gpt_args(data, "", ITERS)
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i : i + 2]
    for flag, value in (("--hidden-dropout", "0"), ("--attention-dropout", "0"),
                        ("--micro-batch-size", "2"), ("--eval-interval", "100")):
        args[args.index(flag) + 1] = value
    return args + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--make-vocab-size-divisible-by", str(128 // tp), "--use-cpu-initialization",
        "--tensor-model-parallel-size", str(tp)] + (extra or [])  # fmt: skip


def _run(data: str, tp: int = 1, extra: list[str] | None = None) -> dict[int, float]:
    """{iteration: printed lm loss} of one in-process pretrain_gpt.py run."""
    out = pretrain_in_process(_args(data, tp, extra), "NullTokenizer")
    torch.distributed.barrier()
    return {i: row["loss"] for i, row in parse_log(out).items()}


def _two_ranks(rank: int, world_size: int, data: str, save: str) -> dict:
    from megatron.checkpointing import CheckpointError

    ddp_save = save + "_ddp"
    runs = {
        "ddp": _run(data, extra=["--save", ddp_save, "--save-interval", str(SAVE_AT)]),
        # the unsharded optimizer state of a plain checkpoint, sharded on load
        "ddp_to_distopt": _run(data, extra=DISTOPT + ["--load", ddp_save, "--load-tag",
                                                      str(SAVE_AT)]),
        "distopt": _run(data, extra=DISTOPT + ["--save", save, "--save-interval", str(SAVE_AT)]),
        "resume": _run(data, extra=DISTOPT + ["--load", save, "--load-tag", str(SAVE_AT)]),
    }
    with pytest.raises(CheckpointError) as info:
        _run(data, extra=["--load", save])
    runs["refused"] = str(info.value)
    return runs


def _four_ranks(rank: int, world_size: int, data: str, save: str) -> dict:
    pp_save = save + "_pp2"
    return {
        "dp4_resume": _run(data, extra=DISTOPT + ["--load", save, "--load-tag", str(SAVE_AT)]),
        "tp2_ddp": _run(data, tp=2),
        "tp2_distopt": _run(data, tp=2, extra=DISTOPT),
        "pp2_ddp": _run(data, extra=INTERLEAVED),
        "pp2_distopt": _run(data, extra=INTERLEAVED + DISTOPT + [
            "--save", pp_save, "--save-interval", str(SAVE_AT)]),
        "pp2_resume": _run(data, extra=INTERLEAVED + DISTOPT + [
            "--load", pp_save, "--load-tag", str(SAVE_AT)]),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distopt")
    data = small_vocab_dataset(str(tmp))
    save = str(tmp / "ckpt")
    two = run_distributed(_two_ranks, 2, args=(data, save), timeout=600)[-1]  # the last rank logs
    four = run_distributed(_four_ranks, 4, args=(data, save), timeout=600)[-1]
    return {"save": save, **two, **four}


def _assert_close(losses: dict, reference: dict, iterations) -> None:
    for i in iterations:
        a, b = float(losses[i]), float(reference[i])
        assert abs(a - b) <= REL_TOL * abs(b), (i, losses[i], reference[i])


def test_distributed_optimizer_equals_ddp(runs):
    iters = range(1, ITERS + 1)
    assert sorted(runs["ddp"]) == list(iters), runs["ddp"]
    _assert_close(runs["distopt"], runs["ddp"], iters)
    _assert_close(runs["tp2_distopt"], runs["tp2_ddp"], iters)
    _assert_close(runs["tp2_ddp"], runs["ddp"], iters)  # the same model at every layout
    _assert_close(runs["pp2_distopt"], runs["pp2_ddp"], iters)
    assert float(runs["ddp"][ITERS]) < float(runs["ddp"][1]) - 0.05  # it learns


def test_distributed_optimizer_checkpoint_files(runs):
    folder = os.path.join(runs["save"], f"iter_{SAVE_AT:07d}", "mp_rank_00")
    assert sorted(os.listdir(folder)) == ["distrib_optim.pt", "model_optim_rng.pt"]
    shards = torch.load(os.path.join(folder, "distrib_optim.pt"), weights_only=False)
    meta = shards["metadata"]
    assert meta["data_parallel_size"] == 2 and meta["element_state_keys"] == [
        "exp_avg", "exp_avg_sq"]
    (world,) = shards[0].values()  # one fp32 gradient buffer of model chunk 0
    numel = meta["numel"][0][torch.float32]
    assert world["param"].numel() % (128 * 2) == 0 and world["param"].numel() >= numel
    assert float(world["exp_avg_sq"][:numel].min()) >= 0.0
    assert torch.count_nonzero(world["exp_avg"][numel:]) == 0  # the padding
    state = torch.load(os.path.join(folder, "model_optim_rng.pt"), weights_only=False)
    assert "state" not in state["optimizer"]["optimizer"]  # per-element state is sharded
    assert state["optimizer"]["distributed_optimizer"] == {"data_parallel_size": 2}
    for stage in (0, 1):  # the interleaved pipeline: both chunks of each stage
        pp_folder = os.path.join(runs["save"] + "_pp2", f"iter_{SAVE_AT:07d}",
                                 f"mp_rank_00_{stage:03d}")
        pp_shards = torch.load(os.path.join(pp_folder, "distrib_optim.pt"), weights_only=False)
        assert sorted(k for k in pp_shards if k != "metadata") == [0, 1]


def test_distributed_optimizer_resumes_exactly_and_at_another_dp_size(runs):
    after = range(SAVE_AT + 1, ITERS + 1)
    assert sorted(runs["resume"]) == list(after), runs["resume"]
    for i in after:  # the same DP size: exactly the uninterrupted run
        assert runs["resume"][i] == runs["distopt"][i], (i, runs["resume"], runs["distopt"])
    assert sorted(runs["pp2_resume"]) == list(after), runs["pp2_resume"]
    for i in after:  # two model chunks per rank: two buffers in distrib_optim.pt
        assert runs["pp2_resume"][i] == runs["pp2_distopt"][i], (i, runs["pp2_resume"])
    assert sorted(runs["dp4_resume"]) == list(after)
    assert sorted(runs["ddp_to_distopt"]) == list(after)
    _assert_close(runs["ddp_to_distopt"], runs["ddp"], after)
    _assert_close(runs["dp4_resume"], runs["distopt"], after)
    assert "--use-distributed-optimizer" in runs["refused"]
    assert "model_optim_rng.pt" in runs["refused"]
