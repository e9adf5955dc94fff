"""Small pieces shared by the ops' implementations and backward formulas."""
from typing import Optional

import torch
from torch import Tensor

EMPTY_SHAPE = (0,)  # stands for an absent output (custom ops cannot return None)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (so reductions don't lose precision), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_to_bias(grad: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """Gradient of a bias broadcast over ``grad``'s leading dims: ``[..., n] -> [n]``."""
    flat = grad.reshape(-1, grad.shape[-1])
    return flat.sum(0, dtype=accumulation_dtype(flat.dtype)).to(bias_dtype)


def contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def dropout_keep_mask(like: Tensor, p: float) -> Tensor:
    """Keep-mask (uint8, 1 = kept) drawn from PyTorch's generator, or an empty tensor if p == 0.

    The reference path's dropout; the CUDA kernels draw their own from the same generator."""
    if p == 0.0:
        return like.new_empty(EMPTY_SHAPE, dtype=torch.uint8)
    return (torch.rand(like.shape, device=like.device) >= p).to(torch.uint8)
