"""Routing an accelerated BERT encoder's inference forward through the encoder engine.

``fastpatch.accelerate`` routes ``BertModel.forward`` (the model itself, or the ``.bert`` of a
``BertFor...`` head) once every encoder layer of it was replaced. A call then runs
:class:`fastpatch.inference.bert.BertEngine` (one CUDA graph per bucketed batch shape: the host
cost of a forward becomes one graph replay) when all of these hold:

* eval mode, autograd off (``torch.no_grad()`` / ``torch.inference_mode()``), no autocast,
  not inside ``torch.compile`` tracing or a user's CUDA graph capture;
* CUDA tensors, ``input_ids`` ``[B, L]`` int64 with at most the model's positions, and only
  ``attention_mask`` (``[B, L]``, 0 = padding, any side) and ``token_type_ids`` besides;
* the config asks for no attentions or hidden states.

Any other call (training, gradients, ``position_ids``, ``inputs_embeds``, cross-attention, a 4D
mask...) runs the fused layers eagerly, exactly as without the routing; each call logs on the
``fastpatch`` logger (DEBUG) which path ran and why.

The engine reads the model's own parameters (views), except for one copy of each layer's
concatenated q/k/v weights, and is rebuilt when any parameter moves or is modified in place
(data pointer, dtype or version counter: an optimizer step, ``load_state_dict``, ``.half()``).
Its outputs are ordinary tensors, usable later under autograd. Hidden states at padding
positions are computed from token id 0 (the engine zeroes padding ids), so they equal the
original's where the padding holds id 0, as BERT's tokenizers write it; no head reads them except
BERT's pooler on a left-padded batch.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..adapters import FUSED_ATTR, bypassed_submodule, fused_subclass, is_accelerated
from .exclusive import guard_of
from .routing import EngineState

logger = logging.getLogger("fastpatch")

ENGINE_ENCODERS = ("BertModel",)
#: where the engine serves calls: on CUDA its graphs remove the host cost; on the CPU it would
#: only add a copy (the tests add "cpu" to check the routing and outputs there)
ENGINE_DEVICE_TYPES = ("cuda",)
# arguments that may be passed as long as they hold their "not asked for" value
_NEUTRAL_KWARGS = {"return_dict": (None, True, False), "output_attentions": (None, False),
                   "output_hidden_states": (None, False), "use_cache": (None, False)}


class EngineEncoderForward:
    """``forward`` that replays the encoder engine's CUDA graph when the call allows it."""

    #: the class swap only routes calls: ``accelerate`` still walks (and reports) the layers
    _fastpatch_routing_only = True

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *args, **kwargs):
        reason = _why_not_engine(self, input_ids, attention_mask, token_type_ids, args, kwargs)
        if reason is not None:
            logger.debug("fastpatch: %s.forward runs the fused layers: %s", type(self).__name__, reason)
            return super().forward(input_ids, attention_mask, token_type_ids, *args, **kwargs)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = _run(self, input_ids, attention_mask, token_type_ids, return_dict)
        if isinstance(out, str):
            logger.debug("fastpatch: %s.forward runs the fused layers: %s", type(self).__name__, out)
            return super().forward(input_ids, attention_mask, token_type_ids, *args, **kwargs)
        logger.debug("fastpatch: %s.forward replayed the encoder engine", type(self).__name__)
        return out


def enable_encoder_forward(model: nn.Module) -> nn.Module:
    """Route ``model.forward`` (a transformers ``BertModel``) through the engine where the call
    allows it, in place; ``fastpatch.revert`` undoes it. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_accelerated(model) and isinstance(model, EngineEncoderForward):
        return model
    if type(model).__name__ not in ENGINE_ENCODERS or is_accelerated(model):
        raise TypeError(f"enable_encoder_forward supports {', '.join(ENGINE_ENCODERS)}; "
                        f"got {type(model).__name__}")
    model.__class__ = fused_subclass(EngineEncoderForward, type(model), keep_name=True)
    setattr(model, FUSED_ATTR, EngineState())
    return model


def routable(model: nn.Module) -> bool:
    """Whether the engine would compute exactly what ``model`` (a ``BertModel`` whose layers
    were all accelerated, which already rules out decoder use and relative positions) computes:
    it reads the embedding tables, LayerNorm and pooler weights directly, so each must be the
    plain module (not, e.g., an adapter-wrapped embedding whose ``weight`` is only part of its
    output)."""
    read = {f"embeddings.{n}": nn.Embedding
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    read["embeddings.LayerNorm"] = nn.LayerNorm
    if getattr(model, "pooler", None) is not None:
        read["pooler.dense"] = nn.Linear
    try:
        return bypassed_submodule(model, read) is None
    except AttributeError:  # a submodule is missing: not the BertModel layout
        return False


def _why_not_engine(model, input_ids, attention_mask, token_type_ids, args, kwargs) -> Optional[str]:
    """None when the engine serves this call, else the reason it does not."""
    if model.training:
        return "training mode"
    if torch.is_grad_enabled():
        return "autograd is enabled (wrap inference in torch.no_grad() or torch.inference_mode())"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if args:
        return "positional arguments beyond token_type_ids"
    for name, value in kwargs.items():
        if value is not None and value not in _NEUTRAL_KWARGS.get(name, ()):
            return f"{name} is given"
    config = model.config
    if getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False):
        return "the config asks for attentions or hidden states"
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        return "input_ids is not a 2-D int64 tensor"
    if input_ids.device.type not in ENGINE_DEVICE_TYPES:
        return f"input_ids on {input_ids.device.type}, not {'/'.join(ENGINE_DEVICE_TYPES)}"
    if torch.is_autocast_enabled(input_ids.device.type):
        return "autocast is enabled"
    if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                       or attention_mask.shape != input_ids.shape
                                       or attention_mask.is_floating_point()):
        return "attention_mask is not a [B, L] integer or bool tensor"
    if token_type_ids is not None and (not isinstance(token_type_ids, Tensor)
                                       or token_type_ids.shape != input_ids.shape):
        return "token_type_ids is not a [B, L] tensor"
    if input_ids.shape[1] > model.config.max_position_embeddings or input_ids.numel() == 0:
        return "sequence length outside the model's positions"
    return None


def _engine(model):
    from .bert import Bert

    # versions too: the q/k/v concatenation is a copy, which an in-place update would not reach
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
    return getattr(model, FUSED_ATTR).current(key, lambda: Bert.from_hf(model, max_batch_size=2 ** 31))


def _run(model, input_ids: Tensor, attention_mask: Optional[Tensor],
         token_type_ids: Optional[Tensor], return_dict: bool) -> Union[tuple, object, str]:
    """The model's output through the engine, or why the inputs need the eager path (a
    string: a row without tokens, an id outside the vocabulary...)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    from .inputs import token_batch

    bert = _engine(model)
    spec = bert.spec
    # not Bert.infer: its inference_mode would return inference tensors, which a caller may not
    # save for a backward later (features fed to a trainable head)
    try:
        batch = token_batch(input_ids, attention_mask, vocab_size=spec.vocab_size,
                            max_batch_size=2 ** 31, device=bert.device, type_ids=token_type_ids,
                            type_vocab_size=spec.type_vocab_size, left_align=False)
    except ValueError as exc:
        return f"inputs the engine does not take ({exc})"
    types = torch.zeros_like(batch.ids) if batch.types is None else batch.types
    with guard_of(bert).hold():  # one forward at a time on the graphs' static inputs
        hidden, pooled = bert.engine.run(batch.ids, types, batch.mask if batch.padded else None)
    if not return_dict:
        return (hidden,) if pooled is None else (hidden, pooled)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden,
                                                        pooler_output=pooled)
