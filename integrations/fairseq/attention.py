"""fairseq's ``MultiheadAttention`` semantics on fused ops, time-first, with its cache contract.

fairseq layers are time-first (``[T, B, C]``), and incremental decoding keeps, per attention
module, a buffer in ``incremental_state`` under that module's ``_incremental_state_id``:
``prev_key`` / ``prev_value`` ``[B, heads, S, head_dim]`` (contiguous) and
``prev_key_padding_mask``. These functions read and write exactly that buffer through the
module's own ``_get_input_buffer`` / ``_set_input_buffer``, so fairseq's
``reorder_incremental_state`` (beam search, shrinking batch) and any unfused code sharing the
state keep working unchanged.

Masks follow fairseq: padding masks are ``[B, S]`` with True/1 = padding (bool, byte, or the
float masks ``_append_prev_key_padding_mask`` builds); ``attn_mask`` is additive (float) or
True = masked (bool). :func:`fastpatch.ops.attention` wants bool True = attend, so bool masks
are inverted here.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpatch import ops
from fastpatch.layers.functional import ConcatCache, Projection

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


def active_dropout(module) -> float:
    """The probability a ``FairseqDropout`` applies now (0 in eval unless ``--retain-dropout``)."""
    p = float(module.p)
    return p if p > 0 and (module.training or module.apply_during_inference) else 0.0


def split_heads(y: Tensor, chunks: int, num_heads: int) -> Tuple[Tensor, ...]:
    """``[L, B, chunks * C]`` -> ``chunks`` strided views ``[B, heads, L, C / heads]``."""
    length, batch, width = y.shape
    head_dim = width // (chunks * num_heads)
    return y.view(length, batch, chunks, num_heads, head_dim).permute(2, 1, 3, 0, 4).unbind(0)


def merge_heads(context: Tensor) -> Tensor:
    """``[B, heads, L, d]`` -> ``[L, B, heads * d]``."""
    batch, heads, length, head_dim = context.shape
    return context.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)


def _padding(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask.to(torch.bool)


def _attn_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None or mask.is_floating_point():
        return mask
    return mask.to(torch.bool).logical_not()


def _attend(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
            attn_mask: Optional[Tensor], dropout_p: float, scale: float) -> Tensor:
    """Fused attention; ``k``/``v`` may hold one row per ``bsz // kv_bsz`` query rows (fairseq's
    beamable encoder-decoder attention): those query rows are folded into the query length."""
    bsz, heads, length, head_dim = q.shape
    kv_bsz = k.shape[0]
    group = bsz // kv_bsz
    if group > 1:
        q = q.reshape(kv_bsz, group, heads, length, head_dim).transpose(1, 2)
        q = q.reshape(kv_bsz, heads, group * length, head_dim)
    out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                        dropout_p=dropout_p, training=dropout_p > 0, scale=scale)
    if group > 1:
        out = out.reshape(kv_bsz, heads, group, length, head_dim).transpose(1, 2)
        out = out.reshape(bsz, heads, length, head_dim)
    return out


def _attend_with_weights(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                         dropout_p: float, scale: float, per_head: bool) -> Tuple[Tensor, Tensor]:
    """fairseq's explicit path, for when the caller wants the attention probabilities: the same
    ops in the same order (``q * scaling`` then ``q k^T``, fp32 softmax, dropout, ``p v``).

    Returns ``([B, heads, T, d], weights)`` with fp32 weights ``[heads, B, T, S]`` (``per_head``)
    or their mean over heads ``[B, T, S]``, as ``MultiheadAttention`` returns them."""
    bsz, heads, length, head_dim = q.shape
    kv_bsz, src_len = k.shape[0], k.shape[2]
    q = (q * scale).reshape(kv_bsz, bsz // kv_bsz, heads, length, head_dim)
    scores = torch.matmul(q, k.unsqueeze(1).transpose(-1, -2))  # [kv_bsz, group, heads, T, S]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.view(kv_bsz, 1, 1, 1, src_len), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = weights.type_as(scores)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    context = torch.matmul(probs, v.unsqueeze(1)).reshape(bsz, heads, length, head_dim)
    weights = weights.reshape(bsz, heads, length, src_len).transpose(1, 0)
    return context, (weights if per_head else weights.mean(dim=0))


def self_attention(mha, x: Tensor, key_padding_mask: Optional[Tensor],
                   attn_mask: Optional[Tensor],
                   incremental_state: Optional[IncrementalState],
                   qkv_cache: Optional[ConcatCache] = None) -> Tensor:
    """``mha(query=x, key=x, value=x, ...)`` up to (not including) ``out_proj``'s bias.

    Args:
        mha: the layer's ``MultiheadAttention`` (``self_attention=True``); its parameters are used.
        x: ``[T, B, C]``.
        key_padding_mask: ``[B, T]`` (True/1 = padding) or None.
        attn_mask: ``[T, S]`` additive or bool (True = masked), or None.
        incremental_state: fairseq's decoding state; the new keys/values are appended to the
            module's buffer and the query attends to all of them.
        qkv_cache: the layer's cache of the q/k/v weight concatenation (inference).

    Returns:
        ``[T, B, C]``: the output projection without its bias (left to the fused epilogue).
    """
    heads = mha.num_heads
    qkv = Projection.of(mha.q_proj, mha.k_proj, mha.v_proj, cache=qkv_cache)
    q, k, v = split_heads(qkv(x), 3, heads)
    if incremental_state is not None:
        saved = mha._get_input_buffer(incremental_state)
        if "prev_key" in saved:
            k = torch.cat([saved["prev_key"], k], dim=2)
            v = torch.cat([saved["prev_value"], v], dim=2)
        else:
            k, v = k.contiguous(), v.contiguous()
        key_padding_mask = mha._append_prev_key_padding_mask(
            key_padding_mask=key_padding_mask,
            prev_key_padding_mask=saved.get("prev_key_padding_mask"),
            batch_size=k.shape[0], src_len=k.shape[2], static_kv=False)
        saved["prev_key"], saved["prev_value"] = k, v
        saved["prev_key_padding_mask"] = key_padding_mask
        mha._set_input_buffer(incremental_state, saved)
    context = _attend(q, k, v, _padding(key_padding_mask), _attn_mask(attn_mask),
                      active_dropout(mha.dropout_module), mha.scaling)
    return F.linear(merge_heads(context), mha.out_proj.weight)


def cross_attention(mha, x: Tensor, encoder_out: Tensor, encoder_padding_mask: Optional[Tensor],
                    incremental_state: Optional[IncrementalState], need_weights: bool,
                    need_head_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``mha(query=x, key=encoder_out, value=encoder_out, static_kv=True, ...)`` without the
    output bias; returns ``(out [T, B, C], attention weights or None)``.

    Keys and values are projected from ``encoder_out`` (``[S, B', kdim]``) once per decoding
    state and then read from the buffer. With ``mha.beam_size > 1`` (``set_beam_size``) they are
    kept once per source sentence, not per hypothesis, as fairseq's beamable attention does.
    """
    heads = mha.num_heads
    bsz = x.shape[1]
    key_padding_mask = encoder_padding_mask
    saved = mha._get_input_buffer(incremental_state) if incremental_state is not None else None
    if saved is not None and "prev_key" in saved:
        k, v = saved["prev_key"], saved["prev_value"]
        key_padding_mask = mha._append_prev_key_padding_mask(
            key_padding_mask=key_padding_mask,
            prev_key_padding_mask=saved.get("prev_key_padding_mask"),
            batch_size=k.shape[0], src_len=k.shape[2], static_kv=True)
        saved["prev_key_padding_mask"] = key_padding_mask
        mha._set_input_buffer(incremental_state, saved)
    else:
        if mha.beam_size > 1 and bsz == encoder_out.shape[1]:
            src_len, _, width = encoder_out.shape
            encoder_out = encoder_out.view(src_len, -1, mha.beam_size, width)[:, :, 0, :]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.view(
                    -1, mha.beam_size, key_padding_mask.shape[1])[:, 0, :]
        kv = Projection.of(mha.k_proj, mha.v_proj)
        k, v = split_heads(kv(encoder_out), 2, heads)
        if saved is not None:
            k, v = k.contiguous(), v.contiguous()
            key_padding_mask = mha._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask, prev_key_padding_mask=None,
                batch_size=k.shape[0], src_len=k.shape[2], static_kv=True)
            saved["prev_key"], saved["prev_value"] = k, v
            saved["prev_key_padding_mask"] = key_padding_mask
            mha._set_input_buffer(incremental_state, saved)
    (q,) = split_heads(F.linear(x, mha.q_proj.weight, mha.q_proj.bias), 1, heads)
    padding = _padding(key_padding_mask)
    dropout_p = active_dropout(mha.dropout_module)
    weights = None
    if need_weights or need_head_weights:
        context, weights = _attend_with_weights(q, k, v, padding, dropout_p, mha.scaling,
                                                per_head=need_head_weights)
    else:
        context = _attend(q, k, v, padding, None, dropout_p, mha.scaling)
    return F.linear(merge_heads(context), mha.out_proj.weight), weights
