"""Layer norm with Megatron's name and parameters, on apex's fused kernel when apex
imports and on torch's own layer norm otherwise (torch's is fused on GPU as well).

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias     over the last dims

"Mixed": the statistics are computed in fp32 when the input and the parameters differ
in precision (fp32 residual stream with half-precision weights); the output then has the
parameters' dtype, so that it feeds the half-precision linear layers that follow.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch.nn import init
from torch.nn.parameter import Parameter

from megatron import print_rank_0

try:  # apex is optional (DESIGN.md decision 2)
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine as _apex_layer_norm
except Exception:  # noqa: BLE001 - apex missing or built for another torch
    _apex_layer_norm = None

_LOGGED = False


def _log_backend_once() -> None:
    global _LOGGED
    if not _LOGGED:
        _LOGGED = True
        if _apex_layer_norm is None:
            print_rank_0("apex is not available: MixedFusedLayerNorm runs torch's layer norm")


class MixedFusedLayerNorm(torch.nn.Module):
    """LayerNorm over `normalized_shape` with parameters `weight` (ones) and `bias`
    (zeros). With `sequence_parallel` the parameters are marked `sequence_parallel=True`:
    each tensor-parallel rank sees only its part of the sequence, so their gradients are
    partial sums that the training loop all-reduces over the tensor-parallel group."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = torch.Size(normalized_shape)
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = Parameter(torch.empty(*self.normalized_shape))
        self.bias = Parameter(torch.empty(*self.normalized_shape))
        self.reset_parameters()
        self.weight.sequence_parallel = sequence_parallel
        self.bias.sequence_parallel = sequence_parallel
        _log_backend_once()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if input.dtype == weight.dtype:
            if _apex_layer_norm is not None and input.is_cuda:
                return _apex_layer_norm(input, weight, bias, self.normalized_shape, self.eps)
            return torch.nn.functional.layer_norm(
                input, self.normalized_shape, weight, bias, self.eps
            )
        output = torch.nn.functional.layer_norm(
            input.float(), self.normalized_shape, weight.float(), bias.float(), self.eps
        )
        return output.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}"
