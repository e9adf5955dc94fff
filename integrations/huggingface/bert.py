"""BERT-shaped encoder layers: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, Data2VecText.

They share one structure (``attention.self.{query,key,value}``, ``attention.output.{dense,
LayerNorm}``, ``intermediate.dense``, ``output.{dense,LayerNorm}``) and post-LN semantics, so
one adapter serves them all. The fused forward reads the layer's own parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from fastpatch.adapters import FUSED_ATTR, LayerAdapter, bypassed_submodule
from fastpatch.layers.functional import (ConcatCache, LayerNormWeights, Projection, feed_forward,
                                         post_norm_residual, self_attention)
from fastpatch.ops.activations import canonical_activation

from .masks import cache_argument_problem, layer_cache, split_hf_mask

# every submodule whose weights the fused layer reads, with the class it reproduces
_PLAIN_SUBMODULES = {**{f"attention.self.{n}": nn.Linear for n in ("query", "key", "value")},
                     "attention.output.dense": nn.Linear, "attention.output.LayerNorm": nn.LayerNorm,
                     "intermediate.dense": nn.Linear, "output.dense": nn.Linear,
                     "output.LayerNorm": nn.LayerNorm}
BERT_SHAPED_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer",
                      "ElectraLayer", "Data2VecTextLayer")


@dataclasses.dataclass(frozen=True)
class BertLayerPlan:
    num_heads: int
    activation: str
    attention_dropout: float
    hidden_dropout: float
    scale: float
    #: the q/k/v concatenation, reused across inference calls
    qkv_cache: ConcatCache = dataclasses.field(default_factory=ConcatCache, compare=False,
                                               repr=False)


class FusedBertShapedLayer:
    """Fused forward of a BERT-shaped layer; the original forward remains the fallback."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, **kwargs):
        past_key_values = layer_cache(past_key_values, kwargs)
        if kwargs.get("output_attentions"):
            # the probabilities exist only in the unfused path
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask, past_key_values, **kwargs)
        plan: BertLayerPlan = getattr(self, FUSED_ATTR)
        attn = self.attention
        sa = attn.self
        key_padding_mask, attn_mask = split_hf_mask(attention_mask)
        training = self.training
        context = self_attention(
            hidden_states,
            Projection.of(sa.query, sa.key, sa.value, cache=plan.qkv_cache),
            Projection.of(attn.output.dense), plan.num_heads,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            attn_dropout=plan.attention_dropout, training=training, scale=plan.scale)
        hidden = post_norm_residual(context, attn.output.dense.bias, hidden_states,
                                    LayerNormWeights.of(attn.output.LayerNorm), plan.hidden_dropout,
                                    training)
        ffn = feed_forward(hidden, Projection.of(self.intermediate.dense),
                           Projection.of(self.output.dense), plan.activation, training=training)
        return post_norm_residual(ffn, self.output.dense.bias, hidden,
                                  LayerNormWeights.of(self.output.LayerNorm), plan.hidden_dropout,
                                  training)


class BertLayerAdapter(LayerAdapter):
    name = "huggingface.bert_layer"
    fused_mixin = FusedBertShapedLayer

    def applies_to(self, module: nn.Module) -> bool:
        return type(module).__name__ in BERT_SHAPED_LAYERS

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        problem = cache_argument_problem(module)
        if problem:
            return problem
        config = getattr(module.attention.self, "config", None)
        if config is None:
            return "layer has no config (not a transformers 5 BERT-shaped layer)"
        if getattr(config, "is_decoder", False) or getattr(module, "add_cross_attention", False):
            return "is_decoder / add_cross_attention (BERT as a decoder) is not supported"
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            return (f"position_embedding_type={config.position_embedding_type!r} "
                    "(relative positions)")
        if getattr(module, "chunk_size_feed_forward", 0):
            return f"chunk_size_feed_forward={module.chunk_size_feed_forward} (chunked FFN)"
        act = config.hidden_act
        if canonical_activation(act) is None:
            return f"hidden_act={act!r} has no exact fused kernel"
        return bypassed_submodule(module, _PLAIN_SUBMODULES)

    def prepare(self, module: nn.Module) -> BertLayerPlan:
        sa = module.attention.self
        return BertLayerPlan(
            num_heads=sa.num_attention_heads,
            activation=canonical_activation(sa.config.hidden_act),
            attention_dropout=sa.dropout.p,
            hidden_dropout=module.output.dropout.p,
            scale=sa.scaling,
        )
