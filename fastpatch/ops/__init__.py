"""Fused ops: ``torch.library`` custom ops (namespace ``fastpatch``) with fake implementations,
autograd formulas, CUDA kernels (``csrc/``) and PyTorch references for the CPU.

The public functions validate their arguments and return ordinary tensors; the raw custom ops
are reachable as ``torch.ops.fastpatch.*``.
"""
from .attention import attention, kv_cache_append_, merge_heads, split_heads
from .adam import multi_tensor_adam_
from .bias_activation_dropout import bias_activation_dropout
from .cross_entropy import cross_entropy, fused_linear_cross_entropy, label_smoothed_cross_entropy
from .embedding import fairseq_positions, sinusoidal_table, transformer_embedding
from .layernorm_residual import (bias_dropout_residual_layernorm, bias_dropout_residual_prenorm,
                                layer_norm)

__all__ = [
    "attention",
    "kv_cache_append_",
    "merge_heads",
    "split_heads",
    "bias_activation_dropout",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "label_smoothed_cross_entropy",
    "fairseq_positions",
    "sinusoidal_table",
    "transformer_embedding",
    "bias_dropout_residual_layernorm",
    "bias_dropout_residual_prenorm",
    "layer_norm",
    "multi_tensor_adam_",
]

# (public op, CUDA kernels it uses); `fastpatch env` reports each one's path.
KERNELS = {
    "split_heads": ("attn_split_heads", "attn_merge_heads"),
    "merge_heads": ("attn_merge_heads", "attn_split_heads"),
    "kv_cache_append_": ("attn_kv_cache_append",),
    "bias_activation_dropout": ("bias_act_dropout_fwd", "bias_act_dropout_bwd"),
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy_bwd"),
    "label_smoothed_cross_entropy": ("cross_entropy_fwd", "cross_entropy_bwd"),
    "fused_linear_cross_entropy": ("cross_entropy_fwd_grad_", "cross_entropy_fwd", "cross_entropy_bwd_"),
    "transformer_embedding": ("embedding_fwd", "embedding_bwd"),
    "bias_dropout_residual_layernorm": ("layernorm_residual_fwd", "layernorm_residual_bwd"),
    "bias_dropout_residual_prenorm": ("layernorm_residual_fwd", "layernorm_residual_bwd"),
    "layer_norm": ("layernorm_residual_fwd", "layernorm_residual_bwd"),
    "multi_tensor_adam_": ("multi_tensor_adam",),
}
