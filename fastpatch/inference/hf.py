"""Routing a Hugging Face model's ``generate()`` through the engine (opt-in).

    fastpatch.accelerate(model)                   # fused layers (training and plain forward)
    fastpatch.inference.enable_generate(model)    # generate() -> graph-captured engine
    model.generate(ids, attention_mask=mask, max_new_tokens=64, num_beams=4)
    fastpatch.revert(model)                       # undoes both

``enable_generate`` swaps the model's class for a subclass whose ``generate`` first checks the
call against what the engine implements (greedy, sampling with temperature / top-k / top-p,
beam search with length penalty and early stopping, EOS and padding, ``num_return_sequences``,
``output_scores``, HF streamers at batch 1). Anything else (a logits processor, repetition
penalty, constrained or assisted decoding, attentions, a GPT-2 mask that is not left-padded,
``decoder_input_ids``...) runs Hugging Face's own loop. Each call logs, on the ``fastpatch``
logger, which path ran and why. GPT-2 runs on :class:`~.gpt.Gpt`, BART on
:class:`~.transformer.Transformer` (the encoder once, then graph-replayed decoder steps).

It is opt-in rather than part of ``accelerate`` so that ``accelerate`` keeps its contract of
touching layers only; the engine holds views of the model's parameters (no copy) and is
rebuilt when they move (``.to()``, ``.half()``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..adapters import FUSED_ATTR, fused_subclass, is_accelerated
from .options import GenerationOptions
from .routing import EngineState

logger = logging.getLogger("fastpatch")

ENGINE_MODELS = ("GPT2LMHeadModel", "BartForConditionalGeneration")

# GenerationConfig fields the engine honours (the rest must keep their neutral value).
_HANDLED = {"max_length", "max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "temperature",
            "top_k", "top_p", "length_penalty", "early_stopping", "num_return_sequences", "eos_token_id",
            "pad_token_id", "bos_token_id", "decoder_start_token_id", "output_scores", "return_dict_in_generate",
            "use_cache", "forced_bos_token_id", "forced_eos_token_id", "cache_implementation",
            "cache_config", "compile_config", "disable_compile", "transformers_version",
            "_from_model_config"}
# model kwargs the engine understands; any other goes to HF
_MODEL_KWARGS = {"attention_mask"}


@dataclasses.dataclass
class _Plan:
    input_ids: Tensor
    attention_mask: Optional[Tensor]
    options: GenerationOptions
    output_scores: bool
    return_dict: bool
    streamer: object
    hf_fill: int  # HF's fill value after a finished beam hypothesis


class EngineGenerate:
    """``generate`` that runs the fastpatch engine when the call allows it."""

    #: the class swap only routes calls: ``accelerate`` still walks (and reports) the layers
    _fastpatch_routing_only = True

    def generate(self, inputs=None, generation_config=None, **kwargs):
        plan = _plan(self, inputs, generation_config, kwargs)
        if isinstance(plan, str):
            logger.info("fastpatch: generate() runs Hugging Face's loop: %s", plan)
            return super().generate(inputs, generation_config, **kwargs)
        mode = "beam search" if plan.options.num_beams > 1 else (
            "sampling" if plan.options.do_sample else "greedy")
        logger.info("fastpatch: generate() runs the fastpatch engine (%s)", mode)
        return _run(self, plan)


def enable_generate(model: nn.Module) -> nn.Module:
    """Make ``model.generate`` use the engine where it can (in place; ``fastpatch.revert`` undoes it).

    Supported models: transformers ``GPT2LMHeadModel`` and ``BartForConditionalGeneration``
    (vanilla or accelerated). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ not in ENGINE_MODELS and not (
            is_accelerated(model) and type(model)._fastpatch_original_class.__name__ in ENGINE_MODELS):
        raise TypeError(f"enable_generate supports {', '.join(ENGINE_MODELS)}; got {type(model).__name__}")
    if not is_accelerated(model):
        model.__class__ = fused_subclass(EngineGenerate, type(model), keep_name=True)
    setattr(model, FUSED_ATTR, EngineState())
    return model


def _neutral_values():
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return defaults() if defaults is not None else {}


def _plan(model, inputs, generation_config, kwargs) -> Union[_Plan, str]:
    """What the engine will run, or why HF's loop must (a string naming the cause)."""
    kwargs = dict(kwargs)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        return "input_ids is not a 2-D int64 tensor (inputs_embeds or other inputs)"
    streamer = kwargs.pop("streamer", None)
    for name in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                 "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate"):
        if kwargs.pop(name, None) is not None:
            return f"{name} is set"
    if kwargs.pop("synced_gpus", None):
        return "synced_gpus is set"
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = config.update(**kwargs)
    unknown = sorted(set(model_kwargs) - _MODEL_KWARGS)
    if unknown:
        return f"model inputs {unknown} are not supported by the engine"
    neutral = _neutral_values()
    for name, value in config.to_dict().items():
        if name in _HANDLED or value is None or value is False:
            continue
        if name in neutral and value == neutral[name]:
            continue
        return f"{name}={value!r} is not implemented by the engine"
    if config.use_cache is False:
        return "use_cache=False"
    if streamer is not None and (input_ids.shape[0] != 1 or (config.num_beams or 1) > 1):
        return "streamer with batch > 1 or beam search"
    encoder_decoder = _is_encoder_decoder(model)
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        if mask.shape != input_ids.shape:
            return "attention_mask does not match input_ids"
        # BART's positions ignore the mask (as the engine's do); GPT-2's continue a left-padded row
        if not encoder_decoder and bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
            return "attention_mask is not left-padded (HF's loop keeps its semantics for it)"
    # the decoder's prompt: the prompt itself, or the start token of an encoder-decoder
    length = 1 if encoder_decoder else input_ids.shape[1]
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = (config.max_length if config.max_length is not None else neutral.get("max_length", 20)) - length
    if max_new < 1:
        return f"no token to generate (max_length {config.max_length} <= prompt length {length})"
    if encoder_decoder:
        start = config.decoder_start_token_id
        if start is not None and start != model.config.decoder_start_token_id:
            return f"decoder_start_token_id={start} differs from the model config's"
        positions = model.config.max_position_embeddings
        if input_ids.shape[1] > positions or max_new > positions:
            return f"source or max_new_tokens beyond max_position_embeddings={positions}"
    else:
        positions = model.config.n_positions
        if length + max_new > positions:
            return f"prompt + max_new_tokens = {length + max_new} exceeds n_positions={positions}"
    eos = config.eos_token_id
    eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    pad = config.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # what HF does (with a warning)
    num_beams = config.num_beams or 1
    try:
        options = GenerationOptions(
            max_new_tokens=max_new, min_new_tokens=config.min_new_tokens or 0,
            do_sample=bool(config.do_sample),
            temperature=config.temperature if config.temperature is not None else 1.0,
            top_k=config.top_k if config.top_k is not None else neutral.get("top_k", 50),
            top_p=config.top_p if config.top_p is not None else 1.0, num_beams=num_beams,
            num_return_sequences=config.num_return_sequences or 1,
            length_penalty=config.length_penalty if config.length_penalty is not None else 1.0,
            early_stopping=config.early_stopping if config.early_stopping is not None else False,
            eos_token_id=eos, pad_token_id=pad, forced_bos_token_id=config.forced_bos_token_id,
            forced_eos_token_id=config.forced_eos_token_id)
    except ValueError as exc:
        return f"options the engine rejects ({exc})"
    hf_fill = (pad or eos[0]) if eos else -1  # HF's `pad_token_id or eos_token_id[0]`, 0 included
    return _Plan(input_ids, mask, options, bool(config.output_scores),
                 bool(config.return_dict_in_generate), streamer, hf_fill)


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _engine(model):
    from .gpt import Gpt
    from .transformer import Transformer

    if _is_encoder_decoder(model):
        # BART's engine concatenates q/k/v (copies): in-place updates must rebuild it too
        key = tuple((p.data_ptr(), p.dtype, p.device, p._version) for p in model.parameters())
        build = lambda: Transformer.from_hf(model, max_batch_size=2 ** 31)  # noqa: E731
    else:
        # GPT-2's engine holds views of the parameters: in-place updates reach it, moves do not
        key = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())
        build = lambda: Gpt.from_hf(model, max_batch_size=2 ** 31)  # noqa: E731
    return getattr(model, FUSED_ATTR).current(key, build)


def _run(model, plan: _Plan):
    from transformers.generation.utils import (GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput,
                                               GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput)

    engine = _engine(model)
    options, ids = plan.options, plan.input_ids
    encoder_decoder = _is_encoder_decoder(model)
    # what HF's sequences start with: the prompt, or an encoder-decoder's start token
    prompt = (torch.full((ids.shape[0], 1), engine.spec.decoder_start_token_id, dtype=ids.dtype,
                         device=ids.device) if encoder_decoder else ids)
    streamer = plan.streamer
    if streamer is not None:
        streamer.put(prompt.cpu())
    out = engine.generate(ids, plan.attention_mask, output_scores=plan.output_scores,
                          streamer=None if streamer is None else (lambda t: streamer.put(t.cpu())),
                          **dataclasses.asdict(options))
    if streamer is not None:
        streamer.end()
    repeats = options.num_return_sequences
    prompt = prompt.repeat_interleave(repeats, dim=0) if repeats > 1 else prompt
    tokens = out.tokens.to(ids.device)
    if out.beam_indices is not None:
        tokens = tokens.masked_fill(out.beam_indices.to(ids.device) < 0, plan.hf_fill)
    sequences = torch.cat([prompt, tokens], dim=1)
    if not plan.return_dict:
        return sequences
    scores = out.step_scores if plan.output_scores else None
    if out.beam_indices is not None:
        output = GenerateBeamEncoderDecoderOutput if encoder_decoder else GenerateBeamDecoderOnlyOutput
        return output(sequences=sequences, sequences_scores=out.scores if plan.output_scores else None,
                      scores=scores, beam_indices=out.beam_indices)
    output = GenerateEncoderDecoderOutput if encoder_decoder else GenerateDecoderOnlyOutput
    return output(sequences=sequences, scores=scores)
