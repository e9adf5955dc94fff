"""Fused transformer sub-blocks as functions of (input, weights it does not own).

Adapters accelerate a framework's layer in place and call these with the layer's own
``nn.Parameter`` objects, so the model's parameters, their names and their owners never change.
The module classes in this package (``TransformerEncoderLayer``...) own their parameters and are
what LightSeq-style code builds directly.

Shapes: ``x`` is ``[B, L, H]``; a projection weight is ``[out, in]`` (``nn.Linear``) unless the
``Projection`` says ``transposed`` (GPT-2's ``Conv1D`` stores ``[in, out]``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops


class ConcatCache:
    """Concatenated parameters kept while they are unchanged and no gradient flows (inference).

    A training step must concatenate per call (autograd routes the gradient back to each
    piece); in eval under ``no_grad`` the same weights are concatenated again for every token of
    a decode loop, so the result is kept, keyed by the pieces' storage and version counters (an
    in-place update, ``.to()`` or ``load_state_dict`` invalidates it). One per accelerated layer:
    it costs one extra copy of the concatenated weights while the model is used for inference.
    """

    def __init__(self):
        self._entries = {}

    def cat(self, key: str, tensors: Sequence[Tensor], dim: int) -> Tensor:
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) \
                or torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return torch.cat(list(tensors), dim=dim)
        signature = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        out = torch.cat(list(tensors), dim=dim)
        self._entries[key] = (signature, out)
        return out

    def clear(self) -> None:
        self._entries.clear()


class Projection:
    """A linear map whose weight is one tensor or the row-concatenation of several.

    ``weights``/``biases`` are the framework's own tensors (e.g. BERT's separate query, key and
    value); they are concatenated so that one matmul serves them all, which keeps the checkpoint
    layout untouched. Training concatenates per call (a copy of a few MB); with a ``cache``,
    inference concatenates once (see :class:`ConcatCache`).

    A plain class, not a frozen dataclass: one is built per projection per forward, and dynamo
    cannot trace the ``object.__setattr__`` of a frozen dataclass's ``__init__``.
    """

    __slots__ = ("weights", "biases", "transposed", "cache")

    def __init__(self, weights: Sequence[Tensor],
                 biases: Optional[Sequence[Optional[Tensor]]] = None, transposed: bool = False,
                 cache: Optional[ConcatCache] = None):
        self.weights = weights
        self.biases = biases
        self.transposed = transposed
        self.cache = cache

    @classmethod
    def of(cls, *modules, transposed: bool = False, cache: Optional[ConcatCache] = None):
        """The projection of one framework module (``nn.Linear``, or GPT-2's ``Conv1D`` with
        ``transposed=True``), or of several stacked (q, k, v) sharing one matmul."""
        return cls(tuple(m.weight for m in modules), tuple(m.bias for m in modules),
                   transposed=transposed, cache=cache)

    def _cat(self, key: str, tensors: Sequence[Tensor], dim: int) -> Tensor:
        if self.cache is None:
            return torch.cat(list(tensors), dim=dim)
        return self.cache.cat(key, tensors, dim)

    def weight(self) -> Tensor:
        if len(self.weights) == 1:
            return self.weights[0]
        return self._cat("weight", self.weights, 1 if self.transposed else 0)

    def bias(self) -> Optional[Tensor]:
        if self.biases is None or all(b is None for b in self.biases):
            return None
        if len(self.biases) == 1:
            return self.biases[0]
        return self._cat("bias", self.biases, 0)

    def __call__(self, x: Tensor, *, with_bias: bool = True) -> Tensor:
        """``x [..., in] -> [..., out]``; ``with_bias=False`` leaves the bias to a fused epilogue."""
        w = self.weight()
        b = self.bias() if with_bias else None
        if self.transposed:
            out = torch.matmul(x, w)
            return out if b is None else out + b
        return torch.nn.functional.linear(x, w, b)


def promote(*tensors: Optional[Tensor]):
    """Cast to the widest floating dtype among ``tensors`` (None stays None).

    This is eager PyTorch's type promotion, which is what autocast training relies on: a bf16
    matmul output meeting an fp32 bias or residual continues in fp32. The fused ops take one
    dtype, so the narrower inputs are cast first, as eager would.
    """
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


class LayerNormWeights(NamedTuple):
    """An ``nn.LayerNorm``'s affine parameters and eps (a tuple: built per call, traceable)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float

    @classmethod
    def of(cls, module) -> "LayerNormWeights":
        """The weights and eps of an ``nn.LayerNorm`` (or fairseq's subclass of it)."""
        return cls(module.weight, module.bias, module.eps)


def self_attention(x: Tensor, qkv: Projection, out: Projection, num_heads: int, *,
                   key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                   causal: bool = False, attn_dropout: float = 0.0, training: bool = False,
                   scale: Optional[float] = None, kv_update=None) -> Tensor:
    """Multi-head self-attention up to (not including) the output projection's bias.

    Args:
        x: ``[B, L, H]``.
        qkv: projection to ``[B, L, 3H]`` (q, k, v stacked in that order).
        key_padding_mask: ``[B, S]`` bool, True = padding.
        attn_mask: bool (True = attend) or additive mask broadcastable to ``[B, heads, L, S]``.
        kv_update: ``(k, v) -> (k_all, v_all)`` for incremental decoding (a framework's cache).

    Returns:
        ``[B, L, H]``: the output projection WITHOUT its bias, for a fused bias epilogue.
    """
    b, length, hidden = x.shape
    head_dim = hidden // num_heads
    # view, not copy: SDPA takes the strided [B, h, L, d] layout as is
    q, k, v = qkv(x).view(b, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if kv_update is not None:
        k, v = kv_update(k, v)
    context = ops.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                            causal=causal, dropout_p=attn_dropout, training=training, scale=scale)
    context = context.transpose(1, 2).reshape(b, length, hidden)
    return out(context, with_bias=False)


def cross_attention(x: Tensor, q: Projection, kv: Projection, out: Projection, num_heads: int,
                    memory: Optional[Tensor] = None, *,
                    memory_kv: Optional[Tuple[Tensor, Tensor]] = None,
                    key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                    attn_dropout: float = 0.0, training: bool = False,
                    scale: Optional[float] = None, kv_update=None) -> Tensor:
    """Multi-head attention of ``x`` over an encoder's output, up to the output projection's bias.

    Args:
        x: ``[B, L, H]`` decoder states (the queries).
        q: projection of ``x`` to ``[B, L, H]``.
        kv: projection of ``memory`` to ``[B, S, 2H]`` (k, v stacked in that order).
        memory: ``[B, S, H_mem]`` encoder states; not read when ``memory_kv`` is given.
        memory_kv: ``(k, v)``, each ``[B, heads, S, H / heads]``, projected by an earlier call:
            the encoder's keys and values do not change while decoding (a framework's cache).
        key_padding_mask: ``[B, S]`` bool, True = padding.
        attn_mask: bool (True = attend) or additive mask broadcastable to ``[B, heads, L, S]``.
        kv_update: ``(k, v) -> (k, v)`` applied to freshly projected keys and values (e.g. to
            store them in a cache).

    Returns:
        ``[B, L, H]``: the output projection WITHOUT its bias, for a fused bias epilogue.
    """
    b, length, _ = x.shape
    query = q(x)
    hidden = query.shape[-1]
    head_dim = hidden // num_heads
    query = query.view(b, length, num_heads, head_dim).transpose(1, 2)
    if memory_kv is None:
        kv_shape = (*memory.shape[:2], 2, num_heads, head_dim)
        k, v = kv(memory).view(kv_shape).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_update is not None:
            k, v = kv_update(k, v)
    else:
        k, v = memory_kv
    context = ops.attention(query, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                            dropout_p=attn_dropout, training=training, scale=scale)
    context = context.transpose(1, 2).reshape(b, length, hidden)
    return out(context, with_bias=False)


def feed_forward(x: Tensor, fc1: Projection, fc2: Projection, activation: str, *,
                 activation_dropout: float = 0.0, training: bool = False) -> Tensor:
    """``fc2(dropout(act(fc1(x))))`` without fc2's bias (left to the fused epilogue)."""
    hidden, bias = promote(fc1(x, with_bias=False), fc1.bias())
    hidden = ops.bias_activation_dropout(hidden, bias, activation, p=activation_dropout,
                                         training=training)
    return fc2(hidden, with_bias=False)


def post_norm_residual(y: Tensor, bias: Optional[Tensor], residual: Tensor, norm: LayerNormWeights,
                       dropout: float, training: bool) -> Tensor:
    """``LayerNorm(residual + dropout(y + bias))`` in one kernel."""
    y, bias, residual, weight, ln_bias = promote(y, bias, residual, norm.weight, norm.bias)
    return ops.bias_dropout_residual_layernorm(y, bias, residual, weight, ln_bias, eps=norm.eps,
                                               p=dropout, training=training)


def pre_norm_residual(y: Tensor, bias: Optional[Tensor], residual: Tensor, norm: LayerNormWeights,
                      dropout: float, training: bool):
    """``(r, LayerNorm(r))`` with ``r = residual + dropout(y + bias)``, in one kernel."""
    y, bias, residual, weight, ln_bias = promote(y, bias, residual, norm.weight, norm.bias)
    return ops.bias_dropout_residual_prenorm(y, bias, residual, weight, ln_bias, eps=norm.eps,
                                             p=dropout, training=training)


def layer_norm(x: Tensor, norm: LayerNormWeights) -> Tensor:
    """A LayerNorm with nothing to fuse into it (pre-LN's first and final norms, embeddings).

    PyTorch's own kernel: ``ops.layer_norm`` measured slower than it at BERT/GPT-2 shapes
    (``benchmarks/RESULTS.md``), and there is no neighbouring op to save a pass over memory.
    """
    x, weight, bias = promote(x, norm.weight, norm.bias)
    return F.layer_norm(x, x.shape[-1:], weight, bias, norm.eps)
