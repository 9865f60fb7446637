"""clip_grad_norm_fp32 / count_zeros_fp32 in one process (the multi-rank cases are in
test_optimizer_distributed.py)."""

import math

import pytest
import torch

from megatron.optimizer.clip_grads import clip_grad_norm_fp32, count_zeros_fp32


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.empty(s)) for s in ((5, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no grad: ignored
    return params


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_matches_torch(norm_type, max_norm):
    ours, ref = _params(), _params()
    norm = clip_grad_norm_fp32(ours, max_norm, norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref[:3], max_norm, norm_type)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for a, b in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a.grad, b.grad)
    if max_norm < norm:
        after = clip_grad_norm_fp32(ours, 1e9, norm_type)
        assert after == pytest.approx(max_norm, rel=1e-4)


def test_shared_param_counted_once_but_clipped():
    params = _params()
    tied = torch.nn.Parameter(torch.empty(4))
    tied.grad = torch.full((4,), 10.0)
    tied.shared = True  # the copy of the tied embedding that another stage counts
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:3]]))
    norm = clip_grad_norm_fp32(params + [tied], 1.0)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(tied.grad, torch.full((4,), 10.0 / (expected.item() + 1e-6)))


def test_count_zeros():
    params = _params()
    params[0].grad[0] = 0.0  # 3 zeros
    params[1].grad[2:4] = 0.0  # 2 zeros
    assert count_zeros_fp32(params) == 5
