"""Checking and normalising the token batches handed to the engines.

Every public entry point goes through :func:`token_batch`, so a bad input raises a
``ValueError`` that names the argument (and the row) before anything reaches the GPU, where an
out-of-vocabulary id would be a device-side assert that poisons the CUDA context.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class TokenBatch(NamedTuple):
    ids: Tensor              # [B, L] int64, padding positions set to 0
    mask: Tensor             # [B, L] bool, True = token
    types: Optional[Tensor]  # [B, L] int64 token type ids, or None
    padded: bool             # some position is padding


def _as_2d_tensor(name: str, value, dtype: torch.dtype) -> Tensor:
    """A ``[B, L]`` tensor from a tensor or a rectangular list of lists of ints."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, length], got shape {tuple(value.shape)}")
        return value
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a 2-D tensor or a list of equal-length lists of ints, "
                         f"got {type(value).__name__}")
    rows = list(value)
    if not rows:
        raise ValueError(f"{name} is empty")
    width = None
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
            raise ValueError(f"{name} must be 2-D: row {i} is {type(row).__name__}, not a list of ints")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ValueError(f"{name} is ragged: row 0 has {width} tokens but row {i} has {len(row)}; "
                             "pad the rows to one length and pass attention_mask (0 = padding)")
        for j, tok in enumerate(row):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"{name} must be 2-D ints: [{i}][{j}] is {type(tok).__name__}")
    return torch.tensor(rows, dtype=dtype)


def token_batch(input_ids, attention_mask=None, *, vocab_size: int, max_batch_size: int,
                device: torch.device, type_ids=None, type_vocab_size: Optional[int] = None,
                left_align: bool = True) -> "TokenBatch":
    """A validated :class:`TokenBatch` on ``device``.

    Args:
        input_ids: ``[B, L]`` ints (tensor or rectangular list).
        attention_mask: ``[B, L]``, 1/True = token, 0/False = padding; None = no padding. Every
            row needs at least one token.
        left_align: move each row's tokens to the right end, keeping their order (decoders
            continue the prompt at a shared cache slot). Any mask works: right padding and
            holes are compacted, which is what Hugging Face's mask and position ids mean.
        type_ids: optional ``[B, L]`` token type (segment) ids below ``type_vocab_size``.

    Every check costs one host sync in all (a CUDA tensor's values must be read once).
    """
    ids = _as_2d_tensor("input_ids", input_ids, torch.int64)
    batch, length = ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(ids.shape)}")
    if batch > max_batch_size:
        raise ValueError(f"input_ids has {batch} rows, more than max_batch_size={max_batch_size}")
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=ids.device)
    else:
        mask = _as_2d_tensor("attention_mask", attention_mask, torch.int64) \
            if not (isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool) else attention_mask
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must have the shape of input_ids {(batch, length)}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(ids.device)
    types = None
    if type_ids is not None:
        types = _as_2d_tensor("token_type_ids", type_ids, torch.int64)
        if tuple(types.shape) != (batch, length):
            raise ValueError(f"token_type_ids must have the shape of input_ids {(batch, length)}, "
                             f"got {tuple(types.shape)}")
        types = types.to(ids.device)
    # every check is a device-side flag, read back with one sync; details only on failure
    no = torch.zeros((), dtype=torch.bool, device=ids.device)
    bad_mask = ((mask != 0) & (mask != 1)).any() if mask.dtype != torch.bool else no
    mask = mask != 0
    out_of_vocab = ((ids < 0) | (ids >= vocab_size)) & mask
    bad_types = no if types is None else (((types < 0) | (types >= type_vocab_size)) & mask).any()
    flags = torch.stack([bad_mask, (~mask.any(dim=1)).any(), out_of_vocab.any(), bad_types,
                         mask.all()]).tolist()
    if flags[0]:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if flags[1]:
        row = int((~mask.any(dim=1)).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no token")
    if flags[2]:
        value = int(ids[out_of_vocab][0])
        raise ValueError(f"input_ids holds token id {value}, outside the vocabulary [0, {vocab_size})")
    if flags[3]:
        raise ValueError(f"token_type_ids must be in [0, {type_vocab_size})")
    padded = not flags[4]
    if padded:
        ids = ids.masked_fill(~mask, 0)
        types = None if types is None else types.masked_fill(~mask, 0)
        if left_align:
            # stable sort of 0/1 keys: padding first, tokens after it in their original order
            order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
            ids, mask = ids.gather(1, order), mask.gather(1, order)
            types = None if types is None else types.gather(1, order)
    ids, mask = ids.to(device), mask.to(device)
    return TokenBatch(ids, mask, None if types is None else types.to(device), padded)
