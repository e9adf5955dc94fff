"""Fused transformer decoder layer: causal self-attention, optional cross-attention, FFN."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._sublayers import FusedSublayers, check_hidden, check_padding_mask
from .kv_cache import KVCache, StaticKVCache

Cache = Union[KVCache, StaticKVCache]


def _combine_masks(user: Optional[Tensor], visible: Optional[Tensor]) -> Optional[Tensor]:
    """``user`` (bool: True = may attend, or additive float) restricted to ``visible`` slots."""
    if visible is None:
        return user
    if user is None:
        return visible
    if user.dtype == torch.bool:
        return user & visible
    return user.masked_fill(~visible, float("-inf"))


class TransformerDecoderLayer(FusedSublayers):
    """One decoder layer (fairseq/BART decoders with ``config.cross_attention``; decoder-only
    blocks such as GPT-2 without it), with incremental decoding through a per-layer cache.

    Post-LN::

        x = LN_attn(x + dropout(SelfAttn(x)))            # causal when config.causal
        x = LN_cross(x + dropout(CrossAttn(x, enc)))     # if config.cross_attention
        x = LN_ffn(x + dropout(FFN(x)))

    Pre-LN normalises each sub-block's input instead (``x = x + dropout(Block(LN(x)))``).
    Parameters are listed in :class:`~fastpatch.layers._sublayers.FusedSublayers`.
    """

    def forward(self, hidden_states: Tensor, encoder_out: Optional[Tensor] = None,
                encoder_padding_mask: Optional[Tensor] = None, cache: Optional[Cache] = None,
                self_attn_padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None, causal: Optional[bool] = None) -> Tensor:
        """
        Args:
            hidden_states: ``[B, L, H]``: the whole target (training) or this step's new tokens
                (incremental decoding with ``cache``).
            encoder_out: ``[B, S, E]`` (batch-first), needed when the layer has cross-attention
                unless ``cache`` already holds its keys/values.
            encoder_padding_mask: bool ``[B, S]``, True marks encoder padding.
            cache: a :class:`KVCache` or :class:`StaticKVCache`, updated in place: this step's
                keys/values are appended and the cross-attention ones stored on first use.
            self_attn_padding_mask: bool ``[B, K]`` over the keys the self-attention sees (the
                ``K = past + L`` tokens with a growing cache, the ``capacity`` slots with a static
                one, ``L`` without a cache); True marks padding (e.g. left-padded prompts).
            self_attn_mask: optional extra self-attention mask broadcastable to
                ``[B, heads, L, K]``: bool (True = may attend) or additive float.
            causal: overrides ``config.causal``. Causal masks are aligned bottom-right: new token
                ``i`` sees every cached token and new tokens ``<= i``.

        Returns:
            ``[B, L, H]``.
        """
        c = self.config
        check_hidden("hidden_states", hidden_states, c.hidden_size)
        batch = hidden_states.shape[0]
        causal = c.causal if causal is None else causal
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool or None, got {type(causal).__name__}")
        if cache is not None and not isinstance(cache, (KVCache, StaticKVCache)):
            raise TypeError(f"cache must be a KVCache or StaticKVCache, got "
                            f"{type(cache).__name__}")
        blocks = [self._self_attention_block(batch, cache, self_attn_padding_mask,
                                             self_attn_mask, causal)]
        if c.cross_attention:
            blocks.append(self._cross_attention_block(batch, encoder_out, encoder_padding_mask,
                                                      cache))
        elif encoder_out is not None:
            raise ValueError("encoder_out was given but the layer has no cross-attention "
                             "(config.cross_attention=False)")
        return self._run_blocks(hidden_states, blocks)

    def _self_attention_block(self, batch, cache, padding_mask, user_mask, causal):
        def block(h: Tensor):
            q, k, v = self.project_heads(h, self.qkv_weight, self.qkv_bias, 3)
            is_causal, mask = causal, user_mask
            if cache is not None:
                k, v, visible = cache.update(k, v, causal)
                if cache.encodes_causality:
                    is_causal, mask = False, _combine_masks(user_mask, visible)
            check_padding_mask("self_attn_padding_mask", padding_mask, batch, k.shape[2])
            y = self._attend(q, k, v, self.attn_out_weight, key_padding_mask=padding_mask,
                             causal=is_causal, attn_mask=mask)
            return y, self.attn_out_bias
        return block

    def _cross_attention_block(self, batch, encoder_out, padding_mask, cache):
        cached = cache is not None and cache.cross_key is not None
        if not cached:
            if encoder_out is None:
                raise ValueError("encoder_out is required: the layer has cross-attention and no "
                                 "cached encoder keys/values")
            if (not isinstance(encoder_out, Tensor) or encoder_out.dim() != 3
                    or encoder_out.shape[0] != batch
                    or encoder_out.shape[2] != self.config.kv_input_size):
                got = tuple(encoder_out.shape) if isinstance(encoder_out, Tensor) else encoder_out
                raise ValueError(f"encoder_out must have shape [{batch}, src_len, "
                                 f"{self.config.kv_input_size}], got {got}")

        def block(h: Tensor):
            (q,) = self.project_heads(h, self.cross_q_weight, self.cross_q_bias, 1)
            if cached:
                k, v = cache.cross_key, cache.cross_value
            else:
                k, v = self.project_heads(encoder_out, self.cross_kv_weight, self.cross_kv_bias, 2)
                if cache is not None:
                    cache.set_cross(k, v)
            check_padding_mask("encoder_padding_mask", padding_mask, batch, k.shape[2])
            y = self._attend(q, k, v, self.cross_out_weight, key_padding_mask=padding_mask,
                             causal=False, attn_mask=None)
            return y, self.cross_out_bias
        return block


__all__ = ["TransformerDecoderLayer", "KVCache", "StaticKVCache"]
