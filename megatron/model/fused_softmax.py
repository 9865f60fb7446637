"""Scaled, masked softmax over attention scores, fused on GPU when the kernels apply.

    probs = softmax(mask(scale * scores))       over the last dim (keys)

where mask() sets masked positions to -10000 (Megatron's convention: a fully masked row
becomes uniform instead of NaN). Three implementations, chosen per call:

* the fused upper-triangular kernel (causal masks: key j > query i is masked, the mask
  tensor is not read) for [b, np, sq, sk] with sq == sk;
* the fused general kernel, reading a boolean mask [b or 1, 1, sq, sk];
* the torch reference (always available; the only one on CPU).

The fused kernels apply under Megatron's conditions: fusion enabled, fp16 or bf16 input,
16 < sk <= 4096, sq % 4 == 0, b * np % 4 == 0, and the kernels built (see
megatron/fused_kernels). The fused kernels compute in fp32 and return the input dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron import fused_kernels, print_rank_0

from .enums import AttnMaskType

_MAX_FUSED_KEYS = 4096
_FALLBACK_LOGGED = False


class ScaledUpperTriangMaskedSoftmax(torch.autograd.Function):
    """Fused causal softmax of scale * x over [attn_batches, sq, sk]; input grad is
    scale * y * (g - sum(g * y)) (zero at masked positions, where y = 0)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, scale: float) -> torch.Tensor:
        kernels = fused_kernels.get_module("scaled_upper_triang_masked_softmax_cuda")
        softmax_results = kernels.forward(inputs.contiguous(), float(scale))
        ctx.scale = float(scale)
        ctx.save_for_backward(softmax_results)
        return softmax_results

    @staticmethod
    def backward(ctx, output_grads: torch.Tensor):
        kernels = fused_kernels.get_module("scaled_upper_triang_masked_softmax_cuda")
        (softmax_results,) = ctx.saved_tensors
        input_grads = kernels.backward(output_grads.contiguous(), softmax_results, ctx.scale)
        return input_grads, None


class ScaledMaskedSoftmax(torch.autograd.Function):
    """Fused softmax of scale * x with an explicit boolean mask (True = masked) over
    [b, np, sq, sk]; the mask is [b or 1, 1, sq, sk]. The input grad is as for the causal
    kernel, and 0 at masked keys (as the torch path's masked_fill gives)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        kernels = fused_kernels.get_module("scaled_masked_softmax_cuda")
        softmax_results = kernels.forward(inputs.contiguous(), mask.contiguous(), float(scale))
        ctx.scale = float(scale)
        ctx.save_for_backward(softmax_results, mask)
        return softmax_results

    @staticmethod
    def backward(ctx, output_grads: torch.Tensor):
        kernels = fused_kernels.get_module("scaled_masked_softmax_cuda")
        softmax_results, mask = ctx.saved_tensors
        input_grads = kernels.backward(
            output_grads.contiguous(), softmax_results, mask.contiguous(), ctx.scale
        )
        return input_grads, None, None


def _log_fallback_once() -> None:
    global _FALLBACK_LOGGED
    if not _FALLBACK_LOGGED:
        _FALLBACK_LOGGED = True
        print_rank_0(
            "fused softmax kernels are not loaded (megatron/fused_kernels): "
            "the attention softmax runs in torch"
        )


class FusedScaleMaskSoftmax(torch.nn.Module):
    """Megatron's attention softmax: scale, mask and softmax [b, np, sq, sk] scores.

    Args:
        input_in_fp16 / input_in_bf16: the scores' precision (at most one True).
        attn_mask_type: AttnMaskType.causal or .padding.
        scaled_masked_softmax_fusion: allow the fused kernels.
        mask_func: mask_func(scores, mask) sets masked scores (in place) and returns them.
        softmax_in_fp32: the torch path upcasts half-precision scores to fp32.
        scale: multiplies the scores before masking (None = 1); needs softmax_in_fp32.
    """

    def __init__(
        self,
        input_in_fp16: bool,
        input_in_bf16: bool,
        attn_mask_type: AttnMaskType,
        scaled_masked_softmax_fusion: bool,
        mask_func: Callable,
        softmax_in_fp32: bool,
        scale: float | None,
    ) -> None:
        super().__init__()
        if input_in_fp16 and input_in_bf16:
            raise ValueError("FusedScaleMaskSoftmax: both fp16 and bf16 input requested")
        if scale is not None and not softmax_in_fp32:
            raise ValueError("FusedScaleMaskSoftmax: a scale needs softmax_in_fp32=True")
        self.input_in_fp16 = input_in_fp16
        self.input_in_bf16 = input_in_bf16
        self.input_in_float16 = input_in_fp16 or input_in_bf16
        self.attn_mask_type = attn_mask_type
        self.scaled_masked_softmax_fusion = scaled_masked_softmax_fusion
        self.mask_func = mask_func
        self.softmax_in_fp32 = softmax_in_fp32
        self.scale = scale

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """input [b, np, sq, sk] -> probabilities [b, np, sq, sk] (input dtype)."""
        if input.dim() != 4:
            raise ValueError(f"FusedScaleMaskSoftmax: expected [b, np, sq, sk], got {input.shape}")
        if self.is_kernel_available(mask, *input.size()):
            return self.forward_fused_softmax(input, mask)
        if self.scaled_masked_softmax_fusion and input.is_cuda and not fused_kernels.is_loaded():
            _log_fallback_once()
        return self.forward_torch_softmax(input, mask)

    def is_kernel_available(
        self, mask: torch.Tensor | None, b: int, np: int, sq: int, sk: int
    ) -> bool:
        """True when a fused kernel computes this call (see the module docstring)."""
        if not (self.scaled_masked_softmax_fusion and self.input_in_float16):
            return False
        if not (16 < sk <= _MAX_FUSED_KEYS and sq % 4 == 0 and (b * np) % 4 == 0):
            return False
        if self.attn_mask_type == AttnMaskType.causal:
            if sq != sk:
                return False
        elif mask is None or mask.dim() != 4 or mask.size(0) not in (1, b):
            return False
        elif mask.size(1) != 1 or tuple(mask.shape[2:]) != (sq, sk):
            return False
        return fused_kernels.is_loaded()

    def forward_fused_softmax(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, np, sq, sk = input.size()
        scale = self.scale if self.scale is not None else 1.0
        if self.attn_mask_type == AttnMaskType.causal:
            probs = ScaledUpperTriangMaskedSoftmax.apply(input.view(-1, sq, sk), scale)
            return probs.view(b, np, sq, sk)
        return ScaledMaskedSoftmax.apply(input, mask.to(torch.bool), scale)

    def forward_torch_softmax(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.input_in_float16 and self.softmax_in_fp32:
            input = input.float()
        if self.scale is not None:
            input = input * self.scale
        mask_output = self.mask_func(input, mask) if mask is not None else input
        probs = torch.softmax(mask_output, dim=-1)
        if self.input_in_float16 and self.softmax_in_fp32:
            probs = probs.half() if self.input_in_fp16 else probs.bfloat16()
        return probs
