"""AnnealingLR: warmup and decay curves, sample-based steps, checkpoint semantics."""

import math

import pytest
import torch

from megatron.learning_rates import AnnealingLR


def _optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_mult": 0.5}], lr=123.0)


def _sched(style="linear", warmup=10, decay=110, **kwargs):
    return AnnealingLR(_optimizer(), 1.0, 0.1, warmup, decay, style, **kwargs)


def _lr_at(sched, n):
    sched.step(n - sched.num_steps)
    return sched.optimizer.param_groups[0]["lr"]


def test_linear_curve_and_every_group_gets_lr():
    s = _sched("linear")
    assert s.optimizer.param_groups[0]["lr"] == 0.0  # applied at construction (step 0)
    expected = {5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * 0.75, 60: 0.55, 110: 0.1, 500: 0.1}
    for n, lr in expected.items():
        assert _lr_at(s, n) == pytest.approx(lr)
        assert s.optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * lr)


def test_cosine_curve():
    s = _sched("cosine")
    for n in (20, 35, 60, 85, 110):
        ratio = (n - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (math.cos(math.pi * ratio) + 1)
        assert _lr_at(s, n) == pytest.approx(expected)
    assert _lr_at(s, 60) == pytest.approx(0.55)
    assert _lr_at(s, 1000) == pytest.approx(0.1)


def test_constant_after_warmup_and_no_warmup():
    s = _sched("constant")
    assert _lr_at(s, 3) == pytest.approx(0.3)
    assert _lr_at(s, 10_000) == pytest.approx(1.0)
    s = _sched("linear", warmup=0, decay=100)
    assert s.get_lr() == pytest.approx(1.0)
    assert _lr_at(s, 50) == pytest.approx(0.55)


def test_steps_counted_in_samples():
    # --lr-warmup-samples 80 --lr-decay-samples 880 with a global batch of 8.
    s = _sched("linear", warmup=80, decay=880)
    for _ in range(5):
        s.step(increment=8)
    assert s.num_steps == 40
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(55):
        s.step(increment=8)
    assert s.num_steps == 480  # halfway through decay
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)


def test_state_dict_roundtrip():
    s = _sched("cosine")
    _lr_at(s, 42)
    sd = s.state_dict()
    assert set(sd) == {
        "max_lr",
        "warmup_steps",
        "num_steps",
        "decay_style",
        "decay_steps",
        "min_lr",
    }
    t = _sched("cosine", use_checkpoint_lr_scheduler=False)
    t.load_state_dict(sd)
    assert t.num_steps == 42
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(s.get_lr())


def test_checkpoint_mismatch_semantics(capsys):
    sd = _sched("linear").state_dict()
    sd["max_lr"] = 2.0
    strict = _sched("linear", use_checkpoint_lr_scheduler=False)
    with pytest.raises(
        ValueError, match=r"learning rate value 1.0 differs from checkpoint value 2.0"
    ):
        strict.load_state_dict(sd)
    from_ckpt = _sched("linear", use_checkpoint_lr_scheduler=True)
    from_ckpt.load_state_dict(sd)
    assert from_ckpt.max_lr == 2.0
    assert "using checkpoint value 2.0 for learning rate" in capsys.readouterr().out
    override = _sched("linear", use_checkpoint_lr_scheduler=False, override_lr_scheduler=True)
    override.load_state_dict(sd)
    assert override.max_lr == 1.0


def test_reads_old_checkpoint_keys():
    old = {
        "start_lr": 1.0,
        "min_lr": 0.1,
        "warmup_iter": 10,
        "end_iter": 110,
        "decay_style": "linear",
        "num_iters": 60,
    }
    s = _sched("linear", use_checkpoint_lr_scheduler=False)
    s.load_state_dict(old)
    assert s.num_steps == 60
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="--lr-decay-style 'exp'"):
        _sched("exp")
    with pytest.raises(ValueError, match="warmup steps"):
        _sched("linear", warmup=200, decay=100)
    with pytest.raises(ValueError, match="mutually exclusive"):
        _sched("linear", use_checkpoint_lr_scheduler=True, override_lr_scheduler=True)
