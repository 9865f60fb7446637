"""A preallocated key/value cache for incremental decoding.

Each self-attention layer gets one LayerKVCache: keys and values [max_len, b, ng, hn]
allocated on the first write (shape, dtype and device of the first keys) and then filled
in place, so a decoding step neither concatenates nor allocates a growing cache. Two ways
of writing it:

* `append(key, value)` at the host-side count of filled positions (`filled`): the
  prefill of a prompt (sq > 1) and eager one-token steps. The layer attends to the views
  [:filled] that it returns, so shapes grow by one per step and no mask is needed for a
  single new query.
* `write_at(key, value)` at the device-side position `StaticKVCache.position` (a long
  [1]): a one-token step whose shapes never change (CUDA-graph capture). The layer then
  attends to the whole buffer with `StaticKVCache.decode_mask` ([1, 1, 1, max_len], True
  = masked: every position after the fed one), computed on the device from the position.

Both fill the same buffers, so a prompt prefilled by `append` continues with `write_at`.
"""

from __future__ import annotations

from typing import List, Tuple

import torch


class LayerKVCache:
    """Keys and values of one attention layer (see the module docstring)."""

    def __init__(self, owner: StaticKVCache) -> None:
        self.owner = owner
        self.key: torch.Tensor | None = None  # [max_len, b, ng, hn]
        self.value: torch.Tensor | None = None
        self.filled = 0  # positions written by append()

    def _allocate(self, like: torch.Tensor) -> None:
        _, b, ng, hn = like.shape
        self.key = like.new_zeros(self.owner.max_len, b, ng, hn)
        self.value = like.new_zeros(self.owner.max_len, b, ng, hn)

    def append(
        self, key: torch.Tensor, value: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write key, value [sq, b, ng, hn] at positions filled .. filled + sq - 1 ->
        views of the keys and values [filled + sq, b, ng, hn] so far."""
        if self.key is None:
            self._allocate(key)
        start, end = self.filled, self.filled + key.size(0)
        if end > self.owner.max_len:
            raise ValueError(
                f"key/value cache of {self.owner.max_len} positions is full ({end} needed)"
            )
        self.key[start:end].copy_(key)
        self.value[start:end].copy_(value)
        self.filled = end
        return self.key[:end], self.value[:end]

    def write_at(
        self, key: torch.Tensor, value: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write key, value [1, b, ng, hn] at the device position owner.position -> the
        whole buffers [max_len, b, ng, hn] (attend with owner.decode_mask)."""
        if self.key is None:
            self._allocate(key)
        self.key.index_copy_(0, self.owner.position, key)
        self.value.index_copy_(0, self.owner.position, value)
        return self.key, self.value


class StaticKVCache:
    """The LayerKVCache of every layer of a model, indexed like a list of layer_past."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.layers: List[LayerKVCache] = []  # one per layer index asked for
        # Fixed-shape steps: the fed token's position (long [1]) and the mask of the
        # positions after it; None while steps append (the default).
        self.position: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None

    def __getitem__(self, index: int) -> LayerKVCache:
        while len(self.layers) <= index:
            self.layers.append(LayerKVCache(self))
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def filled(self) -> int:
        """Positions written by append() (the same in every layer)."""
        return self.layers[0].filled if self.layers else 0

    def use_position(self, position: torch.Tensor) -> None:
        """Switch to fixed-shape steps at the device position `position` (long [1], which
        the caller updates in place before each step); the positions 0 .. filled - 1
        appended so far stay."""
        self.position = position
        self.update_decode_mask()

    def update_decode_mask(self) -> None:
        """decode_mask [1, 1, 1, max_len] from position (device ops only)."""
        keys = torch.arange(self.max_len, device=self.position.device)  # [max_len]
        self.decode_mask = (keys > self.position).view(1, 1, 1, self.max_len)
