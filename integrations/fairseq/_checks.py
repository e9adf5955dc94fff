"""What the fairseq layer adapters share: reading a layer's knobs, and refusing the ones the
fused path cannot honour (each refusal names the knob, and the report shows it)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from fairseq.modules import gelu, gelu_accurate
from fairseq.modules.multihead_attention import MultiheadAttention


# fairseq's get_activation_fn returns these functions; its other choices (tanh, linear,
# relu_squared, swish) have no fused kernel.
_ACTIVATIONS = {F.relu: "relu", gelu: "gelu", gelu_accurate: "gelu_tanh"}
_LAYER_NORMS = ("LayerNorm", "FusedLayerNorm", "Fp32LayerNorm")


def activation_name(fn) -> Optional[str]:
    """The fused kernel's name for a layer's ``activation_fn``, or None."""
    try:
        return _ACTIVATIONS.get(fn)
    except TypeError:  # unhashable callables
        return None


def norm_problem(name: str, module, width: int) -> Optional[str]:
    if type(module).__name__ not in _LAYER_NORMS:
        return f"{name} is a {type(module).__name__}, not a LayerNorm"
    if tuple(module.normalized_shape) != (width,) or module.weight is None:
        return f"{name} is not an affine LayerNorm over the last dim ({width})"
    return None


def linear_problem(name: str, module) -> Optional[str]:
    if type(module) is not nn.Linear:
        return f"{name} is a {type(module).__name__}, not nn.Linear"
    if module._forward_pre_hooks or module._forward_hooks:
        return f"{name} has forward hooks (quant_noise or pruning)"
    return None


def attention_problem(name: str, mha, *, self_attention: bool) -> Optional[str]:
    """Why a ``MultiheadAttention`` cannot run on the fused path, or None."""
    if type(mha) is not MultiheadAttention:
        return f"{name} is a {type(mha).__name__} (only fairseq's MultiheadAttention is fused)"
    if mha.use_xformers:
        return f"{name} uses xformers_att_config"
    if mha.bias_k is not None or mha.add_zero_attn:
        return f"{name} uses add_bias_kv / add_zero_attn"
    if mha.skip_embed_dim_check:
        return f"{name} has pruned heads (skip_embed_dim_check)"
    if self_attention and not mha.self_attention:
        return f"{name} is not self-attention (cross_self_attention)"
    if not self_attention and not mha.encoder_decoder_attention:
        return f"{name} is not encoder-decoder attention"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        problem = linear_problem(f"{name}.{proj}", getattr(mha, proj))
        if problem:
            return problem
    return None


def overridden_problem(module: nn.Module, base: type) -> Optional[str]:
    """A subclass that overrides the methods the fused forward replaces would lose its changes."""
    cls = type(module)
    for method in ("forward", "residual_connection"):
        if getattr(cls, method) is not getattr(base, method):
            return f"{cls.__name__} overrides {method}"
    return None


def wrapped_forward_problem(module: nn.Module) -> Optional[str]:
    """fairseq's ``checkpoint_wrapper`` (--checkpoint-activations) binds the original forward on
    the instance, where a class swap cannot reach it."""
    if "forward" in module.__dict__:
        return "forward is wrapped on the instance (--checkpoint-activations / offload)"
    return None
