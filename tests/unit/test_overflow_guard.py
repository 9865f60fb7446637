"""An fp16 run that cannot recover stops with NonFiniteLossError (megatron/training.py's
_OverflowGuard), and a non-finite loss backs the loss scale off like a gradient overflow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron.errors import NonFiniteLossError
from megatron.optimizer.grad_scaler import DynamicGradScaler
from megatron.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.training import _OverflowGuard
from megatron.utils import first_non_finite_parameter


def _args(**overrides):
    values = dict(fp16=True, loss_scale=None, deepspeed=False, min_loss_scale=1.0,
                  max_consecutive_skipped_iterations=100)
    values.update(overrides)
    return SimpleNamespace(**values)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def test_overflow_at_the_minimum_scale_stops():
    guard = _OverflowGuard(_args())
    guard.after_step(5, 1, 4.0, [_model()])  # the scale can still back off
    with pytest.raises(NonFiniteLossError, match=r"iteration 6: fp16 overflow with the loss "
                                                 r"scale at its minimum \(1, --min-loss-scale\)"):
        guard.after_step(6, 1, 1.0, [_model()])


def test_consecutive_skips_stop_at_the_limit_and_a_clean_step_resets():
    guard = _OverflowGuard(_args(max_consecutive_skipped_iterations=3))
    for it in (1, 2):
        guard.after_step(it, 1, 2.0 ** 20, [_model()])
    guard.after_step(3, 0, 2.0 ** 19, [_model()])  # a clean step starts the count again
    guard.after_step(4, 1, 2.0 ** 19, [_model()])
    guard.after_step(5, 1, 2.0 ** 19, [_model()])
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive iterations skipped .*"
                                                 r"--max-consecutive-skipped-iterations 3"):
        guard.after_step(6, 1, 2.0 ** 18, [_model()])
    _OverflowGuard(_args(max_consecutive_skipped_iterations=0)).after_step(
        1, 1, 2.0 ** 18, [_model()])  # 0: never stops on the count


def test_non_finite_weights_stop_at_the_first_skipped_step():
    model = _model()
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    assert first_non_finite_parameter([model]) == "1.weight"
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: the weights are no longer "
                                                 r"finite \(1.weight holds NaN or inf\)"):
        _OverflowGuard(_args()).after_step(3, 1, 2.0 ** 20, [model])
    assert first_non_finite_parameter([_model()]) is None


def test_skip_overflowed_step_backs_the_scale_off():
    model = _model().half()
    scaler = DynamicGradScaler(1024.0, 1.0, hysteresis=1)
    opt = Float16OptimizerWithFloat16Params(
        torch.optim.AdamW(model.parameters(), lr=1e-3), 0.0, False, False, False, scaler)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.skip_overflowed_step()
    assert scaler.scale.item() == 512.0
    assert all(p.grad is None for p in model.parameters())
