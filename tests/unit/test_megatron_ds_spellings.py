"""Megatron-DeepSpeed's current flag spellings: the opt_param-scheduler flags, the older
--activations-checkpoint-method, the flash-attention variants, the inverse-square-root
decay, and --onnx-safe / --lazy-mpu-init taking a value. Each is checked where it acts:
the scheduler, the recompute resolution, the attention kernel, the MLP activation."""

from __future__ import annotations

import math
import shlex

import pytest
import torch

from megatron import global_vars
from megatron.arguments import ArgumentError, build_parser, validate_args
from megatron.learning_rates import AnnealingLR

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --train-iters 100 --lr 1.0 "
        "--min-lr 0.01")


@pytest.fixture(scope="module", autouse=True)
def _import_deepspeed_once():
    build_parser()  # DeepSpeed logs its device detection on import


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    global_vars.reset_global_variables()


def _validate(flags: str, world_size: int = 1):
    args = build_parser().parse_args(shlex.split(f"{BASE} {flags}"))
    return validate_args(args, world_size=world_size, rank=0)


def _scheduler(flags: str) -> AnnealingLR:
    """The scheduler training.py builds from these flags (through get_args())."""
    from megatron.training import get_learning_rate_scheduler

    args = _validate(flags)
    global_vars.set_args(args)
    param = torch.nn.Parameter(torch.zeros(2))
    return get_learning_rate_scheduler(torch.optim.SGD([param], lr=0.0))


# ----------------------------------------------------------------------------------------
# --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("new,old,dest", [
    ("--override-opt_param-scheduler", "--override-lr-scheduler", "override_lr_scheduler"),
    ("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-lr-scheduler",
     "use_checkpoint_lr_scheduler"),
])
def test_scheduler_flags_both_spellings_one_dest(new, old, dest):
    for flag in (new, old):
        assert getattr(_validate(flag), dest) is True
    assert getattr(_validate(""), dest) is False


def test_scheduler_flags_decide_what_a_checkpoint_restores():
    saved = _scheduler("--lr-decay-style cosine")
    saved.step(30)
    state = saved.state_dict()
    flags = "--lr 0.5 --lr-decay-style linear"
    # neither flag: a different schedule is an error naming the flags to pass
    with pytest.raises(ValueError, match="--override-opt_param-scheduler or "
                       "--use-checkpoint-opt_param-scheduler"):
        _scheduler(flags).load_state_dict(state)
    override = _scheduler(f"{flags} --override-opt_param-scheduler")
    override.load_state_dict(state)
    assert (override.max_lr, override.decay_style, override.num_steps) == (0.5, "linear", 30)
    assert override.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.01 + 0.49 * (1 - 30 / 200))  # 100 iterations of 2 samples
    from_ckpt = _scheduler(f"{flags} --use-checkpoint-opt_param-scheduler")
    from_ckpt.load_state_dict(state)
    assert (from_ckpt.max_lr, from_ckpt.decay_style) == (1.0, "cosine")
    assert from_ckpt.optimizer.param_groups[0]["lr"] == pytest.approx(saved.get_lr())
    with pytest.raises(ValueError, match="mutually exclusive"):
        _scheduler("--override-opt_param-scheduler --use-checkpoint-lr-scheduler")


# ----------------------------------------------------------------------------------------
# --activations-checkpoint-method
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,want", [
    # flags -> (granularity, method, num_layers, checkpoint_activations)
    ("--activations-checkpoint-method uniform", ("full", "uniform", 1, True)),
    ("--activations-checkpoint-method block --recompute-num-layers 2",
     ("full", "block", 2, True)),
    ("--checkpoint-activations --activations-checkpoint-method uniform",
     ("full", "uniform", 1, True)),
    ("--recompute-granularity full --activations-checkpoint-method block "
     "--recompute-method block", ("full", "block", 1, True)),
])
def test_activations_checkpoint_method_is_recompute_method(flags, want):
    args = _validate(flags)
    got = (args.recompute_granularity, args.recompute_method, args.recompute_num_layers,
           args.checkpoint_activations)
    assert got == want
    again = validate_args(args, world_size=1, rank=0)  # the planner validates twice
    assert (again.recompute_granularity, again.recompute_method) == want[:2]


@pytest.mark.parametrize("flags,words", [
    ("--activations-checkpoint-method sideways", None),
    ("--activations-checkpoint-method uniform --recompute-method block",
     ["--activations-checkpoint-method", "--recompute-method", "disagree"]),
    ("--activations-checkpoint-method uniform --recompute-activations",
     ["--activations-checkpoint-method", "selective"]),
    ("--activations-checkpoint-method block --recompute-granularity selective",
     ["--activations-checkpoint-method", "selective"]),
])
def test_activations_checkpoint_method_refused(flags, words, capsys):
    if words is None:  # a choice outside uniform|block: argparse's one-line error
        with pytest.raises(SystemExit):
            _validate(flags)
        assert "invalid choice: 'sideways'" in capsys.readouterr().err
        return
    with pytest.raises(ArgumentError) as err:
        _validate(flags)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------------------
# --use-flash-attn-v1 / -v2 / -triton / -builder
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,logged", [
    ("--use-flash-attn", "--use-flash-attn"),
    ("--use-flash-attn-v1", "--use-flash-attn"),
    ("--use-flash-attn-v2", "--use-flash-attn-v2"),
    ("--use-flash-attn-triton", "--use-flash-attn-triton"),
    ("--use-flash-attn-builder", "--use-flash-attn-builder"),
])
def test_flash_attention_flags_run_sdpa(flag, logged, capsys, monkeypatch):
    from megatron.model import GPTModel
    from megatron.model.config import config_from_args

    args = _validate(flag)
    out = capsys.readouterr().out
    assert (f"> flash attention: {logged} runs torch scaled_dot_product_attention "
            "(flash/cuDNN/efficient backends as available)") in out
    assert args.use_flash_attn and args.flash_attn_flag == logged
    again = validate_args(args, world_size=1, rank=0)
    assert again.use_flash_attn and "flash attention" not in capsys.readouterr().out

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    config = config_from_args(args, padded_vocab_size=128, use_cpu_initialization=True,
                              hidden_dropout=0.0, attention_dropout=0.0)
    assert config.use_flash_attn
    model = GPTModel(config)
    tokens = torch.randint(0, 128, (2, 32))
    position_ids = torch.arange(32).expand(2, 32)
    mask = torch.ones(32, 32, dtype=torch.bool).triu(1)[None, None]
    model(tokens, position_ids, mask)
    assert len(calls) == 2  # one per layer


def test_no_flash_flag_keeps_the_baddbmm_path(capsys, monkeypatch):
    from megatron.model import GPTModel
    from megatron.model.config import config_from_args

    args = _validate("")
    assert not args.use_flash_attn and args.flash_attn_flag is None
    assert "flash attention" not in capsys.readouterr().out
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: pytest.fail("SDPA without a flash flag"))
    model = GPTModel(config_from_args(args, padded_vocab_size=128, use_cpu_initialization=True,
                                      hidden_dropout=0.0, attention_dropout=0.0))
    model(torch.randint(0, 128, (2, 32)), torch.arange(32).expand(2, 32),
          torch.ones(32, 32, dtype=torch.bool).triu(1)[None, None])


# ----------------------------------------------------------------------------------------
# --lr-decay-style inverse-square-root
# ----------------------------------------------------------------------------------------


def test_inverse_square_root_curve_through_the_flags():
    # 4 warm-up iterations of a global batch of 2: steps are counted in samples
    sched = _scheduler("--lr-decay-style inverse-square-root --lr-warmup-iters 4 "
                       "--lr-decay-iters 3000")
    assert sched.decay_style == "inverse-square-root"
    lrs = {}
    for iteration in range(1, 4001):
        sched.step(increment=2)
        lrs[iteration] = sched.optimizer.param_groups[0]["lr"]
    assert lrs[2] == pytest.approx(0.5)  # linear warm-up
    assert lrs[4] == pytest.approx(1.0)
    for n in (5, 9, 16, 100, 1600):  # lr * sqrt(W) / sqrt(n), W = 4 x 2 samples
        assert lrs[n] == pytest.approx(math.sqrt(8) / math.sqrt(2 * n))
    assert lrs[1600] == pytest.approx(0.05)
    assert lrs[3000] == pytest.approx(math.sqrt(8 / 6000))
    assert lrs[3001] == lrs[4000] == pytest.approx(0.01)  # past the decay span: --min-lr


def test_inverse_square_root_floor_and_end_of_decay():
    sched = AnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0),
                        max_lr=1.0, min_lr=0.2, warmup_steps=0, decay_steps=1000,
                        decay_style="inverse-square-root")
    assert sched.get_lr() == pytest.approx(1.0)  # max(W, 1) / max(n, 1) at n = 0
    for n, lr in ((1, 1.0), (4, 0.5), (16, 0.25), (25, 0.2), (100, 0.2), (1001, 0.2)):
        sched.num_steps = n
        assert sched.get_lr() == pytest.approx(lr), n


def test_inverse_square_root_in_tokens():
    # warm-up 64 tokens, decay over 10_000: lr = sqrt(64) / sqrt(t) after warm-up
    sched = AnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0),
                        max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=1000,
                        decay_style="inverse-square-root", warmup_tokens=64,
                        decay_tokens=10_000, tokens_per_sample=16)
    sched.step(2)  # 32 tokens: warm-up
    assert sched.get_lr() == pytest.approx(0.5)
    sched.step(14)  # 256 tokens
    assert sched.get_lr() == pytest.approx(8 / 16)
    sched.step(84)  # 1600 tokens
    assert sched.get_lr() == pytest.approx(8 / 40)


# ----------------------------------------------------------------------------------------
# --onnx-safe / --lazy-mpu-init take a value
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,want", [
    ("", False), ("--onnx-safe", True), ("--onnx-safe True", True),
    ("--onnx-safe true", True), ("--onnx-safe 1", True), ("--onnx-safe False", False),
    ("--onnx-safe no", False),
])
def test_onnx_safe_takes_a_value_and_picks_the_erf_gelu(flags, want):
    from megatron.model.config import config_from_args
    from megatron.model.transformer import ParallelMLP
    from megatron.model.utils import erf_gelu

    args = _validate(flags)
    assert args.onnx_safe is want
    mlp = ParallelMLP(config_from_args(args, padded_vocab_size=128,
                                       use_cpu_initialization=True),
                      torch.nn.init.zeros_, torch.nn.init.zeros_)
    assert (mlp.activation_func is erf_gelu) is want


def test_bool_values_refuse_other_words(capsys):
    with pytest.raises(SystemExit):
        _validate("--onnx-safe perhaps")
    assert "argument --onnx-safe: expected true or false, got 'perhaps'" in capsys.readouterr().err


def test_lazy_mpu_init_value():
    assert _validate("--lazy-mpu-init False").lazy_mpu_init is False
    assert _validate("--lazy-mpu-init 0").lazy_mpu_init is False
    for flags in ("--lazy-mpu-init True", "--lazy-mpu-init"):
        with pytest.raises(ArgumentError,
                           match="^--lazy-mpu-init: deferred process-group creation is not "
                           "supported here$"):
            _validate(flags)
