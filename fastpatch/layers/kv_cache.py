"""Key/value caches for incremental decoding with the fused decoder layer, one per layer.

Two kinds, same interface (``update``, ``set_cross``, ``reorder_``):

* :class:`KVCache` grows by concatenation: simple, any length, the natural fit for eager
  generation loops (fairseq's ``incremental_state``, HF's dynamic cache, ``LSTransformer``).
* :class:`StaticKVCache` is preallocated ``[B, heads, capacity, head_dim]`` and written in place
  at a device-side position, so a decode step has fixed shapes and addresses and can be captured
  in a CUDA graph; attention runs over all ``capacity`` slots with a mask of the written ones.

Both also hold the cross-attention keys/values, computed once from the encoder output. Both
reorder by an index that may permute, repeat and drop rows (beam search, finished sentences).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import ops


def _check_kv(key, value, what: str) -> None:
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what} {name} must be a [batch, heads, length, head_dim] tensor, "
                             f"got {got}")
    if key.shape != value.shape:
        raise ValueError(f"{what} key and value shapes differ: {tuple(key.shape)} vs "
                         f"{tuple(value.shape)}")


def _check_index(index, device: torch.device) -> None:
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError("index must be an int64 or int32 tensor")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the cache is on {device}")


class KVCache:
    """Growing cache of one decoder layer.

    Attributes:
        key, value: self-attention ``[B, heads, T, head_dim]`` of the ``T`` tokens seen so far
            (None before the first step).
        cross_key, cross_value: cross-attention ``[B, heads, S, head_dim]`` (None until set).
    """

    #: whether ``update`` returns a mask that already encodes causality
    encodes_causality = False

    def __init__(self):
        self.key: Optional[Tensor] = None
        self.value: Optional[Tensor] = None
        self.cross_key: Optional[Tensor] = None
        self.cross_value: Optional[Tensor] = None

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return 0 if self.key is None else self.key.shape[2]

    def update(self, key: Tensor, value: Tensor,
               causal: bool = True) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Appends this step's ``[B, heads, L, head_dim]`` keys/values; returns all of them and
        no mask (the attention's bottom-right-aligned causal mask is right for a growing cache)."""
        _check_kv(key, value, "new")
        if self.key is not None:
            if key.shape[:2] != self.key.shape[:2] or key.shape[3] != self.key.shape[3]:
                raise ValueError(f"new keys {tuple(key.shape)} do not match the cache "
                                 f"{tuple(self.key.shape)}")
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value, None

    def set_cross(self, key: Tensor, value: Tensor) -> None:
        _check_kv(key, value, "cross-attention")
        self.cross_key, self.cross_value = key, value

    def reorder_(self, index: Tensor) -> None:
        """Keeps rows ``index`` (in that order) of every cached tensor: beams are permuted,
        repeated or dropped, and the batch may shrink or grow."""
        for name in ("key", "value", "cross_key", "cross_value"):
            t = getattr(self, name)
            if t is not None:
                _check_index(index, t.device)
                setattr(self, name, t.index_select(0, index))


class StaticKVCache:
    """Preallocated cache of one decoder layer, CUDA-graph friendly.

    ``positions`` (int64 ``[1]``, on the cache's device) is the next slot to write; ``update``
    writes there with ``fastpatch.ops.kv_cache_append_`` and advances it in place, so replaying a
    captured step advances it too. Rows share slot numbers: a left-padded prompt keeps its pads
    in the cache and masks them with the layer's ``self_attn_padding_mask`` (``[B, capacity]``).
    Writing past ``capacity`` is the caller's error (the engine sizes the cache).
    """

    encodes_causality = True

    def __init__(self, batch_size: int, capacity: int, num_heads: int, head_dim: int, *,
                 dtype: Optional[torch.dtype] = None, device=None):
        for name, v in (("batch_size", batch_size), ("capacity", capacity),
                        ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        shape = (batch_size, num_heads, capacity, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(1, dtype=torch.int64, device=self.key.device)
        self._slots = torch.arange(capacity, device=self.key.device)
        self.cross_key: Optional[Tensor] = None
        self.cross_value: Optional[Tensor] = None

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    def reset_(self) -> None:
        """Forget the cached tokens (the buffers are reused as they are)."""
        self.positions.zero_()

    def update(self, key: Tensor, value: Tensor,
               causal: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        """Writes this step's ``[B, heads, L, head_dim]`` keys/values at ``positions``.

        Returns the full buffers and a bool mask ``[1, 1, L, capacity]`` (True = may attend) of
        the slots each new query sees: written slots up to its own (``causal``) or all written
        slots including this step's.
        """
        _check_kv(key, value, "new")
        if key.shape[:2] != self.key.shape[:2] or key.shape[3] != self.key.shape[3]:
            raise ValueError(f"new keys {tuple(key.shape)} do not match the static cache "
                             f"{tuple(self.key.shape)}")
        length = key.shape[2]
        ops.kv_cache_append_(self.key, self.value, key.to(self.key.dtype),
                             value.to(self.value.dtype), self.positions)
        offsets = torch.arange(length, device=key.device)
        if causal:
            last_visible = self.positions + offsets  # [L]: query i sees slots <= positions + i
        else:
            last_visible = (self.positions + (length - 1)).expand(length)
        visible = self._slots.view(1, -1) <= last_visible.view(-1, 1)
        self.positions.add_(length)
        return self.key, self.value, visible.view(1, 1, length, -1)

    def set_cross(self, key: Tensor, value: Tensor) -> None:
        """Stores the cross-attention keys/values, in place when the shapes match (so a captured
        graph that reads them sees the new encoder output)."""
        _check_kv(key, value, "cross-attention")
        if self.cross_key is not None and self.cross_key.shape == key.shape:
            self.cross_key.copy_(key)
            self.cross_value.copy_(value)
        else:
            self.cross_key, self.cross_value = key.clone(), value.clone()

    def reorder_(self, index: Tensor) -> None:
        """Keeps rows ``index``. With an unchanged batch size the buffers are updated in place
        (same addresses, graph-safe); a different size allocates new buffers."""
        _check_index(index, self.key.device)
        for name in ("key", "value", "cross_key", "cross_value"):
            t = getattr(self, name)
            if t is None:
                continue
            picked = t.index_select(0, index)
            if picked.shape == t.shape:
                t.copy_(picked)
            else:
                setattr(self, name, picked)
