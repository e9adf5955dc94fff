"""The activations the fused kernels implement, by name and by the code the kernels use.

Names follow the math, not a framework: adapters translate ``"gelu_new"``, ``"swish"`` and the
like through :func:`canonical_activation`, and anything unknown is reported, never approximated
(LightSeq silently ran tanh-GELU for models trained with exact GELU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Codes must match `enum class Activation` in csrc/common.cuh.
ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}

_ALIASES = {
    "gelu": "gelu",
    "gelu_exact": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # k*x*(1 + 0.044715 x^2) is the same polynomial, factored
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def canonical_activation(name: str) -> str | None:
    """The kernel activation computing exactly ``name``, or None if there is none."""
    if not isinstance(name, str):
        return None
    return _ALIASES.get(name.lower())


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference activation in PyTorch, used by the CPU path."""
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATION_CODES)}; got {activation!r}")


def activation_derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx, elementwise, in x's dtype (call it on fp32 for accuracy)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if activation == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (x + 0.044715 * x ** 3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"activation must be one of {', '.join(ACTIVATION_CODES)}; got {activation!r}")
