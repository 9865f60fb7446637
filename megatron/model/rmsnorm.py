"""RMSNorm (--normalization rmsnorm), the LLaMA-family normalisation:

    y = x / sqrt(mean(x^2) + eps) * weight          over the last dimension

The statistics are computed in fp32 and the normalised x is cast back to the input's
dtype before the weight multiplies it (as Megatron-DeepSpeed and LLaMA do); an input in
another precision than the weight gives the weight's dtype, like MixedFusedLayerNorm. The
reference is plain torch; on CUDA tensors the same function compiled by torch.compile
(one fused kernel forward and backward) is used, chosen at the first call with one log
line; a compile failure, or MEGATRON_TORCH_COMPILE=0, keeps the reference. CPU tensors
always take the reference.
"""

from __future__ import annotations

import os

import torch
from torch.nn.parameter import Parameter

from megatron import print_rank_0


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., h], weight [h] -> x / sqrt(mean(x^2) + eps) * weight.

    An input of another precision than the weight (fp32 residual stream, half weights)
    gives an output of the weight's dtype, like MixedFusedLayerNorm."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if x.dtype == weight.dtype:
        return normed.type_as(x) * weight
    return (normed * weight.float()).to(weight.dtype)


_FAST = {"fn": None, "failed": os.environ.get("MEGATRON_TORCH_COMPILE") == "0", "logged": False}


def _log_once(message: str) -> None:
    if not _FAST["logged"]:
        _FAST["logged"] = True
        print_rank_0(message)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fast path for CUDA tensors (torch.compile of the reference), else the reference."""
    if not x.is_cuda or _FAST["failed"]:
        _log_once("> RMSNorm: torch reference")
        return rms_norm_reference(x, weight, eps)
    try:
        if _FAST["fn"] is None:
            _FAST["fn"] = torch.compile(rms_norm_reference, dynamic=False)
        out = _FAST["fn"](x, weight, eps)
        _log_once("> RMSNorm: torch.compile fused kernel")
        return out
    except Exception as exc:  # noqa: BLE001 - any compile problem keeps the reference
        _FAST["failed"] = True
        print_rank_0(
            f"> RMSNorm: torch.compile failed ({type(exc).__name__}: {exc}); "
            "using the torch reference"
        )
        return rms_norm_reference(x, weight, eps)


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with parameter `weight` (ones). With
    `sequence_parallel` the weight is marked `sequence_parallel=True`, like the layer
    norm's: each tensor-parallel rank sees only its part of the sequence, so the training
    loop all-reduces its gradient over the tensor-parallel group."""

    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = Parameter(torch.ones(dim))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, eps={self.eps}"
