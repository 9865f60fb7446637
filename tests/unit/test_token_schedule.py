"""The token-based schedule: --train-tokens, --lr-warmup-tokens, --lr-decay-tokens.

AnnealingLR counted in tokens (formula, curriculum lengths, a warm-up in steps before a
token decay, checkpoint round trip), the flag validation, and one short pretrain_gpt.py
run that stops at the token budget, logs the learning rates of the formula and, resumed
from its iteration-4 checkpoint, carries on the same token schedule.
"""

from __future__ import annotations

import math
import os
import re
import shlex

import pytest
import torch

from megatron.arguments import ArgumentError, build_parser, validate_args
from megatron.learning_rates import AnnealingLR

B, S = 8, 32  # global batch, sequence length
MAX_LR, MIN_LR = 1.0, 0.1


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def _lr(sched) -> float:
    return sched.optimizer.param_groups[0]["lr"]


def _token_sched(style="cosine", warmup_tokens=2 * B * S, decay_tokens=12 * B * S,
                 warmup_steps=0, **kwargs):
    return AnnealingLR(_optimizer(), MAX_LR, MIN_LR, warmup_steps, 10**9, style,
                       warmup_tokens=warmup_tokens, decay_tokens=decay_tokens,
                       tokens_per_sample=S, **kwargs)


def _expected(t: float, warmup: float, decay: float, style: str) -> float:
    if t <= warmup:
        return MAX_LR * t / warmup
    if t > decay:
        return MIN_LR
    ratio = (t - warmup) / (decay - warmup)
    coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return MIN_LR + (MAX_LR - MIN_LR) * coeff


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_token_schedule_equals_iteration_schedule_at_fixed_length(style):
    """W x B x s warm-up and D x B x s decay tokens give the learning rates of W warm-up
    and D decay iterations (steps counted in samples, as training does for --train-iters)."""
    by_iters = AnnealingLR(_optimizer(), MAX_LR, MIN_LR, 2 * B, 12 * B, style)
    by_tokens = _token_sched(style)
    assert _lr(by_tokens) == _lr(by_iters) == 0.0
    for it in range(1, 16):
        by_iters.step(increment=B)
        by_tokens.step(increment=B)
        assert by_tokens.num_tokens == it * B * S
        assert _lr(by_tokens) == pytest.approx(_lr(by_iters), abs=1e-12), it
        assert _lr(by_tokens) == pytest.approx(
            _expected(it * B * S, 2 * B * S, 12 * B * S, style), abs=1e-12)


def test_curriculum_lengths_count_their_tokens():
    """With a sequence-length curriculum each step adds increment x current length."""
    sched = _token_sched("linear", warmup_tokens=1000, decay_tokens=10_000)
    tokens = 0
    for length in (8, 8, 16, 16, 32, 32, 32, 32, 32, 32):
        sched.set_tokens_per_sample(length)
        sched.step(increment=B)
        tokens += B * length
        assert sched.num_tokens == tokens
        assert _lr(sched) == pytest.approx(_expected(tokens, 1000, 10_000, "linear"))
    assert sched.num_steps == 10 * B


def test_warmup_in_steps_then_token_decay():
    """--lr-warmup-iters/-samples with --lr-decay-tokens: the decay starts from the tokens
    consumed when the warm-up ended."""
    sched = _token_sched("linear", warmup_tokens=None, decay_tokens=10 * B * S,
                         warmup_steps=2 * B)
    sched.step(increment=B)
    assert _lr(sched) == pytest.approx(0.5)
    sched.step(increment=B)
    assert _lr(sched) == pytest.approx(1.0) and sched.warmup_end_tokens == 2 * B * S
    for it in range(3, 13):
        sched.step(increment=B)
        ratio = min(1.0, (it - 2) / 8)  # the token decay ends at iteration 10
        assert _lr(sched) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * (1 - ratio)), it
    # no warm-up at all: the token decay starts at 0
    sched = _token_sched("linear", warmup_tokens=None, decay_tokens=10 * B * S)
    sched.step(increment=5 * B)
    assert _lr(sched) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * 0.5)


def test_state_dict_resumes_the_token_schedule():
    whole = _token_sched()
    first = _token_sched()
    for _ in range(5):
        whole.step(increment=B)
        first.step(increment=B)
    sd = first.state_dict()
    assert sd["num_tokens"] == 5 * B * S
    assert sd["lr_warmup_tokens"] == 2 * B * S and sd["lr_decay_tokens"] == 12 * B * S
    resumed = _token_sched(use_checkpoint_lr_scheduler=False)
    resumed.load_state_dict(sd)
    assert resumed.num_tokens == 5 * B * S and _lr(resumed) == pytest.approx(_lr(whole))
    for _ in range(6):
        whole.step(increment=B)
        resumed.step(increment=B)
        assert _lr(resumed) == pytest.approx(_lr(whole), abs=1e-12)
    other = _token_sched(decay_tokens=20 * B * S, use_checkpoint_lr_scheduler=False)
    with pytest.raises(ValueError, match="decay tokens value 5120 differs from checkpoint "
                                         "value 3072"):
        other.load_state_dict(sd)
    # a schedule without tokens saves Megatron's keys only
    plain = AnnealingLR(_optimizer(), MAX_LR, MIN_LR, 10, 100, "linear")
    assert "num_tokens" not in plain.state_dict()


def test_bad_token_schedules_are_clear():
    with pytest.raises(ValueError, match="--lr-warmup-tokens needs --lr-decay-tokens"):
        _token_sched(decay_tokens=None)
    with pytest.raises(ValueError, match=r"--lr-warmup-tokens \(100\) must be smaller"):
        _token_sched(warmup_tokens=100, decay_tokens=100)


BASE = ("--num-layers 2 --hidden-size 8 --num-attention-heads 2 --max-position-embeddings 16 "
        "--seq-length 16 --micro-batch-size 1 --train-iters 4")


def _validate(flags: str, base: str = BASE):
    args = build_parser().parse_args(shlex.split(base + " " + flags))
    return validate_args(args, world_size=1, rank=1)


def test_token_flag_validation():
    args = _validate("--train-tokens 100 --lr-decay-tokens 64 --lr-warmup-tokens 16")
    assert (args.train_tokens, args.lr_decay_tokens, args.lr_warmup_tokens) == (100, 64, 16)
    assert args.consumed_train_tokens == 0
    no_length = BASE.replace("--train-iters 4", "")
    for flags, message, base in (
        ("--train-tokens 100", "--train-tokens needs --train-iters or --train-samples",
         no_length),
        ("--train-tokens 0", r"--train-tokens must be >= 1 \(got 0\)", BASE),
        ("--lr-decay-tokens 0", r"--lr-decay-tokens must be >= 1 \(got 0\)", BASE),
        ("--lr-warmup-tokens 16", r"--lr-warmup-tokens \(16\) needs --lr-decay-tokens", BASE),
        ("--lr-warmup-tokens 64 --lr-decay-tokens 64",
         r"--lr-warmup-tokens \(64\) must be smaller than --lr-decay-tokens \(64\)", BASE),
        ("--lr-warmup-tokens 8 --lr-decay-tokens 64 --lr-warmup-iters 2",
         r"--lr-warmup-tokens \(8\) and --lr-warmup-iters \(2\) both given", BASE),
        ("--lr-warmup-tokens 8 --lr-decay-tokens 64 --lr-warmup-fraction 0.1",
         r"--lr-warmup-tokens \(8\) and --lr-warmup-fraction \(0.1\) both given", BASE),
    ):
        with pytest.raises(ArgumentError, match=message):
            _validate(flags, base)


# ----------------------------------------------------------------------------------------
# One short pretrain_gpt.py run (and its resume).
# ----------------------------------------------------------------------------------------

TOKENS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \| "
                       r"consumed tokens:\s+(\d+) \|.*?learning rate: ([0-9.E+-]+) \|")
PER_ITER = B * S  # tokens per iteration of tiny_gpt_args (global batch 8, seq length 32)
WARMUP, DECAY, BUDGET = 2 * PER_ITER, 12 * PER_ITER, 7 * PER_ITER + 1


def _token_run_args(data: str) -> list[str]:
    from tests.functional.gpt_runs import tiny_gpt_args

    args = tiny_gpt_args(data, "", 20)
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-type", "--lr-warmup-iters"):
        i = args.index(flag)
        del args[i:i + 2]
    return args + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                   "--eval-iters", "0", "--train-tokens", str(BUDGET),
                   "--lr-warmup-tokens", str(WARMUP), "--lr-decay-tokens", str(DECAY)]


def _rows(stdout: str) -> dict[int, tuple[int, int, str]]:
    return {int(m.group(1)): (int(m.group(2)), int(m.group(3)), m.group(4))
            for m in TOKENS_RE.finditer(stdout)}


@pytest.mark.slow
def test_pretrain_stops_at_train_tokens_and_resumes_the_schedule(tmp_path):
    from tests.functional.gpt_runs import run_pretrain, small_vocab_dataset

    data = small_vocab_dataset(str(tmp_path))
    save = str(tmp_path / "ckpt")
    args = _token_run_args(data)
    first = run_pretrain(args + ["--save", save, "--save-interval", "4"])
    rows = _rows(first.stdout)
    # 7 iterations hold 1792 tokens < 1793; the 8th reaches the budget, before --train-iters 20
    assert sorted(rows) == list(range(1, 9)), first.stdout[-3000:]
    for it, (samples, tokens, lr) in rows.items():
        assert samples == it * B and tokens == it * PER_ITER
        t = it * PER_ITER  # --lr 0.001 --min-lr 0.0001 --lr-decay-style cosine
        if t <= WARMUP:
            expected = 1e-3 * t / WARMUP
        else:
            ratio = (t - WARMUP) / (DECAY - WARMUP)
            expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (math.cos(math.pi * ratio) + 1.0)
        assert lr == f"{expected:.3E}", (it, lr, expected)
    state = torch.load(os.path.join(save, "iter_0000004", "mp_rank_00", "model_optim_rng.pt"),
                       map_location="cpu", weights_only=False)
    assert state["consumed_train_tokens"] == 4 * PER_ITER
    assert state["lr_scheduler"]["num_tokens"] == 4 * PER_ITER

    resumed = run_pretrain(args + ["--load", save, "--load-tag", "4"])
    again = _rows(resumed.stdout)
    assert sorted(again) == [5, 6, 7, 8], resumed.stdout[-3000:]
    assert all(again[it] == rows[it] for it in again), (again, rows)
