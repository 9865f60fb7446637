"""Grad norm, zero count, overflow check and resume on 4 gloo ranks with TP=2 x PP=2.

The "full model" has two layers (one per pipeline stage), each with a column-parallel
weight and bias (split on TP), a row-parallel weight (split), and a row-parallel bias and
layer-norm weight that every TP rank duplicates; stage 0 holds the word embedding (split
on TP) and the last stage its tied copy (``shared=True``). Every rank sets its slice of
the same full gradients; the results must equal single-process maths on the full model.
"""

import io
import math

import torch

from megatron import mpu
from megatron.optimizer import DynamicGradScaler, Float16OptimizerWithFloat16Params
from megatron.optimizer.clip_grads import clip_grad_norm_fp32, count_zeros_fp32
from tests.dist_utils import run_distributed

TP, PP = 2, 2


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    # torch.testing.assert_close imports torch.distributed.tensor: seconds per spawned rank.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected.float(), rtol=rtol, atol=atol), (
        (actual.float() - expected.float()).abs().max().item()
    )


# name: (full shape, split dim or None for a TP duplicate)
LAYER = {
    "w1": ((8, 4), 0),
    "b1": ((8,), 0),
    "w2": ((4, 8), 1),
    "b2": ((4,), None),
    "ln": ((4,), None),
}


def _full_grads():
    """Every full gradient of the model, by name; the tied copy is not a separate tensor."""
    gen = torch.Generator().manual_seed(123)
    grads = {"embedding": torch.randn(6, 4, generator=gen)}
    for layer in range(PP):
        for name, (shape, _) in LAYER.items():
            grads[f"{layer}.{name}"] = torch.randn(shape, generator=gen)
    grads["0.w1"][0, :3] = 0.0  # zeros in a split param
    grads["1.ln"][1] = 0.0  # a zero in a duplicated param: counted once
    return grads


def _local_params(dtype=torch.float32):
    """This rank's params as (param, full grad slice) pairs."""
    tp_rank, stage = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
    full = _full_grads()
    specs = [(f"{stage}.{n}", d) for n, (_, d) in LAYER.items()]
    specs.append(("embedding", 0))  # stage 0: the original; last stage: the tied copy
    pairs = []
    for name, dim in specs:
        grad = full[name]
        if dim is not None:
            grad = grad.chunk(TP, dim=dim)[tp_rank].clone()
        param = torch.nn.Parameter(torch.linspace(-1, 1, grad.numel()).view(grad.shape).to(dtype))
        if dim is not None:
            mpu.set_tensor_model_parallel_attributes(param, True, dim, 1)
        if name == "embedding" and stage == PP - 1:
            param.shared = True
        pairs.append((param, grad))
    return pairs


def _set_grads(pairs, scale=1.0):
    for param, grad in pairs:
        param.grad = (grad * scale).to(param.dtype)


def _check_norms():
    full = _full_grads()
    expected_l2 = math.sqrt(sum(g.pow(2).sum().item() for g in full.values()))
    expected_inf = max(g.abs().max().item() for g in full.values())
    expected_zeros = sum((g == 0).sum().item() for g in full.values())
    pairs = _local_params()
    params = [p for p, _ in pairs]
    _set_grads(pairs)
    assert abs(clip_grad_norm_fp32(params, 1e9, math.inf) - expected_inf) < 1e-6
    assert count_zeros_fp32(params) == expected_zeros
    norm = clip_grad_norm_fp32(params, 1.0)
    assert abs(norm - expected_l2) < 1e-4 * expected_l2, (norm, expected_l2)
    coeff = 1.0 / (expected_l2 + 1e-6)
    for param, grad in pairs:  # every grad is clipped, duplicates and tied copy included
        _assert_close(param.grad, grad * coeff)
    return expected_l2


def _fp16_optimizer(params, clip_grad):
    inner = torch.optim.AdamW(params, lr=1e-2)
    scaler = DynamicGradScaler(256.0, 1.0, growth_interval=1000, hysteresis=1, device="cpu")
    return Float16OptimizerWithFloat16Params(inner, clip_grad, True, False, False, scaler)


def _check_overflow_on_one_rank_skips_everywhere(rank):
    pairs = _local_params(torch.float16)
    params = [p for p, _ in pairs]
    opt = _fp16_optimizer(params, clip_grad=0.0)
    before = [p.detach().clone() for p in params]
    _set_grads(pairs, scale=256.0)
    if rank == 3:
        params[0].grad[0, 0] = float("inf")
    assert opt.step() == (False, None, None)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.get_loss_scale().item() == 128.0


def _step(pairs, opt):
    _set_grads(pairs, scale=opt.get_loss_scale().item())
    return opt.step()


def _check_fp16_norm_and_resume(expected_l2):
    pairs = _local_params(torch.float16)
    params = [p for p, _ in pairs]
    opt = _fp16_optimizer(params, clip_grad=1.0)
    ok, grad_norm, zeros = _step(pairs, opt)
    assert ok and abs(grad_norm - expected_l2) < 1e-3 * expected_l2
    assert zeros == sum((g == 0).sum().item() for g in _full_grads().values())

    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed_pairs = _local_params(torch.float16)
    for (param, _), value in zip(resumed_pairs, saved["model"]):
        param.data.copy_(value)
    resumed = _fp16_optimizer([p for p, _ in resumed_pairs], clip_grad=1.0)
    resumed.load_state_dict(saved["optimizer"])
    _step(pairs, opt)
    _step(resumed_pairs, resumed)
    for (a, _), (b, _) in zip(pairs, resumed_pairs):
        assert torch.equal(a, b)
    for a, b in zip(opt.get_parameters(), resumed.get_parameters()):
        assert torch.equal(a, b)


def _tp_pp_world(rank, world_size):
    mpu.initialize_model_parallel(TP, PP)
    try:
        expected_l2 = _check_norms()
        _check_overflow_on_one_rank_skips_everywhere(rank)
        _check_fp16_norm_and_resume(expected_l2)
    finally:
        mpu.destroy_model_parallel()


def test_tensor_and_pipeline_parallel_norms_overflow_and_resume():
    run_distributed(_tp_pp_world, world_size=4, timeout=120)
