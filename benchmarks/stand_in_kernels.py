"""The host cost of fastpatch's CUDA path, measured on a machine without a GPU.

On a GPU a training update is often bound by the host: the Python, dispatch and autograd work
that issues the kernels, while the GPU waits. That work is the same whatever the kernels compute,
so it can be measured without them. Inside :func:`installed`, every ``fastpatch_cuda`` kernel is
replaced by a stand-in that only returns zero-filled outputs of the kernel's shapes and dtypes, and
the fused ops take their CUDA branch for CPU tensors. A model run this way issues the calls the
GPU path issues, in the same order, with numbers that mean nothing; with tiny dimensions its time
is the host time of the kernel path (less the few microseconds a kernel launch itself costs).

    with installed():
        train_a_few_updates(model_on_cpu)

Use it to compare host costs (fastpatch's layers against the framework's own, one layer
implementation against another) and to find where that cost goes. Never for numbers. A stand-in
call (allocate and zero the outputs in Python) costs the host about 10-15 us more than a real
kernel call from C++ would, so the fused path's host cost is overstated by that much a call.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

from fastpatch.ops import _dispatch


def _op_module(name: str):
    # fastpatch.ops exports each op's function under its module's name: import the module itself
    return importlib.import_module(f"fastpatch.ops.{name}")


def _zeroed(outputs):
    """Fill the stand-in outputs: empty memory could hold NaNs, and a NaN gradient norm stops
    fairseq's trainer."""
    for t in (outputs if isinstance(outputs, (tuple, list)) else (outputs,)):
        if isinstance(t, torch.Tensor):
            t.zero_()
    return outputs


def _embedding_fwd(input_ids, token_weight, position_ids, position_weight, token_type_ids,
                   token_type_weight, ln_weight, ln_bias, sinusoidal, padding_idx, scale, eps, p):
    # the kernel takes no token_padding_idx (it only matters to backward)
    return _op_module("embedding")._forward_fake(
        input_ids, token_weight, position_ids, position_weight, token_type_ids, token_type_weight,
        ln_weight, ln_bias, sinusoidal, padding_idx, None, scale, eps, p)


def _fakes() -> dict:
    """Kernel name -> a function with the kernel's signature returning its outputs' shapes."""
    lnr, bad, ce, embedding = (_op_module(name) for name in (
        "layernorm_residual", "bias_activation_dropout", "cross_entropy", "embedding"))
    return {
        "layernorm_residual_fwd": lnr._forward_fake,
        "layernorm_residual_bwd": lnr._backward_fake,
        "bias_act_dropout_fwd": bad._forward_fake,
        "bias_act_dropout_bwd": bad._backward_fake,
        "embedding_fwd": _embedding_fwd,
        "embedding_bwd": embedding._backward_fake,
        "cross_entropy_fwd": ce._ce_forward_fake,
        "cross_entropy_fwd_grad_": ce._ce_forward_fake,  # the gradient goes into its input
        "cross_entropy_bwd": ce._ce_backward_fake,
        "cross_entropy_bwd_": lambda *args: None,
        "attn_split_heads": lambda qkv, bias, heads, chunks: qkv.new_empty(
            chunks, qkv.shape[0], heads, qkv.shape[1], qkv.shape[2] // (chunks * heads)),
        "attn_merge_heads": lambda x: x.new_empty(x.shape[1], x.shape[3],
                                                  x.shape[0] * x.shape[2] * x.shape[4]),
        "attn_kv_cache_append": lambda *args: None,
        "multi_tensor_adam": lambda *args: [],  # no tensor left to the reference
    }


def _stand_in_ops() -> types.SimpleNamespace:
    """The stand-ins, and ``calls``: how many were made (zero after a run means the fused ops
    never took their CUDA branch, and the run measured the reference path instead)."""
    ops = types.SimpleNamespace(calls=0)

    def stand_in(fake):
        def call(*args):
            ops.calls += 1
            return _zeroed(fake(*args))
        return call

    for name, fake in _fakes().items():
        setattr(ops, name, stand_in(fake))
    return ops


def _kernel_for_any_device(ops):
    # _dispatch.kernel_for without its CUDA-device test
    def kernel_for(name, *tensors):
        present = [t for t in tensors if t is not None]
        if not present or not _dispatch.kernel_dtypes(present):
            return None
        return getattr(ops, name, None)

    return kernel_for


@contextlib.contextmanager
def installed():
    """Inside: the fused ops run their CUDA branch on any device, with stand-in kernels."""
    ops = _stand_in_ops()
    replacement = _kernel_for_any_device(ops)
    original = _dispatch.kernel_for
    # every module that imported kernel_for by name holds its own reference to it
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("fastpatch") and getattr(m, "kernel_for", None) is original]
    try:
        for module in holders:
            module.kernel_for = replacement
        yield ops
    finally:
        for module in holders:
            module.kernel_for = original
