"""Errors a run stops with, importable from any module without import cycles."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or inf (an fp32 divergence, or an fp16 run whose
    overflows the loss scale can no longer absorb)."""
