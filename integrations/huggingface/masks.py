"""Reading what transformers 5 hands to a layer: its attention mask and its KV cache."""
import inspect
from typing import Optional, Tuple

from torch import Tensor

#: the layers' cache argument: ``past_key_values`` until transformers 5.2x renamed it ``cache``
#: (same ``Cache`` object). A layer given it by keyword under the new name would otherwise see no
#: cache at all and decode every step without its past.
CACHE_ARGUMENTS = ("past_key_values", "cache")


def layer_cache(past_key_values, kwargs: dict):
    """The ``Cache`` a layer's forward was given under either name (``cache`` is popped from
    ``kwargs``, so the fallback forward gets it once, positionally)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


def cache_argument_problem(module) -> Optional[str]:
    """A layer class whose forward takes its cache under no name fastpatch knows comes from a
    transformers release whose cache semantics were not checked: it is reported, not fused."""
    names = inspect.signature(type(module).forward).parameters
    if any(name in names for name in CACHE_ARGUMENTS):
        return None
    return (f"{type(module).__name__}.forward takes no {' / '.join(CACHE_ARGUMENTS)} argument "
            "(a transformers release fastpatch was not checked against)")


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
