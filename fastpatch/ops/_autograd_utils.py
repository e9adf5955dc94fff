"""Small pieces shared by the ops' backward formulas."""
import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (so reductions don't lose precision), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_to_bias(grad: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """Gradient of a bias broadcast over ``grad``'s leading dims: ``[..., n] -> [n]``."""
    flat = grad.reshape(-1, grad.shape[-1])
    return flat.sum(0, dtype=accumulation_dtype(flat.dtype)).to(bias_dtype)
