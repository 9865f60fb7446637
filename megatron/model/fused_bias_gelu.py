"""Bias add fused into the tanh-approximated GeLU, with a hand-written backward.

    y = gelu(x + b),  gelu(u) = 0.5 u (1 + tanh(k (u + 0.044715 u^3))),  k = sqrt(2/pi)
    dy/du = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 * 0.044715 u^2),  t = tanh(...)

Forward and backward are each fused into one kernel (torch.compile on GPU, TorchScript
elsewhere);
the autograd Function keeps only the inputs, not the intermediate u, t.
"""

from __future__ import annotations

import torch

from .utils import fuse_pointwise


def _bias_gelu(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _bias_gelu_back(g: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = bias + y
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    # 0.1070322243 = 3 * 0.044715 * sqrt(2/pi)
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (
        1 + tanh_out
    )
    return ff * g


bias_gelu = fuse_pointwise(_bias_gelu)
bias_gelu_back = fuse_pointwise(_bias_gelu_back)


class GeLUFunction(torch.autograd.Function):
    """gelu(input + bias) with the closed-form gradient above."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input, bias)
        return bias_gelu(bias, input)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, bias = ctx.saved_tensors
        tmp = bias_gelu_back(grad_output, bias, input)
        # the bias is broadcast over every leading dim: its gradient sums over them
        bias_grad = tmp.reshape(-1, tmp.shape[-1]).sum(dim=0).to(bias.dtype)
        return tmp, bias_grad


def bias_gelu_impl(input: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(input + bias), tanh approximation; `bias` is [h] and `input` is [..., h]."""
    return GeLUFunction.apply(input, bias)


def bias_gelu_reference(input: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused reference: torch's tanh-approximated GeLU of input + bias."""
    return torch.nn.functional.gelu(input + bias, approximate="tanh")
