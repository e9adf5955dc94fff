"""Transformer encoder sub-blocks over exported tensors, shared by the encoder engines.

Each is fastpatch's fused ops applied to weights the engine does not own: ``split_heads`` (bias
add + head split in one kernel), ``attention`` (SDPA with a padding mask),
``bias_dropout_residual_layernorm`` (bias + residual + LayerNorm in one kernel) and
``bias_activation_dropout`` inside ``feed_forward``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from torch import Tensor

from .. import ops
from ..layers.functional import (LayerNormWeights, Projection, feed_forward, layer_norm, post_norm_residual,
                                 pre_norm_residual)


def linear(tensors: Dict[str, Tensor], prefix: str) -> Projection:
    """``prefix.weight`` ``[out, in]`` and ``prefix.bias`` as a projection."""
    return Projection((tensors[prefix + ".weight"],), (tensors[prefix + ".bias"],))


def norm(tensors: Dict[str, Tensor], prefix: str, eps: float) -> LayerNormWeights:
    return LayerNormWeights(tensors[prefix + ".weight"], tensors[prefix + ".bias"], eps)


def encoder_layer_shapes(prefix: str, hidden: int, ffn: int) -> Dict[str, Tuple[int, ...]]:
    """Exported tensor names and shapes of one post-LN encoder layer (see :class:`EncoderLayer`)."""
    h, f, p = hidden, ffn, prefix
    return {
        p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
        p + "attn.out.weight": (h, h), p + "attn.out.bias": (h,),
        p + "ln1.weight": (h,), p + "ln1.bias": (h,),
        p + "ffn.fc1.weight": (f, h), p + "ffn.fc1.bias": (f,),
        p + "ffn.fc2.weight": (h, f), p + "ffn.fc2.bias": (h,),
        p + "ln2.weight": (h,), p + "ln2.bias": (h,),
    }


@dataclasses.dataclass(frozen=True)
class EncoderLayer:
    """Weights of a post-LN encoder layer (BERT, BART): ``attn.qkv``, ``attn.out``, ``ln1``,
    ``ffn.fc1``, ``ffn.fc2``, ``ln2`` under one prefix."""

    qkv: Projection
    out: Projection
    ln1: LayerNormWeights
    fc1: Projection
    fc2: Projection
    ln2: LayerNormWeights

    @classmethod
    def of(cls, tensors: Dict[str, Tensor], prefix: str, eps: float) -> "EncoderLayer":
        return cls(linear(tensors, prefix + "attn.qkv"), linear(tensors, prefix + "attn.out"),
                   norm(tensors, prefix + "ln1", eps), linear(tensors, prefix + "ffn.fc1"),
                   linear(tensors, prefix + "ffn.fc2"), norm(tensors, prefix + "ln2", eps))


def encoder_layer(x: Tensor, layer: EncoderLayer, num_heads: int, activation: str,
                  padding: Optional[Tensor], *, normalize_before: bool = False) -> Tensor:
    """``x [B, L, H]`` through one layer; ``padding`` ``[B, L]`` bool, True = padding.

    Post-LN (BERT, BART): ``ln1``/``ln2`` normalise each sub-block's output. Pre-LN
    (``normalize_before``, fairseq's ``--encoder-normalize-before``): they normalise its input.
    """
    h = layer_norm(x, layer.ln1) if normalize_before else x
    q, k, v = ops.split_heads(layer.qkv(h, with_bias=False), layer.qkv.bias(), num_heads, 3)
    context = ops.merge_heads(ops.attention(q, k, v, key_padding_mask=padding))
    out = layer.out(context, with_bias=False)
    if normalize_before:
        x, h = pre_norm_residual(out, layer.out.bias(), x, layer.ln2, 0.0, False)
        return x + (feed_forward(h, layer.fc1, layer.fc2, activation) + layer.fc2.bias())
    x = post_norm_residual(out, layer.out.bias(), x, layer.ln1, 0.0, False)
    y = feed_forward(x, layer.fc1, layer.fc2, activation)
    return post_norm_residual(y, layer.fc2.bias(), x, layer.ln2, 0.0, False)
