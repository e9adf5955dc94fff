"""Optimizers whose step runs fused CUDA kernels (PyTorch reference path on the CPU)."""
from .adam import FusedAdam

__all__ = ["FusedAdam"]
