"""Fused ops: ``torch.library`` custom ops (namespace ``fastpatch``) with fake implementations,
autograd formulas, CUDA kernels (``csrc/``) and PyTorch references for the CPU.

The public functions validate their arguments and return ordinary tensors; the raw custom ops
are reachable as ``torch.ops.fastpatch.*``.
"""
from .bias_activation_dropout import bias_activation_dropout

__all__ = [
    "bias_activation_dropout",
]

# (public op, CUDA kernels it uses); `fastpatch env` reports each one's path.
KERNELS = {
    "bias_activation_dropout": ("bias_act_dropout_fwd", "bias_act_dropout_bwd"),
}
