"""BART-shaped encoder and decoder layers of transformers 5.

Eight families share one layer code (``self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
decoder ``encoder_attn`` + ``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``)
and differ only in where the LayerNorms sit and in the fp16 clamp of the encoder output:

* post-LN, clamp only once an inf/NaN appeared: BART, PLBart, Marian, BlenderbotSmall;
* pre-LN, clamp always: mBART, Blenderbot, Pegasus, M2M100.

Embeddings (``scale_embedding``, learned or sinusoidal positions, ``layernorm_embedding``), the
final encoder/decoder LayerNorm of the pre-LN families and LayerDrop live in the parent
encoder/decoder, which stays the original and keeps honouring them.

Incremental decoding goes through transformers' own ``EncoderDecoderCache`` exactly as
``BartAttention`` uses it: self-attention appends to ``self_attention_cache``, cross-attention
projects the encoder states once, stores them in ``cross_attention_cache`` and sets
``is_updated[layer_idx]``, then reads them back; so ``generate()`` (greedy, beam search with
``reorder_cache``) sees the cache it expects.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from fastpatch.adapters import FUSED_ATTR, LayerAdapter
from fastpatch.layers.functional import (ConcatCache, LayerNormWeights, Projection,
                                         cross_attention, feed_forward, layer_norm,
                                         post_norm_residual, pre_norm_residual, self_attention)
from fastpatch.ops.activations import canonical_activation

from .masks import cache_argument_problem, layer_cache, split_hf_mask

POST_LN_FAMILIES = ("Bart", "PLBart", "Marian", "BlenderbotSmall")
PRE_LN_FAMILIES = ("MBart", "Blenderbot", "Pegasus", "M2M100")
# Attention implementations whose masks are tensors (4D bool/additive) or 2D padding masks;
# flex attention (BlockMask) and paged attention (its own cache and kwargs) are left alone.
FUSABLE_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
_FP16_LIMIT = torch.finfo(torch.float16).max - 1000  # the encoder layers' clamp value


@dataclasses.dataclass(frozen=True)
class BartLayerPlan:
    pre_norm: bool
    activation: str
    #: fp16 encoder output clamp: "if_overflow" (post-LN families), "always" (pre-LN), "never"
    fp16_clamp: str
    #: q/k/v and cross-attention k/v concatenations, reused across inference calls
    qkv_cache: ConcatCache = dataclasses.field(default_factory=ConcatCache, compare=False,
                                               repr=False)
    cross_kv_cache: ConcatCache = dataclasses.field(default_factory=ConcatCache, compare=False,
                                                    repr=False)


def _fused_call(config, kwargs) -> bool:
    """False where only the original forward can serve the call.

    Attention probabilities are collected (``output_attentions``, from the call or the config,
    as transformers' output recorder decides) only by the unfused attention modules, and the
    attention implementation may have been switched after ``accelerate``.
    """
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        return False
    return config._attn_implementation in FUSABLE_ATTENTION


def _add_norm(plan: BartLayerPlan, y, bias, residual, norm: nn.LayerNorm,
              next_norm: Optional[nn.LayerNorm], dropout: float, training: bool):
    """Close a sublayer: ``(residual stream, input of the next sublayer)``.

    Post-LN: both are ``norm(residual + dropout(y + bias))``. Pre-LN: the stream is
    ``r = residual + dropout(y + bias)`` and the next input ``next_norm(r)`` (None after the
    last sublayer).
    """
    if not plan.pre_norm:
        out = post_norm_residual(y, bias, residual, LayerNormWeights.of(norm), dropout, training)
        return out, out
    if next_norm is None:
        return residual + nn.functional.dropout(y + bias, dropout, training), None
    return pre_norm_residual(y, bias, residual, LayerNormWeights.of(next_norm), dropout, training)


def _clamp_fp16(x: torch.Tensor, mode: str) -> torch.Tensor:
    if x.dtype != torch.float16 or mode == "never":
        return x
    clamped = torch.clamp(x, min=-_FP16_LIMIT, max=_FP16_LIMIT)
    if mode == "always":
        return clamped
    # the original clamps only if some value overflowed; deciding on the device keeps the
    # result identical without its host synchronisation
    return torch.where(torch.isfinite(x).all(), x, clamped)


class FusedBartShapedEncoderLayer:
    """Fused forward of a BART-shaped encoder layer; the original forward remains the fallback."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn = self.self_attn
        if not _fused_call(attn.config, kwargs):
            return super().forward(hidden_states, attention_mask, **kwargs)
        plan: BartLayerPlan = getattr(self, FUSED_ATTR)
        training = self.training
        key_padding_mask, attn_mask = split_hf_mask(attention_mask)
        x = hidden_states
        if plan.pre_norm:
            x = layer_norm(hidden_states, LayerNormWeights.of(self.self_attn_layer_norm))
        context = self_attention(
            x, Projection.of(attn.q_proj, attn.k_proj, attn.v_proj, cache=plan.qkv_cache),
            Projection.of(attn.out_proj), attn.num_heads, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask, attn_dropout=attn.dropout, training=training, scale=attn.scaling)
        residual, x = _add_norm(plan, context, attn.out_proj.bias, hidden_states,
                                self.self_attn_layer_norm, self.final_layer_norm, self.dropout,
                                training)
        ffn = feed_forward(x, Projection.of(self.fc1), Projection.of(self.fc2), plan.activation,
                           activation_dropout=self.activation_dropout, training=training)
        out, _ = _add_norm(plan, ffn, self.fc2.bias, residual, self.final_layer_norm, None,
                           self.dropout, training)
        return _clamp_fp16(out, plan.fp16_clamp)


def _self_attention_cache(past_key_values, layer_idx: int, top_left_causal: bool, q_len: int):
    """``kv_update`` appending to the decoder self-attention cache, or None without a cache.

    ``top_left_causal``: transformers' SDPA path, given no mask, runs ``is_causal`` (top-left
    aligned) on the first ``q_len`` keys. It drops the mask only when that is exact: equal
    lengths, one query, or a prefill into an empty static cache whose slots past the prompt are
    empty; the last case is reproduced by keeping those keys only.
    """
    if past_key_values is None:
        return None
    cache = (past_key_values.self_attention_cache
             if isinstance(past_key_values, EncoderDecoderCache) else past_key_values)

    def update(k, v):
        k, v = cache.update(k, v, layer_idx)
        if top_left_causal and 1 < q_len < k.shape[2]:
            return k[:, :, :q_len], v[:, :, :q_len]
        return k, v

    return update


def _cross_attention_cache(past_key_values, layer_idx: int):
    """``(memory_kv, kv_update)`` for cross-attention, as ``BartAttention`` uses the cache.

    With an ``EncoderDecoderCache`` the encoder's keys and values are projected once, stored and
    flagged in ``is_updated``, then read back. A plain ``Cache`` (the decoder used alone with
    encoder states) is updated like the original does.
    """
    if past_key_values is None:
        return None, None
    if not isinstance(past_key_values, EncoderDecoderCache):
        return None, lambda k, v: past_key_values.update(k, v, layer_idx)
    if past_key_values.is_updated.get(layer_idx):
        stored = past_key_values.cross_attention_cache.layers[layer_idx]
        return (stored.keys, stored.values), None

    def update(k, v):
        k, v = past_key_values.cross_attention_cache.update(k, v, layer_idx)
        past_key_values.is_updated[layer_idx] = True
        return k, v

    return None, update


class FusedBartShapedDecoderLayer:
    """Fused forward of a BART-shaped decoder layer; the original forward remains the fallback."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=True, **kwargs):
        past_key_values = layer_cache(past_key_values, kwargs)
        attn, cross = self.self_attn, self.encoder_attn
        config = attn.config
        if not _fused_call(config, kwargs):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask, past_key_values, use_cache, **kwargs)
        plan: BartLayerPlan = getattr(self, FUSED_ATTR)
        training = self.training
        with_cross = encoder_hidden_states is not None

        key_padding_mask, attn_mask = split_hf_mask(attention_mask)
        kv_update = _self_attention_cache(
            past_key_values, attn.layer_idx,
            top_left_causal=attention_mask is None and config._attn_implementation == "sdpa",
            q_len=hidden_states.shape[1])
        x = hidden_states
        if plan.pre_norm:
            x = layer_norm(hidden_states, LayerNormWeights.of(self.self_attn_layer_norm))
        context = self_attention(
            x, Projection.of(attn.q_proj, attn.k_proj, attn.v_proj, cache=plan.qkv_cache),
            Projection.of(attn.out_proj), attn.num_heads, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            # no 4D mask: transformers relies on the attention's own causality (SDPA's
            # is_causal, flash's causal flag)
            causal=attn_mask is None, attn_dropout=attn.dropout, training=training,
            scale=attn.scaling, kv_update=kv_update)
        next_norm = self.encoder_attn_layer_norm if with_cross else self.final_layer_norm
        residual, x = _add_norm(plan, context, attn.out_proj.bias, hidden_states,
                                self.self_attn_layer_norm, next_norm, self.dropout, training)

        if with_cross:
            key_padding_mask, attn_mask = split_hf_mask(encoder_attention_mask)
            memory_kv, kv_update = _cross_attention_cache(past_key_values, cross.layer_idx)
            context = cross_attention(
                x, Projection.of(cross.q_proj),
                Projection.of(cross.k_proj, cross.v_proj, cache=plan.cross_kv_cache),
                Projection.of(cross.out_proj), cross.num_heads, encoder_hidden_states,
                memory_kv=memory_kv, kv_update=kv_update, key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, attn_dropout=cross.dropout, training=training,
                scale=cross.scaling)
            residual, x = _add_norm(plan, context, cross.out_proj.bias, residual,
                                    self.encoder_attn_layer_norm, self.final_layer_norm,
                                    self.dropout, training)

        ffn = feed_forward(x, Projection.of(self.fc1), Projection.of(self.fc2), plan.activation,
                           activation_dropout=self.activation_dropout, training=training)
        out, _ = _add_norm(plan, ffn, self.fc2.bias, residual, self.final_layer_norm, None,
                           self.dropout, training)
        return out


class _BartShapedLayerAdapter(LayerAdapter):
    #: "EncoderLayer" or "DecoderLayer"
    kind: str = ""

    def _family(self, module: nn.Module) -> Optional[str]:
        cls = type(module)
        if not cls.__module__.startswith("transformers.") or not cls.__name__.endswith(self.kind):
            return None
        family = cls.__name__[: -len(self.kind)]
        return family if family in POST_LN_FAMILIES + PRE_LN_FAMILIES else None

    def applies_to(self, module: nn.Module) -> bool:
        return self._family(module) is not None

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        config = getattr(module.self_attn, "config", None)
        if config is None:
            return "layer has no config (not a transformers 5 BART-shaped layer)"
        act = config.activation_function
        if canonical_activation(act) is None:
            return f"activation_function={act!r} has no exact fused kernel"
        if config._attn_implementation not in FUSABLE_ATTENTION:
            return (f"attn_implementation={config._attn_implementation!r} (fused for "
                    f"{', '.join(FUSABLE_ATTENTION)})")
        attentions = [module.self_attn]
        if self.kind == "DecoderLayer":
            attentions.append(module.encoder_attn)
            problem = cache_argument_problem(module)
            if problem:
                return problem
        linears = [getattr(a, n) for a in attentions
                   for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if any(type(m) is not nn.Linear for m in linears + [module.fc1, module.fc2]):
            return "projections are not plain nn.Linear (quantised or adapter-wrapped)"
        norms = [n for n, m in module.named_children() if n.endswith("layer_norm")]
        if any(type(getattr(module, n)) is not nn.LayerNorm for n in norms):
            return "layer norms are not nn.LayerNorm"
        return None

    def prepare(self, module: nn.Module) -> BartLayerPlan:
        pre_norm = self._family(module) in PRE_LN_FAMILIES
        if self.kind == "DecoderLayer":
            clamp = "never"
        else:
            clamp = "always" if pre_norm else "if_overflow"
        return BartLayerPlan(
            pre_norm=pre_norm,
            activation=canonical_activation(module.self_attn.config.activation_function),
            fp16_clamp=clamp,
        )


class BartEncoderLayerAdapter(_BartShapedLayerAdapter):
    name = "huggingface.bart_encoder_layer"
    kind = "EncoderLayer"
    fused_mixin = FusedBartShapedEncoderLayer


class BartDecoderLayerAdapter(_BartShapedLayerAdapter):
    name = "huggingface.bart_decoder_layer"
    kind = "DecoderLayer"
    fused_mixin = FusedBartShapedDecoderLayer
