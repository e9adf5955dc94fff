"""GPT-2 blocks (pre-LN, causal, ``Conv1D`` projections stored ``[in, out]``).

Incremental decoding goes through transformers' own ``Cache`` (``past_key_values.update``), so
``generate()`` with greedy or beam search (``reorder_cache``) and left-padded batches works as
with the original block: the 4D mask transformers builds already encodes causality and padding.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from fastpatch.adapters import FUSED_ATTR, LayerAdapter, bypassed_submodule
from fastpatch.layers.functional import (LayerNormWeights, Projection, feed_forward, layer_norm,
                                         pre_norm_residual, self_attention)
from fastpatch.ops.activations import canonical_activation

from .masks import cache_argument_problem, layer_cache, split_hf_mask


@dataclasses.dataclass(frozen=True)
class GPT2BlockPlan:
    num_heads: int
    layer_idx: int
    activation: str
    attention_dropout: float
    residual_dropout: float
    scale: float


class FusedGPT2Block:
    """Fused forward of ``GPT2Block``; falls back to the original for cross-attention/attentions."""

    def forward(self, hidden_states, past_key_values=None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
        past_key_values = layer_cache(past_key_values, kwargs)
        if encoder_hidden_states is not None or kwargs.get("output_attentions"):
            return super().forward(hidden_states, past_key_values, attention_mask,
                                   encoder_hidden_states, encoder_attention_mask, use_cache, **kwargs)
        plan: GPT2BlockPlan = getattr(self, FUSED_ATTR)
        training = self.training
        kv_update = None
        if past_key_values is not None:
            cache = getattr(past_key_values, "self_attention_cache", past_key_values)

            def kv_update(k, v):
                return cache.update(k, v, plan.layer_idx)
        key_padding_mask, attn_mask = split_hf_mask(attention_mask)
        normed = layer_norm(hidden_states, LayerNormWeights.of(self.ln_1))
        context = self_attention(
            normed, Projection.of(self.attn.c_attn, transposed=True),
            Projection.of(self.attn.c_proj, transposed=True), plan.num_heads,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            # with no 4D mask, transformers relies on causal attention (bottom-right aligned)
            causal=attn_mask is None, attn_dropout=plan.attention_dropout, training=training,
            scale=plan.scale, kv_update=kv_update)
        residual, normed = pre_norm_residual(context, self.attn.c_proj.bias, hidden_states,
                                             LayerNormWeights.of(self.ln_2), plan.residual_dropout,
                                             training)
        mlp = feed_forward(normed, Projection.of(self.mlp.c_fc, transposed=True),
                           Projection.of(self.mlp.c_proj, transposed=True), plan.activation,
                           training=training)
        return residual + nn.functional.dropout(mlp + self.mlp.c_proj.bias, plan.residual_dropout,
                                                training)


class GPT2BlockAdapter(LayerAdapter):
    name = "huggingface.gpt2_block"
    fused_mixin = FusedGPT2Block

    def applies_to(self, module: nn.Module) -> bool:
        return type(module).__name__ == "GPT2Block"

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        problem = cache_argument_problem(module)
        if problem:
            return problem
        config = module.attn.config
        if canonical_activation(config.activation_function) is None:
            return f"activation_function={config.activation_function!r} has no exact fused kernel"
        if config.reorder_and_upcast_attn and config._attn_implementation == "eager":
            return "reorder_and_upcast_attn with eager attention (fp32 attention scores)"
        if getattr(config, "add_cross_attention", False):
            return "add_cross_attention (GPT-2 as a decoder over an encoder) is not supported"
        from transformers.pytorch_utils import Conv1D

        return bypassed_submodule(module, {"attn.c_attn": Conv1D, "attn.c_proj": Conv1D,
                                           "mlp.c_fc": Conv1D, "mlp.c_proj": Conv1D,
                                           "ln_1": nn.LayerNorm, "ln_2": nn.LayerNorm})

    def prepare(self, module: nn.Module) -> GPT2BlockPlan:
        attn = module.attn
        return GPT2BlockPlan(
            num_heads=attn.num_heads,
            layer_idx=attn.layer_idx,
            activation=canonical_activation(attn.config.activation_function),
            attention_dropout=attn.attn_dropout.p,
            residual_dropout=attn.resid_dropout.p,
            scale=attn.scaling,
        )
