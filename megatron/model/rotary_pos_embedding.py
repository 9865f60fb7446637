"""Rotary position embeddings (RoPE, --use-rotary-position-embeddings).

Each attention head's first `dim` channels (dim = kv_channels * --rotary-percent; the
remaining channels pass unchanged, partial rotary) are cut into two halves x1 = x[:dim/2]
and x2 = x[dim/2:], and channel pair (x1_k, x2_k) at position m is rotated by the angle
m * theta_k, theta_k = theta^(-2k/dim) (theta = --rotary-position-embeddings-theta):

    x1_k' = x1_k cos(m theta_k) - x2_k sin(m theta_k)
    x2_k' = x2_k cos(m theta_k) + x1_k sin(m theta_k)

that is x' = x cos + rotate_half(x) sin with cos, sin = [cos(m theta), cos(m theta)], ...
This is the half-split pairing of Megatron-DeepSpeed, GPT-NeoX and Hugging Face LLaMA
(not the interleaved (x_2k, x_2k+1) pairing of Meta's original code, which differs from
it by a fixed permutation of the q and k projection rows).

The rotation is applied to q and k ([s, b, np, hn]) after the QKV projection, so under
sequence parallelism it sees the whole (all-gathered) sequence. Positions are
offset, offset + 1, ..., offset + s - 1; with a key/value cache the offset is the number
of cached positions. The cos/sin tables are computed once per (dim, theta, device) and
sliced for shorter sequences (curriculum learning) or offsets; they are plain tensors,
not parameters or buffers, so checkpoints do not change. On CUDA the rotation runs as
one torch.compile kernel (forward and backward); on CPU as the plain torch below.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .utils import compile_for_cuda

_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2k/dim) for k = 0 .. dim/2 - 1, in fp32 [dim/2]."""
    if dim < 2 or dim % 2 != 0:
        raise ValueError(f"rotary dimension must be even and >= 2 (got {dim})")
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return 1.0 / (float(theta) ** exponents)


def _table(dim: int, theta: float, length: int, device: torch.device):
    """(cos, sin), each [>= length, dim] in fp32, cached and grown in powers of two."""
    key = (dim, float(theta), str(device))
    cached = _TABLES.get(key)
    if cached is not None and cached[0].size(0) >= length:
        return cached
    size = 1 << max(0, length - 1).bit_length()
    positions = torch.arange(size, dtype=torch.float32)
    freqs = torch.outer(positions, rotary_inv_freq(dim, theta))  # [size, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [size, dim]
    cached = (emb.cos().to(device), emb.sin().to(device))
    _TABLES[key] = cached
    return cached


class RotaryEmbedding(torch.nn.Module):
    """forward(seq_len, offset) -> (cos, sin) [seq_len, 1, 1, dim] for positions
    offset .. offset + seq_len - 1 (see the module docstring). No parameters."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        rotary_inv_freq(dim, theta)  # validates dim
        self.dim = dim
        self.theta = theta

    def forward(
        self,
        seq_len: int,
        offset: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cpu") if device is None else device
        cos, sin = _table(self.dim, self.theta, offset + seq_len, device)
        cos = cos[offset : offset + seq_len].to(dtype)[:, None, None, :]  # [s, 1, 1, dim]
        sin = sin[offset : offset + seq_len].to(dtype)[:, None, None, :]
        return cos, sin

    def at(
        self, positions: torch.Tensor, max_len: int, dtype: torch.dtype = torch.float32
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [s, 1, 1, dim] at the positions given as a device tensor (long [s],
        each < max_len): a table lookup with no host synchronisation (fixed-shape steps)."""
        cos, sin = _table(self.dim, self.theta, max_len, positions.device)
        cos = cos.index_select(0, positions).to(dtype)[:, None, None, :]  # [s, 1, 1, dim]
        sin = sin.index_select(0, positions).to(dtype)[:, None, None, :]
        return cos, sin

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) channels of t [s, b, n, hn] by (cos, sin)
    [s, 1, 1, dim]; the other hn - dim channels pass unchanged."""
    dim = cos.size(-1)
    if dim == t.size(-1):
        return t * cos + _rotate_half(t) * sin
    t_rot, t_pass = t[..., :dim], t[..., dim:]
    t_rot = t_rot * cos + _rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1)


# eager on CPU; one fused kernel (forward and backward) on CUDA
apply_rotary_pos_emb = compile_for_cuda(_apply_rotary_pos_emb)


def rotary_dim(kv_channels: int, rotary_percent: float) -> int:
    """The rotated channels of each head: int(kv_channels * rotary_percent)."""
    return int(kv_channels * rotary_percent)
