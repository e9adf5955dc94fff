"""Fused ``dropout(activation(x + bias))``: the FFN's middle, one kernel each way.

Eager PyTorch runs three kernels (bias add, activation, dropout) and keeps two intermediates
alive for backward; the fused op reads ``x`` once, writes the output and a byte mask, and its
backward recomputes ``x + bias`` instead of storing it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autograd_utils import EMPTY_SHAPE, accumulation_dtype, dropout_keep_mask, sum_to_bias
from ._checks import check_choice, check_like, check_probability, check_tensor
from ._dispatch import FusedOp, kernel_for
from .activations import ACTIVATION_CODES, activation_derivative, apply_activation

_CODE_TO_NAME = {code: name for name, code in ACTIVATION_CODES.items()}


def _reference_forward(x: Tensor, bias: Optional[Tensor], activation: int, p: float):
    y = x.to(accumulation_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = apply_activation(y, _CODE_TO_NAME[activation])
    mask = dropout_keep_mask(x, p)
    if p > 0.0:
        y = y * mask.to(y.dtype) * (1.0 / (1.0 - p))
    return y.to(x.dtype), mask


def _reference_backward(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], mask: Tensor,
                        activation: int, p: float) -> Tensor:
    compute = accumulation_dtype(x.dtype)
    pre = x.to(compute) if bias is None else x.to(compute) + bias.to(compute)
    grad = grad_out.to(compute) * activation_derivative(pre, _CODE_TO_NAME[activation])
    if p > 0.0:
        grad = grad * mask.to(compute) * (1.0 / (1.0 - p))
    return grad.to(x.dtype)


def _forward(x: Tensor, bias: Optional[Tensor], activation: int, p: float) -> tuple[Tensor, Tensor]:
    """Returns ``(out, keep_mask)``; ``keep_mask`` is uint8 like ``x``, or empty when p == 0."""
    kernel = kernel_for("bias_act_dropout_fwd", x, bias)
    if kernel is not None:
        return kernel(x.contiguous(), None if bias is None else bias.contiguous(), activation, p)
    return _reference_forward(x, bias, activation, p)


def _forward_fake(x, bias, activation, p):
    mask = x.new_empty(x.shape if p > 0.0 else EMPTY_SHAPE, dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mask


def _backward(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], mask: Tensor, activation: int,
              p: float) -> Tensor:
    kernel = kernel_for("bias_act_dropout_bwd", grad_out, x, bias)
    if kernel is not None:
        return kernel(grad_out.contiguous(), x.contiguous(),
                      None if bias is None else bias.contiguous(), mask, activation, p)
    return _reference_backward(grad_out, x, bias, mask, activation, p)


def _backward_fake(grad_out, x, bias, mask, activation, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, bias, activation, p = inputs
    ctx.save_for_backward(x, bias, output[1])
    ctx.activation, ctx.p = activation, p


def _backward_formula(ctx, backward, grad_out, _grad_mask):
    x, bias, mask = ctx.saved_tensors
    grad_x = backward(grad_out, x, bias, mask, ctx.activation, ctx.p)
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[1]:
        grad_bias = sum_to_bias(grad_x, bias.dtype)
    return grad_x, grad_bias, None, None


bias_activation_dropout_op = FusedOp("bias_activation_dropout", _forward, _forward_fake, _backward,
                                     _backward_fake, _setup_context, _backward_formula)


def bias_activation_dropout(x: Tensor, bias: Optional[Tensor] = None, activation: str = "gelu",
                            p: float = 0.0, training: bool = True) -> Tensor:
    """``dropout(activation(x + bias), p)`` in one kernel.

    Args:
        x: ``[..., hidden]``, fp32/fp16/bf16 (fp64 runs the reference path, for gradcheck).
        bias: ``[hidden]`` with ``x``'s dtype and device, or None.
        activation: ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        p: dropout probability in [0, 1); ignored unless ``training``.
        training: apply dropout (as ``nn.Dropout`` in train mode).

    Returns:
        ``[..., hidden]`` tensor with ``x``'s dtype.
    """
    check_tensor("x", x, min_ndim=1)
    check_like("bias", bias, "x", x, shape=(x.shape[-1],))
    check_choice("activation", activation, tuple(ACTIVATION_CODES))
    p = check_probability("p", p)
    if not training:
        p = 0.0
    out, _ = bias_activation_dropout_op(x, bias, ACTIVATION_CODES[activation], p)
    return out
