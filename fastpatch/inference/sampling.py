"""Temperature, top-k and top-p warping and the token draw, in Hugging Face's order and formulas.

The formulas are HF's (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``)
so that, drawing from the same generator state, the engine picks the same tokens as
``model.generate(do_sample=True)``. All of it runs on the device without a host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .options import GenerationOptions


def warp(scores: Tensor, options: GenerationOptions, min_tokens_to_keep: int = 1) -> Tensor:
    """Apply temperature, then top-k, then top-p to fp32 ``scores [R, V]`` (a new tensor).

    ``min_tokens_to_keep`` is 1 for sampling and ``len(eos) + 1`` for beam sampling, as in HF.
    Removed tokens get ``-inf``.
    """
    if options.temperature != 1.0:
        scores = scores / options.temperature
    if options.top_k:
        k = min(max(options.top_k, min_tokens_to_keep), scores.shape[-1])
        kth_best = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - options.top_p)
        drop[..., -min_tokens_to_keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def make_generator(options: GenerationOptions, device: torch.device) -> Optional[torch.Generator]:
    """A generator seeded with ``options.seed`` on ``device``, or None for the default one."""
    if options.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(options.seed)
    return generator


def draw(scores: Tensor, num_samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """``num_samples`` token ids per row, without replacement, from ``softmax(scores)``."""
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=num_samples, generator=generator)
