"""Gradient-accumulation fusion on the GPU: a bf16/fp16 linear layer's weight gradient is
accumulated into its fp32 main_grad by the GEMM itself (addmm with out_dtype fp32), over
two micro-batches, against a float64 reference; the unfused path (a half-precision dW, then
added) is measured beside it and the fused one must be no less accurate."""

import pytest
import torch

from megatron import mpu
from megatron.mpu.layers import weight_grad


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 2048, 5504), (8192, 1024, 4096)])
def test_weight_grad_accumulates_into_fp32_main_grad(dtype, shape):
    tokens, fan_in, fan_out = shape
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(fan_out, fan_in, device="cuda", dtype=dtype))
    start = torch.randn(fan_out, fan_in, device="cuda")  # earlier micro-batches' sum
    weight.main_grad = start.clone()
    weight.fuse_wgrad_accumulation = True
    ref = start.double()
    unfused = start.clone()
    for _ in range(2):
        dy = torch.randn(tokens, fan_out, device="cuda", dtype=dtype)
        x = torch.randn(tokens, fan_in, device="cuda", dtype=dtype)
        assert weight_grad(weight, dy, x) is None
        ref += dy.double().t() @ x.double()
        unfused += (dy.t() @ x).float()
    torch.cuda.synchronize()
    assert weight.main_grad.dtype == torch.float32
    assert torch.isfinite(weight.main_grad).all()
    fused_err, unfused_err = _rel(weight.main_grad, ref), _rel(unfused, ref)
    assert fused_err < 1e-4, fused_err  # fp32 accumulation of exact half-precision products
    assert fused_err <= unfused_err, (fused_err, unfused_err)


def test_linear_layers_fuse_under_bf16_training():
    """ColumnParallelLinear + RowParallelLinear in bf16 with fp32 main_grad buffers: the
    weights get no .grad, and main_grad matches the fp64 gradient of the same inputs."""
    torch.manual_seed(0)
    col = mpu.ColumnParallelLinear(1024, 4096, gather_output=False, bias=False).cuda().bfloat16()
    row = mpu.RowParallelLinear(4096, 1024, input_is_parallel=True, bias=False).cuda().bfloat16()
    for layer in (col, row):
        layer.weight.main_grad = torch.zeros(layer.weight.shape, device="cuda")
        layer.weight.fuse_wgrad_accumulation = True
    x = torch.randn(512, 2, 1024, device="cuda", dtype=torch.bfloat16)
    h, _ = col(x)
    y, _ = row(h)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert col.weight.grad is None and row.weight.grad is None
    dy2 = dy.double().reshape(-1, 1024)
    ref_row = dy2.t() @ h.detach().double().reshape(-1, 4096)
    assert _rel(row.weight.main_grad, ref_row) < 1e-3
    assert col.weight.main_grad.abs().sum() > 0
