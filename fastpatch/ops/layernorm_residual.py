"""Fused ``LayerNorm(residual + dropout(x + bias))`` (post-LN), its pre-LN twin, and LayerNorm.

Eager PyTorch runs the bias add, dropout, residual add and LayerNorm as four kernels (and more
backward, plus the weight-gradient reductions), keeping each intermediate alive. The fused
forward reads ``x`` and ``residual`` once and writes ``h = residual + dropout(x + bias)``, the
normalised output, a byte keep-mask and an fp32 mean and rstd per row; the fused backward reads
``dy``, ``h`` and the mask once and writes the gradients of ``x`` and ``residual``, adding the
weight and bias gradients per block on the way (csrc/layernorm_residual.cu).

Custom ops (``torch.ops.fastpatch.*``, through :class:`~fastpatch.ops._dispatch.FusedOp`, so
eager calls skip the Python dispatcher and compile/export see the custom ops):

* ``bias_dropout_residual_layernorm(x, bias, residual, weight, ln_bias, eps, p)
  -> (out, h, mean, rstd, mask)``: post-LN uses ``out``, pre-LN uses ``(h, out)``.
* ``layer_norm(x, weight, bias, eps) -> (out, mean, rstd)``.
* ``bias_dropout_residual_layernorm_backward`` and ``layer_norm_backward``: one implementation,
  ``(grad_out, grad_h, h, mean, rstd, weight, mask, p, need_weight_grad, need_ln_bias_grad,
  need_bias_grad) -> (grad_h_total, grad_x, grad_weight, grad_ln_bias, grad_bias)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._autograd_utils import EMPTY_SHAPE, accumulation_dtype, contiguous_or_none, dropout_keep_mask
from ._checks import check_like, check_probability, check_tensor
from ._dispatch import FusedOp, kernel_for

# The kernels keep a row in registers: at most 512 threads x 8 packs of 16 bytes, i.e. 32768
# halves or 16384 floats (csrc/layernorm_residual.cu). Wider rows run the reference.
_KERNEL_MAX_ROW_BYTES = 512 * 8 * 16


def _kernel(name: str, x: Tensor, *tensors: Optional[Tensor]):
    """The CUDA kernel ``name`` if it applies to these tensors, else None (reference path)."""
    if x.shape[-1] * x.element_size() > _KERNEL_MAX_ROW_BYTES:
        return None
    return kernel_for(name, x, *tensors)


def _normalize(h: Tensor, weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float):
    """LayerNorm over the last dim in the accumulation dtype: ``(out, mean, rstd)``."""
    compute = accumulation_dtype(h.dtype)
    hc = h.to(compute)
    mean = hc.mean(-1)
    centered = hc - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    out = centered * rstd.unsqueeze(-1)
    if weight is not None:
        out = out * weight.to(compute)
    if ln_bias is not None:
        out = out + ln_bias.to(compute)
    return out.to(h.dtype), mean, rstd


def _reference_forward(x, bias, residual, weight, ln_bias, eps, p):
    compute = accumulation_dtype(x.dtype)
    mask = dropout_keep_mask(x, p)
    v = x.to(compute)
    if bias is not None:
        v = v + bias.to(compute)
    if p > 0.0:
        v = v * mask.to(compute) * (1.0 / (1.0 - p))
    # h is stored in x's dtype and normalised as stored, like eager PyTorch (and the kernel).
    h = (v + residual.to(compute)).to(x.dtype)
    out, mean, rstd = _normalize(h, weight, ln_bias, eps)
    return out, h, mean, rstd, mask


def _reference_backward(grad_out, grad_h, h, mean, rstd, weight, mask, p, need_weight_grad,
                        need_ln_bias_grad, need_bias_grad):
    compute = accumulation_dtype(h.dtype)
    dy = grad_out.to(compute)
    xhat = (h.to(compute) - mean.unsqueeze(-1).to(compute)) * rstd.unsqueeze(-1).to(compute)
    g = dy if weight is None else dy * weight.to(compute)
    dh = rstd.unsqueeze(-1).to(compute) * (
        g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_h is not None:
        dh = dh + grad_h.to(compute)
    dx = dh * mask.to(compute) * (1.0 / (1.0 - p)) if p > 0.0 else dh

    def column_sum(t: Tensor, wanted: bool) -> Tensor:
        if not wanted:
            return h.new_empty(EMPTY_SHAPE)
        return t.reshape(-1, t.shape[-1]).sum(0).to(h.dtype)

    return (dh.to(h.dtype), dx.to(h.dtype) if p > 0.0 else h.new_empty(EMPTY_SHAPE),
            column_sum(dy * xhat, need_weight_grad), column_sum(dy, need_ln_bias_grad),
            column_sum(dx, need_bias_grad))


# ------------------------------------------------------------------------------ implementations
def _forward(x: Tensor, bias: Optional[Tensor], residual: Tensor, weight: Optional[Tensor],
             ln_bias: Optional[Tensor], eps: float, p: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, h, mean, rstd, mask)``: ``h = residual + dropout(x + bias)`` in x's
    dtype, ``out = LayerNorm(h)``, ``mean``/``rstd`` of each row (fp32 for the kernel dtypes, of
    shape ``x.shape[:-1]``) and the uint8 keep-mask (empty when p == 0)."""
    kernel = _kernel("layernorm_residual_fwd", x, bias, residual, weight, ln_bias)
    if kernel is not None:
        return kernel(x.contiguous(), contiguous_or_none(bias), residual.contiguous(),
                      contiguous_or_none(weight), contiguous_or_none(ln_bias), eps, p)
    return _reference_forward(x, bias, residual, weight, ln_bias, eps, p)


def _forward_fake(x, bias, residual, weight, ln_bias, eps, p):
    stats_dtype = accumulation_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=stats_dtype),
            x.new_empty(x.shape[:-1], dtype=stats_dtype),
            x.new_empty(x.shape if p > 0.0 else EMPTY_SHAPE, dtype=torch.uint8))


def _layer_norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, mean, rstd)`` as :func:`_forward` does."""
    kernel = _kernel("layernorm_residual_fwd", x, weight, bias)
    if kernel is not None:
        out, _, mean, rstd, _ = kernel(x.contiguous(), None, None, contiguous_or_none(weight),
                                       contiguous_or_none(bias), eps, 0.0)
        return out, mean, rstd
    return _normalize(x, weight, bias, eps)


def _layer_norm_forward_fake(x, weight, bias, eps):
    stats_dtype = accumulation_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=stats_dtype),
            x.new_empty(x.shape[:-1], dtype=stats_dtype))


def _backward(grad_out: Tensor, grad_h: Optional[Tensor], h: Tensor, mean: Tensor, rstd: Tensor,
              weight: Optional[Tensor], mask: Optional[Tensor], p: float, need_weight_grad: bool,
              need_ln_bias_grad: bool, need_bias_grad: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of both forward ops: ``(grad_h_total, grad_x, grad_weight, grad_ln_bias,
    grad_bias)``.

    ``grad_out`` is the gradient of the LayerNorm output, ``grad_h`` (or None) the gradient
    reaching ``h`` from elsewhere. ``grad_h_total`` is the gradient of ``h``, hence of the
    residual (and of ``x`` for a plain LayerNorm); ``grad_x`` is empty when p == 0 (it equals
    ``grad_h_total``); each of the last three is empty unless asked for. ``mask`` is None when
    p == 0.
    """
    kernel = _kernel("layernorm_residual_bwd", h, grad_out, grad_h, weight)
    if kernel is not None:
        return kernel(grad_out.contiguous(), contiguous_or_none(grad_h), h.contiguous(),
                      mean.contiguous(), rstd.contiguous(), contiguous_or_none(weight),
                      contiguous_or_none(mask), p, need_weight_grad, need_ln_bias_grad, need_bias_grad)
    return _reference_backward(grad_out, grad_h, h, mean, rstd, weight, mask, p, need_weight_grad,
                               need_ln_bias_grad, need_bias_grad)


def _backward_fake(grad_out, grad_h, h, mean, rstd, weight, mask, p, need_weight_grad,
                   need_ln_bias_grad, need_bias_grad):
    hidden = h.shape[-1]
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(h, memory_format=torch.contiguous_format) if p > 0.0
            else h.new_empty(EMPTY_SHAPE),
            h.new_empty((hidden if need_weight_grad else 0,)),
            h.new_empty((hidden if need_ln_bias_grad else 0,)),
            h.new_empty((hidden if need_bias_grad else 0,)))


# ------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    _x, bias, _residual, weight, ln_bias, _eps, p = inputs
    _out, h, mean, rstd, mask = output
    ctx.save_for_backward(h, mean, rstd, weight, mask)
    ctx.mark_non_differentiable(mean, rstd, mask)
    # Post-LN never uses h outside the op: its gradient stays None instead of a zero tensor
    # that the backward kernel would have to read.
    ctx.set_materialize_grads(False)
    ctx.p, ctx.has_bias, ctx.has_ln_bias = p, bias is not None, ln_bias is not None


def _backward_formula(ctx, backward, grad_out, grad_h, _grad_mean, _grad_rstd, _grad_mask):
    h, mean, rstd, weight, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, bias, residual, weight, ln_bias, eps, p
    if grad_out is None and grad_h is None:
        return None, None, None, None, None, None, None
    if grad_out is None:  # pre-LN whose normalised output was not used
        grad_out = torch.zeros_like(h)
    need_weight = weight is not None and needs[3]
    need_ln_bias = ctx.has_ln_bias and needs[4]
    need_bias = ctx.has_bias and needs[1]
    grad_h_total, grad_x, grad_weight, grad_ln_bias, grad_bias = backward(
        grad_out, grad_h, h, mean, rstd, weight, mask if ctx.p > 0.0 else None, ctx.p,
        need_weight, need_ln_bias, need_bias)
    if ctx.p == 0.0:
        grad_x = grad_h_total
    return (grad_x if needs[0] else None, grad_bias if need_bias else None,
            grad_h_total if needs[2] else None, grad_weight if need_weight else None,
            grad_ln_bias if need_ln_bias else None, None, None)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_bias = bias is not None


def _layer_norm_backward_formula(ctx, backward, grad_out, _grad_mean, _grad_rstd):
    x, mean, rstd, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, weight, bias, eps
    need_weight = weight is not None and needs[1]
    need_bias = ctx.has_bias and needs[2]
    grad_x, _, grad_weight, grad_bias, _ = backward(
        grad_out, None, x, mean, rstd, weight, None, 0.0, need_weight, need_bias, False)
    return (grad_x if needs[0] else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None)


# The two backward custom ops share one implementation (a plain LayerNorm is the fused op
# with h = x, no dropout and no bias).
bias_dropout_residual_layernorm_op = FusedOp(
    "bias_dropout_residual_layernorm", _forward, _forward_fake, _backward, _backward_fake,
    _setup_context, _backward_formula)
layer_norm_op = FusedOp(
    "layer_norm", _layer_norm_forward, _layer_norm_forward_fake, _backward, _backward_fake,
    _layer_norm_setup_context, _layer_norm_backward_formula)


# ------------------------------------------------------------------------------ public API
def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return float(eps)


def _check_x(x) -> None:
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _checked_dropout_args(x, bias, residual, weight, ln_bias, eps, p, training):
    _check_x(x)
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    check_like("residual", residual, "x", x, shape=x.shape)
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        check_like(name, t, "x", x, shape=x.shape[-1:])
    eps = _check_eps(eps)
    p = check_probability("p", p)
    return eps, (p if training else 0.0)


def bias_dropout_residual_layernorm(x: Tensor, bias: Optional[Tensor], residual: Tensor,
                                    weight: Optional[Tensor], ln_bias: Optional[Tensor],
                                    eps: float = 1e-5, p: float = 0.0,
                                    training: bool = True) -> Tensor:
    """Post-LN sublayer end: ``LayerNorm(residual + dropout(x + bias))`` over the last dim.

    Args:
        x: ``[..., hidden]`` sublayer output before its bias, fp32/fp16/bf16 (fp64 runs the
            reference path, for gradcheck).
        bias: ``[hidden]`` or None, added to ``x`` before dropout.
        residual: ``[..., hidden]`` like ``x``.
        weight, ln_bias: the LayerNorm's ``[hidden]`` scale and shift, or None for none.
        eps: added to the variance, any value >= 0 (the model's own, never a default).
        p: dropout probability in [0, 1); ignored unless ``training``.
        training: apply dropout (as ``nn.Dropout`` in train mode).

    All tensors share ``x``'s dtype and device. Statistics are fp32 (fp64 for fp64 inputs).

    Returns:
        ``[..., hidden]`` in ``x``'s dtype.
    """
    eps, p = _checked_dropout_args(x, bias, residual, weight, ln_bias, eps, p, training)
    return bias_dropout_residual_layernorm_op(x, bias, residual, weight, ln_bias, eps, p)[0]


def bias_dropout_residual_prenorm(x: Tensor, bias: Optional[Tensor], residual: Tensor,
                                  weight: Optional[Tensor], ln_bias: Optional[Tensor],
                                  eps: float = 1e-5, p: float = 0.0,
                                  training: bool = True) -> tuple[Tensor, Tensor]:
    """Pre-LN residual step: ``new_residual = residual + dropout(x + bias)`` and the next
    sublayer's input ``LayerNorm(new_residual)``, in one kernel.

    Arguments as :func:`bias_dropout_residual_layernorm`.

    Returns:
        ``(new_residual, normed)``, both ``[..., hidden]`` in ``x``'s dtype. Gradients flowing
        into both are combined in one backward kernel.
    """
    eps, p = _checked_dropout_args(x, bias, residual, weight, ln_bias, eps, p, training)
    out, h, _, _, _ = bias_dropout_residual_layernorm_op(x, bias, residual, weight, ln_bias, eps, p)
    return h, out


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float = 1e-5) -> Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` with the fused kernels (pre-LN's
    first and final norms).

    Args:
        x: ``[..., hidden]``, fp32/fp16/bf16 (fp64 runs the reference path).
        weight, bias: ``[hidden]`` with ``x``'s dtype and device, or None.
        eps: added to the variance, any value >= 0.

    Returns:
        ``[..., hidden]`` in ``x``'s dtype.
    """
    _check_x(x)
    check_like("weight", weight, "x", x, shape=x.shape[-1:])
    check_like("bias", bias, "x", x, shape=x.shape[-1:])
    return layer_norm_op(x, weight, bias, _check_eps(eps))[0]
