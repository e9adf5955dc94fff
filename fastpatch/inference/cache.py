"""The decoder's static key/value cache: one preallocated arena for all layers.

``fastpatch.layers.kv_cache.StaticKVCache`` is one cache per layer for the fused layer modules.
The engine keeps all layers in a single ``[2, layers, R, heads, S, head_dim]`` tensor instead,
because beam search reorders the cache after every token: with one arena that is one
``index_select`` over the slots written so far, not ``4 x layers`` copies of whole buffers.
Writes go through ``fastpatch.ops.kv_cache_append_`` at a device-side slot, so a captured decode
step replays with advancing positions.

The arena only grows (to the largest batch and length seen), and growing it invalidates the
CUDA graphs that captured its address: :attr:`version` tells the graph cache when.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


class KVArena:
    """Keys and values of every layer, rows x slots, allocated on demand and zero-initialised
    (unwritten slots are masked, but must hold finite numbers: 0 x NaN would leak through)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype, self.device = dtype, device
        self.data = torch.zeros(2, num_layers, 0, num_heads, 0, head_dim, dtype=dtype, device=device)
        self.version = 0

    def reserve(self, rows: int, slots: int) -> None:
        """Make room for ``rows x slots``; reallocates (and bumps :attr:`version`) if needed."""
        have_rows, have_slots = self.data.shape[2], self.data.shape[4]
        if rows <= have_rows and slots <= have_slots:
            return
        self.data = None  # free the old arena before allocating the new one
        self.data = torch.zeros(2, self.num_layers, max(rows, have_rows), self.num_heads,
                                max(slots, have_slots), self.head_dim, dtype=self.dtype,
                                device=self.device)
        self.version += 1

    def layer(self, index: int, rows: int, slots: int) -> Tuple[Tensor, Tensor]:
        """``(keys, values)`` views ``[rows, heads, slots, head_dim]`` of layer ``index``."""
        return (self.data[0, index, :rows, :, :slots], self.data[1, index, :rows, :, :slots])

    def repeat_rows(self, rows: int, times: int, slots: int) -> None:
        """Rows ``[0, rows)`` become ``rows * times`` rows, each repeated ``times`` times in place
        (``repeat_interleave``: the beams of prompt ``b`` are rows ``b*times ... b*times+times-1``)."""
        if times == 1:
            return
        view = self.data[:, :, : rows * times, :, :slots]
        view.copy_(self.data[:, :, :rows, :, :slots].repeat_interleave(times, dim=2))

    def reorder_rows(self, index: Tensor, slots: int) -> None:
        """Row ``i`` becomes old row ``index[i]`` for the first ``slots`` slots (beam search);
        ``index`` may be shorter or longer than the rows in use (a batch that shrinks or grows)."""
        view = self.data[:, :, :, :, :slots]
        view[:, :, : index.shape[0]].copy_(view.index_select(2, index))
