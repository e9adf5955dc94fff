"""fairseq's ``TransformerEncoderLayerBase`` (and the legacy ``TransformerEncoderLayer``).

Post-LN (``normalize_before=False``, the paper's and fairseq's default) runs each sub-block's
bias + dropout + residual + LayerNorm as one kernel; pre-LN fuses the residual add with the next
sub-block's LayerNorm. Attention is SDPA on the layer's own q/k/v weights, time-first.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

from fastpatch.adapters import FUSED_ATTR, LayerAdapter
from fastpatch.layers.functional import (ConcatCache, LayerNormWeights, Projection, feed_forward,
                                         layer_norm, post_norm_residual, pre_norm_residual)

from . import _checks
from .attention import active_dropout, self_attention


@dataclasses.dataclass(frozen=True)
class EncoderLayerPlan:
    activation: str
    #: the self-attention q/k/v concatenation, reused across inference calls
    qkv_cache: ConcatCache = dataclasses.field(default_factory=ConcatCache, compare=False,
                                               repr=False)


class FusedTransformerEncoderLayer:
    """Fused ``forward`` of a fairseq encoder layer (same signature and outputs).

    Dropout probabilities are read from the layer's ``FairseqDropout`` modules at every call, so
    ``--retain-dropout`` and later changes of ``p`` are honoured.
    """

    def forward(self, x: Tensor, encoder_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor] = None):
        """``x``: ``[T, B, C]``; ``encoder_padding_mask``: ``[B, T]`` True = padding; ``attn_mask``:
        ``[T, T]`` with 1 = masked (float or bool), turned into fairseq's -1e8 / -1e4 fill."""
        plan: EncoderLayerPlan = getattr(self, FUSED_ATTR)
        if attn_mask is not None:
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool),
                                              -1e8 if x.dtype == torch.float32 else -1e4)
        p = active_dropout(self.dropout_module)
        residual = x
        attn_norm = LayerNormWeights.of(self.self_attn_layer_norm)
        final_norm = LayerNormWeights.of(self.final_layer_norm)
        h = layer_norm(x, attn_norm) if self.normalize_before else x
        attn = self_attention(self.self_attn, h, encoder_padding_mask, attn_mask, None,
                              plan.qkv_cache)
        bias = self.self_attn.out_proj.bias
        if self.normalize_before:
            x, h = pre_norm_residual(attn, bias, residual, final_norm, p, p > 0)
        else:
            x = h = post_norm_residual(attn, bias, residual, attn_norm, p, p > 0)
        act_p = active_dropout(self.activation_dropout_module)
        y = feed_forward(h, Projection.of(self.fc1), Projection.of(self.fc2), plan.activation,
                         activation_dropout=act_p, training=act_p > 0)
        if self.normalize_before:
            return x + F.dropout(y + self.fc2.bias, p, training=p > 0)
        return post_norm_residual(y, self.fc2.bias, x, final_norm, p, p > 0)


class EncoderLayerAdapter(LayerAdapter):
    name = "fairseq.transformer_encoder_layer"
    fused_mixin = FusedTransformerEncoderLayer

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, TransformerEncoderLayerBase)

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        overridden = _checks.overridden_problem(module, TransformerEncoderLayerBase)
        if overridden:
            return overridden
        if module.return_fc:
            return "return_fc=True (the fc2 output is returned separately)"
        if _checks.activation_name(module.activation_fn) is None:
            return f"activation_fn {getattr(module.activation_fn, '__name__', module.activation_fn)!r} " \
                   "has no fused kernel"
        width = module.embed_dim
        return (_checks.wrapped_forward_problem(module)
                or _checks.attention_problem("self_attn", module.self_attn, self_attention=True)
                or _checks.linear_problem("fc1", module.fc1)
                or _checks.linear_problem("fc2", module.fc2)
                or _checks.norm_problem("self_attn_layer_norm", module.self_attn_layer_norm, width)
                or _checks.norm_problem("final_layer_norm", module.final_layer_norm, width))

    def prepare(self, module: nn.Module) -> EncoderLayerPlan:
        return EncoderLayerPlan(activation=_checks.activation_name(module.activation_fn))
