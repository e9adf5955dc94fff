"""Choosing between a CUDA kernel and the PyTorch reference for one call."""
from __future__ import annotations

import torch

from .. import _extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_for(name: str, *tensors: torch.Tensor | None):
    """The ``fastpatch_cuda::<name>`` op if every given tensor is a CUDA tensor the kernels take.

    Returns ``None`` (use the reference) for CPU tensors, fp64 (gradcheck), or when the
    extension is unavailable; the reason for the latter is in ``fastpatch env``.
    """
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return None
    if any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in present):
        return None
    ops = _extension.cuda_ops()
    if ops is None:
        return None
    return getattr(ops, name, None)
