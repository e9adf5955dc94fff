"""``LSTransformer.generate`` on the encoder-decoder engine (``fastpatch.inference.transformer``).

The searches (``generation.greedy_search`` / ``beam_search``) stay the same code; only the
model under them changes: the encoder runs once, each decoder layer's cross-attention
keys/values are cached once per sentence, the self-attention cache is the engine's static arena
and, on CUDA with the kernels built, each decoder step is replayed from a CUDA graph (one per
bucket of live rows) instead of ~30 kernel launches per layer issued from Python.

The engine reads the model's parameters (views, no copies: the fused layers already have the
engine's layouts), so in-place updates (optimizer steps, ``load_state_dict``) reach it. It is kept
on the model between calls (:class:`~fastpatch.inference.routing.EngineState`: not carried by
``copy.deepcopy`` or pickle) and rebuilt when a parameter is replaced, moved or cast, or a call
needs more positions than its sinusoid tables hold. :func:`engine_problem` names what keeps a
model on the fused layers.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..inference.graphs import bucket, graphs_available
from ..inference.routing import EngineState
from ..inference.transformer import TransformerEngine, TransformerSpec
from ..layers.decoder_layer import TransformerDecoderLayer
from ..layers.encoder_layer import TransformerEncoderLayer
from ..ops.activations import ACTIVATION_CODES, canonical_activation
from ..ops.embedding import sinusoidal_table
from .layers import LSTransformerEmbeddingLayer

logger = logging.getLogger("fastpatch")

#: rows of the sinusoid tables an engine starts with (grown, by powers of two, for longer calls)
MIN_POSITIONS = 1024
_STATE_ATTR = "_fastpatch_engine"


def _layer_problem(layer, name: str, decoder: bool) -> Optional[str]:
    kind = TransformerDecoderLayer if decoder else TransformerEncoderLayer
    if not isinstance(layer, kind):
        return f"{name} is a {type(layer).__name__}, not a fused {kind.__name__}"
    c = layer.config
    for flag in ("qkv_bias", "attn_out_bias", "fc1_bias", "fc2_bias"):
        if not getattr(c, flag):
            return f"{name} has {flag}=False (the engine's projections all have biases)"
    if c.attention_scale is not None:
        return f"{name} has attention_scale={c.attention_scale} (the engine scales by head_dim ** -0.5)"
    if canonical_activation(c.activation) not in ACTIVATION_CODES:
        return f"{name} uses activation {c.activation!r}, which has no fused kernel"
    if c.causal != decoder:
        return f"{name} has causal={c.causal}"
    if c.cross_attention != decoder:
        return f"{name} has cross_attention={c.cross_attention}"
    if decoder and c.kv_input_size != c.hidden_size:
        return (f"{name} attends to an encoder output of width {c.kv_input_size}, not its hidden "
                f"size {c.hidden_size}")
    return None


def _shape(c) -> tuple:
    return (c.hidden_size, c.num_heads, c.ffn_size, c.pre_layer_norm, canonical_activation(c.activation),
            c.layer_norm_eps)


def _norm_problem(module, name: str, hidden: int, eps: float) -> Optional[str]:
    if type(module) is not nn.LayerNorm:
        return f"{name} is a {type(module).__name__}, not nn.LayerNorm"
    if module.weight is None or module.bias is None:
        return f"{name} has no affine weight and bias"
    if tuple(module.normalized_shape) != (hidden,):
        return f"{name} normalises shape {tuple(module.normalized_shape)}, not ({hidden},)"
    if module.eps != eps:
        return f"{name} has eps={module.eps}, the layers {eps}"
    return None


def _embedding_problem(embed, name: str, hidden: int, padding_idx: int) -> Optional[str]:
    if not isinstance(embed, LSTransformerEmbeddingLayer) or \
            type(embed).forward is not LSTransformerEmbeddingLayer.forward:
        return f"{name} is a {type(embed).__name__}, not LSTransformerEmbeddingLayer"
    c = embed.config
    if c.positions != "sinusoidal" or c.fairseq_positions:
        return f"{name} has positions={c.positions!r}, fairseq_positions={c.fairseq_positions}"
    if c.layer_norm or c.type_vocab_size:
        return f"{name} has a LayerNorm or token types"
    if c.hidden_size != hidden:
        return f"{name} has width {c.hidden_size}, the layers {hidden}"
    if c.hidden_size < 4:
        return f"{name} has width {c.hidden_size} (sinusoids need >= 4)"
    if c.padding_idx != padding_idx:
        return f"{name} has padding_idx={c.padding_idx}, the model {padding_idx}"
    return None


def engine_problem(model) -> Optional[str]:
    """Why ``model`` (an ``LSTransformer``) cannot decode on the engine, or None."""
    encoder, decoder = model.encoder, model.decoder
    if not len(encoder.layers) or not len(decoder.layers):
        return "the encoder or the decoder has no layers"
    for stack, name, is_decoder in ((encoder, "encoder", False), (decoder, "decoder", True)):
        for i, layer in enumerate(stack.layers):
            problem = _layer_problem(layer, f"{name}.layers.{i}", is_decoder)
            if problem:
                return problem
    first = _shape(decoder.layers[0].config)
    fields = ("hidden_size", "num_heads", "ffn_size", "pre_layer_norm", "activation", "layer_norm_eps")
    for stack, name in ((encoder, "encoder"), (decoder, "decoder")):
        for i, layer in enumerate(stack.layers):
            shape = _shape(layer.config)
            if shape != first:
                what = next(f for f, a, b in zip(fields, shape, first) if a != b)
                return (f"{name}.layers.{i} differs from decoder.layers.0 in {what} "
                        f"({shape[fields.index(what)]} vs {first[fields.index(what)]}): the engine "
                        f"has one shape for both stacks")
    hidden, eps = first[0], first[5]
    pad = model.config.padding_idx
    if encoder.padding_idx != pad or decoder.padding_idx != pad:
        return "the encoder's or decoder's padding_idx differs from config.padding_idx"
    for stack, name in ((encoder, "encoder"), (decoder, "decoder")):
        problem = (_embedding_problem(stack.embed_tokens, f"{name}.embed_tokens", hidden, pad)
                   or _norm_problem(stack.layer_norm, f"{name}.layer_norm", hidden, eps))
        if problem:
            return problem
    if encoder.embed_tokens.config.scale != decoder.embed_tokens.config.scale:
        return (f"the embeddings scale differently ({encoder.embed_tokens.config.scale} vs "
                f"{decoder.embed_tokens.config.scale})")
    head = decoder.output_projection
    if type(head) is not nn.Linear or head.bias is not None:
        return "decoder.output_projection is not a bias-free nn.Linear"
    if tuple(head.weight.shape) != tuple(decoder.embed_tokens.embeddings.shape):
        return (f"decoder.output_projection has shape {tuple(head.weight.shape)}, the target "
                f"table {tuple(decoder.embed_tokens.embeddings.shape)}")
    kinds = {(p.dtype, p.device) for p in model.parameters()}
    if len(kinds) > 1:
        return f"parameters of several dtypes or devices {sorted(map(str, kinds))}"
    if not next(iter(kinds))[0].is_floating_point:
        return "the parameters are not floating point"
    return None


def ls_transformer_tensors(model, *, max_positions: int = MIN_POSITIONS,
                           decoder_start_token_id: int = 2) -> Tuple[TransformerSpec, Dict[str, Tensor]]:
    """``(spec, tensors)`` of an ``LSTransformer`` for :class:`TransformerEngine`.

    The tensors are the model's parameters (detached views), except the sinusoid position
    tables (``max_positions`` rows, fairseq's formula without a padding offset, computed in the
    parameters' dtype). ``decoder_start_token_id`` only matters to ``TransformerEngine.start``:
    ``generate`` drives the engine through ``begin`` / ``DrivenSession.step``, which feed the
    search's own BOS. Raises ``ValueError`` with :func:`engine_problem`'s reason.
    """
    problem = engine_problem(model)
    if problem:
        raise ValueError(f"the LSTransformer cannot run on the decoding engine: {problem}")
    encoder, decoder = model.encoder, model.decoder
    c = decoder.layers[0].config
    target, source = decoder.embed_tokens.embeddings, encoder.embed_tokens.embeddings
    tied = decoder.output_projection.weight is target
    spec = TransformerSpec(
        vocab_size=target.shape[0], max_positions=max_positions, position_offset=0,
        hidden_size=c.hidden_size, encoder_layers=len(encoder.layers), decoder_layers=len(decoder.layers),
        num_heads=c.num_heads, ffn_size=c.ffn_size, activation=canonical_activation(c.activation),
        layer_norm_eps=c.layer_norm_eps, embed_scale=float(decoder.embed_tokens.config.scale),
        decoder_start_token_id=decoder_start_token_id, tie_word_embeddings=tied,
        normalize_before=c.pre_layer_norm, embed_layer_norm=False, positions_skip_padding=True,
        logits_bias=False, source_vocab_size=source.shape[0], final_layer_norm=True)
    p = lambda t: t.detach()  # noqa: E731
    positions = sinusoidal_table(max_positions, c.hidden_size).to(device=target.device, dtype=target.dtype)
    t = {"embed.tokens": p(target), "encoder.embed.tokens": p(source),
         "encoder.positions": positions, "decoder.positions": positions}
    if not tied:
        t["lm_head.weight"] = p(decoder.output_projection.weight)

    def copy_names(prefix, layer, names):
        for engine_name, layer_name in names:
            t[f"{prefix}{engine_name}.weight"] = p(getattr(layer, f"{layer_name}_weight"))
            t[f"{prefix}{engine_name}.bias"] = p(getattr(layer, f"{layer_name}_bias"))

    for side, stack in (("encoder", encoder), ("decoder", decoder)):
        t[f"{side}.final_ln.weight"] = p(stack.layer_norm.weight)
        t[f"{side}.final_ln.bias"] = p(stack.layer_norm.bias)
    for i, layer in enumerate(encoder.layers):
        copy_names(f"encoder.layers.{i}.", layer, (
            ("attn.qkv", "qkv"), ("attn.out", "attn_out"), ("ln1", "attn_norm"), ("ffn.fc1", "fc1"),
            ("ffn.fc2", "fc2"), ("ln2", "ffn_norm")))
    for i, layer in enumerate(decoder.layers):
        copy_names(f"decoder.layers.{i}.", layer, (
            ("self_attn.qkv", "qkv"), ("self_attn.out", "attn_out"), ("ln1", "attn_norm"),
            ("cross_attn.q", "cross_q"), ("cross_attn.kv", "cross_kv"), ("cross_attn.out", "cross_out"),
            ("ln2", "cross_norm"), ("ffn.fc1", "fc1"), ("ffn.fc2", "fc2"), ("ln3", "ffn_norm")))
    return spec, t


def _state(model) -> EngineState:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:  # created on first use; copies and pickles start without one
        state = EngineState()
        model.__dict__[_STATE_ATTR] = state
    return state


def engine_of(model) -> Optional[TransformerEngine]:
    """The engine ``model`` keeps between ``generate`` calls (None before the first)."""
    return _state(model).engine


def engine_for(model, positions: int) -> TransformerEngine:
    """The engine over ``model``'s current parameters with room for ``positions`` source and
    target positions (built or rebuilt as needed; see the module docstring)."""
    state = _state(model)
    params = tuple((q.data_ptr(), q.dtype, q.device) for q in model.parameters())
    rows = bucket(positions, MIN_POSITIONS)
    if state.engine is not None and state.key[0] == params:
        rows = max(rows, state.key[1])  # grow only: a shorter call reuses the larger tables

    def build():
        spec, tensors = ls_transformer_tensors(model, max_positions=rows)
        return TransformerEngine(spec, tensors, where=type(model).__name__)

    return state.current((params, rows, _config_key(model)), build)


def _config_key(model) -> tuple:
    """What besides the parameters the spec is read from (a changed eps rebuilds the engine)."""
    norms = (model.encoder.layer_norm.eps, model.decoder.layer_norm.eps)
    layers = tuple(layer.config for layer in (*model.encoder.layers, *model.decoder.layers))
    embeds = (model.encoder.embed_tokens.config, model.decoder.embed_tokens.config)
    return norms, layers, embeds, model.decoder.output_projection.weight is model.decoder.embed_tokens.embeddings


def use_engine_for(model, use_engine: Optional[bool]) -> bool:
    """Whether ``generate`` decodes on the engine: ``use_engine`` True forces it (``ValueError``
    naming what the engine cannot honour), False keeps the fused layers, None (the default)
    takes the engine where its CUDA graphs run (parameters on CUDA, kernels built) and the model
    is supported. Logs which path runs, and why, on the ``fastpatch`` logger."""
    if use_engine is not None and not isinstance(use_engine, bool):
        raise ValueError(f"use_engine must be None, True or False, got {use_engine!r}")
    if use_engine is False:
        return False
    device = next(model.parameters()).device
    problem = engine_problem(model)
    if not problem and torch.is_autocast_enabled(device.type):
        problem = "autocast is enabled (the engine computes in the parameters' dtype)"
    if use_engine:
        if problem:
            raise ValueError(f"use_engine=True, but the LSTransformer cannot run on the decoding "
                             f"engine: {problem}")
        return True
    if not problem and device.type != "cuda":
        problem = f"the parameters are on {device.type} (the engine's CUDA graphs are the gain)"
    if not problem and not graphs_available(device):
        problem = "the CUDA kernels are unavailable (see `fastpatch env`)"
    if problem:
        logger.info("fastpatch: LSTransformer.generate runs the fused layers: %s", problem)
        return False
    logger.info("fastpatch: LSTransformer.generate runs on the decoding engine "
                "(static KV cache, CUDA-graph steps)")
    return True


__all__ = ["ls_transformer_tensors", "engine_problem", "engine_for", "engine_of", "use_engine_for",
           "MIN_POSITIONS"]
