"""Constant and dynamic loss scalers: Megatron's hysteresis / growth / min-scale rules."""

import pytest
import torch

from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler


def _scale(s) -> float:
    return s.scale.item()


def test_hysteresis_two_overflows_before_backoff():
    s = DynamicGradScaler(1024.0, 1.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert _scale(s) == 1024.0  # first overflow only uses up hysteresis
    s.update(True)
    assert _scale(s) == 512.0
    s.update(True)  # the hysteresis tracker stays <= 0: every further overflow backs off
    assert _scale(s) == 256.0


def test_growth_after_window_resets_hysteresis():
    s = DynamicGradScaler(1024.0, 1.0, growth_interval=3, hysteresis=2)
    s.update(True)  # hysteresis tracker 1
    for _ in range(2):
        s.update(False)
    assert _scale(s) == 1024.0
    s.update(False)  # third clean step in a row
    assert _scale(s) == 2048.0
    s.update(True)  # hysteresis was reset to 2: no backoff yet
    assert _scale(s) == 2048.0
    s.update(True)
    assert _scale(s) == 1024.0


def test_overflow_restarts_growth_window():
    s = DynamicGradScaler(8.0, 1.0, growth_interval=2, hysteresis=5)
    s.update(False)
    s.update(True)
    s.update(False)
    assert _scale(s) == 8.0
    s.update(False)
    assert _scale(s) == 16.0


def test_never_below_min_scale_and_inv_scale():
    s = DynamicGradScaler(4.0, 2.0, growth_interval=100, hysteresis=1)
    for _ in range(3):
        s.update(True)
    assert _scale(s) == 2.0
    assert s.inv_scale.item() == 0.5
    assert s.scale.dtype == torch.float32


def test_state_dict_roundtrip():
    s = DynamicGradScaler(1024.0, 1.0, growth_interval=3, hysteresis=2)
    s.update(True)
    s.update(True)
    s.update(False)
    t = DynamicGradScaler(1024.0, 1.0, growth_interval=3, hysteresis=2)
    t.load_state_dict(s.state_dict())
    assert (_scale(t), t._growth_tracker, t._hysteresis_tracker) == (512.0, 1, 0)
    for _ in range(2):
        t.update(False)
    assert _scale(t) == 1024.0


def test_constant_scaler_and_bad_values():
    c = ConstantGradScaler(128.0)
    c.update(True)
    c.update(False)
    assert _scale(c) == 128.0
    assert c.state_dict() == {}
    with pytest.raises(ValueError, match="--min-loss-scale"):
        DynamicGradScaler(1.0, 2.0)
    with pytest.raises(ValueError, match="--hysteresis"):
        DynamicGradScaler(4.0, 1.0, hysteresis=0)
