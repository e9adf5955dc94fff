"""fairseq's ``TransformerDecoderLayerBase`` (and the legacy ``TransformerDecoderLayer``).

Self-attention, optional encoder-decoder attention and the FFN each end in one fused bias +
dropout + residual (+ LayerNorm) kernel. Incremental decoding reads and writes the attention
modules' own ``incremental_state`` buffers (see :mod:`.attention`), so fairseq's
``SequenceGenerator`` (beam search, sampling, prefixes, shrinking batch) runs unchanged.

When the caller asks for attention weights (fairseq asks the alignment layer, by default the
last, for them), that layer's encoder-decoder attention computes the probabilities explicitly,
as ``MultiheadAttention`` does; every other attention runs on SDPA.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from fastpatch.adapters import FUSED_ATTR, LayerAdapter
from fastpatch.layers.functional import (ConcatCache, LayerNormWeights, Projection, feed_forward,
                                         layer_norm, post_norm_residual, pre_norm_residual)

from . import _checks
from .attention import active_dropout, cross_attention, self_attention


@dataclasses.dataclass(frozen=True)
class DecoderLayerPlan:
    activation: str
    #: the self-attention q/k/v concatenation, reused across inference calls
    qkv_cache: ConcatCache = dataclasses.field(default_factory=ConcatCache, compare=False,
                                               repr=False)


def _restore_state(mha, incremental_state, prev_state: Optional[List[Tensor]]) -> None:
    """fairseq's ``prev_self_attn_state`` / ``prev_attn_state`` arguments: seed the buffer."""
    if prev_state is None:
        return
    saved: Dict[str, Optional[Tensor]] = {"prev_key": prev_state[0], "prev_value": prev_state[1]}
    if len(prev_state) >= 3:
        saved["prev_key_padding_mask"] = prev_state[2]
    assert incremental_state is not None, "prev_*_state needs an incremental_state"
    mha._set_input_buffer(incremental_state, saved)


class FusedTransformerDecoderLayer:
    """Fused ``forward`` of a fairseq decoder layer: same signature, same ``(x, attn, None)``."""

    def forward(self, x: Tensor, encoder_out: Optional[Tensor] = None,
                encoder_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                prev_self_attn_state: Optional[List[Tensor]] = None,
                prev_attn_state: Optional[List[Tensor]] = None,
                self_attn_mask: Optional[Tensor] = None,
                self_attn_padding_mask: Optional[Tensor] = None,
                need_attn: bool = False, need_head_weights: bool = False):
        """``x``: ``[T, B, C]``; ``encoder_out``: ``[S, B, C_enc]``; masks as fairseq's layer."""
        if self.onnx_trace:  # ONNX export wants the state returned; leave it to fairseq
            return super().forward(x, encoder_out, encoder_padding_mask, incremental_state,
                                   prev_self_attn_state, prev_attn_state, self_attn_mask,
                                   self_attn_padding_mask, need_attn, need_head_weights)
        plan: DecoderLayerPlan = getattr(self, FUSED_ATTR)
        if need_head_weights:
            need_attn = True
        pre = self.normalize_before
        cross = self.encoder_attn is not None and encoder_out is not None
        p = active_dropout(self.dropout_module)

        residual = x
        h = layer_norm(x, LayerNormWeights.of(self.self_attn_layer_norm)) if pre else x
        _restore_state(self.self_attn, incremental_state, prev_self_attn_state)
        y = self_attention(self.self_attn, h, self_attn_padding_mask, self_attn_mask,
                           incremental_state, plan.qkv_cache)
        x, h = self._residual(y, self.self_attn.out_proj.bias, residual, self.self_attn_layer_norm,
                              self.encoder_attn_layer_norm if cross else self.final_layer_norm, p)

        attn = None
        if cross:
            residual = x
            _restore_state(self.encoder_attn, incremental_state, prev_attn_state)
            y, attn = cross_attention(self.encoder_attn, h, encoder_out, encoder_padding_mask,
                                      incremental_state,
                                      need_weights=need_attn or (not self.training and self.need_attn),
                                      need_head_weights=need_head_weights)
            x, h = self._residual(y, self.encoder_attn.out_proj.bias, residual,
                                  self.encoder_attn_layer_norm, self.final_layer_norm, p)

        act_p = active_dropout(self.activation_dropout_module)
        y = feed_forward(h, Projection.of(self.fc1),
                         Projection.of(self.fc2), plan.activation,
                         activation_dropout=act_p, training=act_p > 0)
        if pre:
            x = x + F.dropout(y + self.fc2.bias, p, training=p > 0)
        else:
            x = post_norm_residual(y, self.fc2.bias, x, LayerNormWeights.of(self.final_layer_norm), p,
                                   p > 0)
        return x, attn, None

    def _residual(self, y: Tensor, bias: Optional[Tensor], residual: Tensor, own_norm: nn.Module,
                  next_norm: nn.Module, p: float):
        """End of a sub-block: ``(x, input of the next sub-block)``. Post-LN normalises with the
        sub-block's own LayerNorm; pre-LN adds the residual and applies the next one's."""
        if self.normalize_before:
            return pre_norm_residual(y, bias, residual, LayerNormWeights.of(next_norm), p, p > 0)
        x = post_norm_residual(y, bias, residual, LayerNormWeights.of(own_norm), p, p > 0)
        return x, x


class DecoderLayerAdapter(LayerAdapter):
    name = "fairseq.transformer_decoder_layer"
    fused_mixin = FusedTransformerDecoderLayer

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, TransformerDecoderLayerBase)

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        overridden = _checks.overridden_problem(module, TransformerDecoderLayerBase)
        if overridden:
            return overridden
        if module.cross_self_attention:
            return "cross_self_attention=True"
        for knob, attr in (("scale_attn", "attn_ln"), ("scale_heads", "c_attn"),
                           ("scale_fc", "ffn_layernorm"), ("scale_resids", "w_resid")):
            if getattr(module, attr, None) is not None:
                return f"{knob}=True (NormFormer)"
        if _checks.activation_name(module.activation_fn) is None:
            return f"activation_fn {getattr(module.activation_fn, '__name__', module.activation_fn)!r} " \
                   "has no fused kernel"
        width = module.embed_dim
        problem = (_checks.wrapped_forward_problem(module)
                   or _checks.attention_problem("self_attn", module.self_attn, self_attention=True)
                   or _checks.linear_problem("fc1", module.fc1)
                   or _checks.linear_problem("fc2", module.fc2)
                   or _checks.norm_problem("self_attn_layer_norm", module.self_attn_layer_norm, width)
                   or _checks.norm_problem("final_layer_norm", module.final_layer_norm, width))
        if problem is None and module.encoder_attn is not None:
            problem = (_checks.attention_problem("encoder_attn", module.encoder_attn,
                                                 self_attention=False)
                       or _checks.norm_problem("encoder_attn_layer_norm",
                                               module.encoder_attn_layer_norm, width))
        return problem

    def prepare(self, module: nn.Module) -> DecoderLayerPlan:
        return DecoderLayerPlan(activation=_checks.activation_name(module.activation_fn))
