"""Reading the attention masks transformers 5 hands to a layer."""
from typing import Optional, Tuple

from torch import Tensor


def split_hf_mask(attention_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(key_padding_mask, attn_mask)`` for ``fastpatch.ops.attention``.

    transformers 5 builds a 4D mask per attention implementation: bool ``[B, 1, Lq, S]`` with
    True = attend (sdpa), additive float (eager), or ``None`` when nothing is masked. The
    flash-attention implementations keep the 2D ``[B, S]`` mask with 1 = token.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        return attention_mask == 0, None
    return None, attention_mask
