"""fairseq's ``SequenceGenerator`` over fastpatch's decoding engine (``lightseq-generate``).

fairseq's beam search, sampling, prefixes, length penalty and shrinking batch stay fairseq's own
code: only the model under it changes. :class:`EngineEnsemble` stands in for fairseq's
``EnsembleModel`` (the object ``SequenceGenerator`` calls for every encoder pass, decoder step
and cache reorder) and answers those calls from :class:`fastpatch.inference.transformer.TransformerEngine`:
the encoder runs once, each decoder layer's cross-attention keys/values are cached once per
sentence, the self-attention cache is a static arena, and the single-token step is replayed
from a CUDA graph (one per bucket of live rows) instead of ~30 kernel launches per layer issued
from Python. Hypotheses are fairseq's by construction; only the arithmetic of the model differs
(fused kernels), within the precision of the dtype. The one field left empty is a hypothesis'
``attention`` (the alignment layer's cross-attention weights, which nothing in fairseq's commands
reads from this generator; ``--print-alignment`` builds ``SequenceGeneratorWithAlignment``,
which keeps fairseq's decoder).

Models it takes: a single fairseq ``TransformerModel`` (``transformer_*`` / ``ls_transformer_*``
architectures) in eval mode whose layers ``fastpatch.accelerate`` fuses, post- or pre-LN, with
sinusoidal or learned positions. :func:`engine_problem` names what keeps any other model (or
generator: alignment, ensembles, retained dropout) on fairseq's path, and the generator is left
untouched then.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase, TransformerModelBase
from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator

from fastpatch.adapters import FUSED_ATTR
from fastpatch.inference.transformer import DrivenSession, TransformerEngine, TransformerSpec

from . import _checks
from .decoder_layer import DecoderLayerAdapter
from .encoder_layer import EncoderLayerAdapter

logger = logging.getLogger("fastpatch.fairseq")

#: ``0`` keeps fairseq's decoding loop over the (fused) model; ``1`` uses the engine on the CPU
#: too (where it runs eagerly: meant for tests). Default: the engine on CUDA.
ENV_FLAG = "FASTPATCH_FAIRSEQ_ENGINE"


def _norm_eps(module) -> float:
    return float(module.eps)


def _stack_problem(stack, name: str) -> Optional[str]:
    """What in a fairseq encoder/decoder (outside its layers) the engine does not implement."""
    if getattr(stack, "quant_noise", None) is not None:
        return f"{name} uses quant_noise"
    if getattr(stack, "project_in_dim", None) is not None or getattr(stack, "project_out_dim", None) is not None:
        return f"{name} projects its input/output dimension (decoder_input_dim / output_dim)"
    positions = stack.embed_positions
    if type(positions) not in (SinusoidalPositionalEmbedding, LearnedPositionalEmbedding):
        return f"{name}.embed_positions is {type(positions).__name__}"
    if type(stack.embed_tokens) is not torch.nn.Embedding:
        return f"{name}.embed_tokens is a {type(stack.embed_tokens).__name__}, not nn.Embedding"
    layers = list(stack.layers)
    if not layers:
        return f"{name} has no layers"
    adapter = EncoderLayerAdapter() if name == "encoder" else DecoderLayerAdapter()
    for i, layer in enumerate(layers):
        if hasattr(layer, FUSED_ATTR):  # accelerated: its adapter accepted it
            continue
        if not adapter.applies_to(layer):
            return f"{name}.layers.{i} is a {type(layer).__name__}"
        reason = adapter.unsupported_reason(layer, f"{name}.layers.{i}")
        if reason:
            return f"{name}.layers.{i}: {reason}"
    return None


def model_problem(model) -> Optional[str]:
    """Why ``model`` cannot run on the engine, or None."""
    if not isinstance(model, TransformerModelBase):
        return f"{type(model).__name__} is not a fairseq TransformerModel"
    encoder, decoder = model.encoder, model.decoder
    if not isinstance(encoder, TransformerEncoderBase):
        return f"the encoder is a {type(encoder).__name__}"
    if not isinstance(decoder, TransformerDecoderBase):
        return f"the decoder is a {type(decoder).__name__}"
    if model.training:
        return "the model is in training mode (--retain-dropout)"
    for stack, name in ((encoder, "encoder"), (decoder, "decoder")):
        problem = _stack_problem(stack, name)
        if problem:
            return problem
    if decoder.adaptive_softmax is not None:
        return "the decoder uses an adaptive softmax"
    head = decoder.output_projection
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "the output projection is not a bias-free nn.Linear"
    if decoder.cross_self_attention:
        return "cross_self_attention=True"
    enc0, dec0 = encoder.layers[0], decoder.layers[0]
    shapes = {
        "embed_dim": (enc0.embed_dim, dec0.embed_dim),
        "attention heads": (enc0.self_attn.num_heads, dec0.self_attn.num_heads),
        "ffn_embed_dim": (enc0.fc1.out_features, dec0.fc1.out_features),
        "normalize_before": (enc0.normalize_before, dec0.normalize_before),
        "activation": (_checks.activation_name(enc0.activation_fn), _checks.activation_name(dec0.activation_fn)),
        "embed_scale": (float(encoder.embed_scale), float(decoder.embed_scale)),
        "padding_idx": (encoder.padding_idx, decoder.padding_idx),
        "layernorm_embedding": (encoder.layernorm_embedding is None, decoder.layernorm_embedding is None),
        "positions": (type(encoder.embed_positions), type(decoder.embed_positions)),
    }
    for what, (e, d) in shapes.items():
        if e != d:
            return f"encoder and decoder differ in {what} ({e} vs {d})"
    shape = lambda layer: (layer.embed_dim, layer.self_attn.num_heads, layer.fc1.out_features)  # noqa: E731
    for stack, name in ((encoder, "encoder"), (decoder, "decoder")):
        if any(shape(layer) != shape(dec0) for layer in stack.layers):
            return f"{name} layers of different shapes"
        if dec0.normalize_before and stack.layer_norm is None:
            return f"pre-LN {name} without its final LayerNorm (no_{name}_final_norm)"
        if not dec0.normalize_before and stack.layer_norm is not None:
            return f"post-LN {name} with a final LayerNorm"
    eps = {_norm_eps(m) for m in model.modules() if type(m).__name__ in ("LayerNorm", "FusedLayerNorm",
                                                                         "Fp32LayerNorm")}
    if len(eps) > 1:
        return f"LayerNorms with different eps {sorted(eps)}"
    return None


def _position_table(stack, rows: int) -> Tensor:
    """``[rows, H]``: row ``padding_idx + 1 + p`` holds position ``p`` (fairseq's layout)."""
    positions = stack.embed_positions
    weight = stack.embed_tokens.weight
    if isinstance(positions, LearnedPositionalEmbedding):
        return positions.weight.detach()[:rows]
    table = SinusoidalPositionalEmbedding.get_embedding(rows, weight.shape[1], stack.padding_idx)
    return table.to(device=weight.device, dtype=weight.dtype)


def engine_tensors(model) -> Tuple[TransformerSpec, Dict[str, Tensor]]:
    """``(spec, tensors)`` of a fairseq ``TransformerModel`` (see :func:`model_problem`).

    The tensors are the model's parameters (views), except the q/k/v and cross-attention k/v
    concatenations (copies) and the sinusoidal position tables (computed, as fairseq does).
    """
    problem = model_problem(model)
    if problem:
        raise ValueError(f"the fairseq model cannot run on the decoding engine: {problem}")
    encoder, decoder = model.encoder, model.decoder
    dec0 = decoder.layers[0]
    pad = decoder.padding_idx
    learned = isinstance(decoder.embed_positions, LearnedPositionalEmbedding)
    if learned:
        rows = min(encoder.embed_positions.weight.shape[0], decoder.embed_positions.weight.shape[0])
    else:
        rows = pad + 1 + max(encoder.max_source_positions, decoder.max_target_positions)
    shared = encoder.embed_tokens.weight is decoder.embed_tokens.weight
    tied = decoder.output_projection.weight is decoder.embed_tokens.weight
    p = lambda t: t.detach()  # noqa: E731
    spec = TransformerSpec(
        vocab_size=decoder.embed_tokens.weight.shape[0], max_positions=rows, position_offset=pad + 1,
        hidden_size=dec0.embed_dim, encoder_layers=len(encoder.layers), decoder_layers=len(decoder.layers),
        num_heads=dec0.self_attn.num_heads, ffn_size=dec0.fc1.out_features,
        activation=_checks.activation_name(dec0.activation_fn), layer_norm_eps=_norm_eps(dec0.final_layer_norm),
        embed_scale=float(decoder.embed_scale), decoder_start_token_id=decoder.dictionary.eos(),
        tie_word_embeddings=tied, normalize_before=bool(dec0.normalize_before),
        final_layer_norm=bool(dec0.normalize_before),
        embed_layer_norm=decoder.layernorm_embedding is not None, positions_skip_padding=True,
        logits_bias=False, source_vocab_size=0 if shared else encoder.embed_tokens.weight.shape[0])
    t = {"embed.tokens": p(decoder.embed_tokens.weight)}
    if not shared:
        t["encoder.embed.tokens"] = p(encoder.embed_tokens.weight)
    if not tied:
        t["lm_head.weight"] = p(decoder.output_projection.weight)

    def norm(prefix, module):
        t.update({prefix + ".weight": p(module.weight), prefix + ".bias": p(module.bias)})

    def linear(prefix, *modules):
        t[prefix + ".weight"] = torch.cat([p(m.weight) for m in modules]) if len(modules) > 1 else p(modules[0].weight)
        t[prefix + ".bias"] = torch.cat([p(m.bias) for m in modules]) if len(modules) > 1 else p(modules[0].bias)

    for side, stack in (("encoder", encoder), ("decoder", decoder)):
        t[f"{side}.positions"] = _position_table(stack, rows)
        if stack.layernorm_embedding is not None:
            norm(f"{side}.embed_ln", stack.layernorm_embedding)
        if stack.layer_norm is not None:
            norm(f"{side}.final_ln", stack.layer_norm)
    for i, layer in enumerate(encoder.layers):
        prefix, attn = f"encoder.layers.{i}.", layer.self_attn
        linear(prefix + "attn.qkv", attn.q_proj, attn.k_proj, attn.v_proj)
        linear(prefix + "attn.out", attn.out_proj)
        norm(prefix + "ln1", layer.self_attn_layer_norm)
        linear(prefix + "ffn.fc1", layer.fc1)
        linear(prefix + "ffn.fc2", layer.fc2)
        norm(prefix + "ln2", layer.final_layer_norm)
    for i, layer in enumerate(decoder.layers):
        prefix, attn, cross = f"decoder.layers.{i}.", layer.self_attn, layer.encoder_attn
        linear(prefix + "self_attn.qkv", attn.q_proj, attn.k_proj, attn.v_proj)
        linear(prefix + "self_attn.out", attn.out_proj)
        norm(prefix + "ln1", layer.self_attn_layer_norm)
        linear(prefix + "cross_attn.q", cross.q_proj)
        linear(prefix + "cross_attn.kv", cross.k_proj, cross.v_proj)
        linear(prefix + "cross_attn.out", cross.out_proj)
        norm(prefix + "ln2", layer.encoder_attn_layer_norm)
        linear(prefix + "ffn.fc1", layer.fc1)
        linear(prefix + "ffn.fc2", layer.fc2)
        norm(prefix + "ln3", layer.final_layer_norm)
    return spec, t


class _Encoded:
    """What :meth:`EngineEnsemble.forward_encoder` hands ``SequenceGenerator`` in place of the
    encoder output: the engine's session of that batch (the output itself lives in its cache)."""

    __slots__ = ("session",)

    def __init__(self, session: DrivenSession):
        self.session = session


class EngineEnsemble(EnsembleModel):
    """fairseq's ``EnsembleModel`` of one ``TransformerModel``, decoding through the engine.

    Args:
        model: the fairseq model (its parameters are read, not copied, except q/k/v).
        generator: the ``SequenceGenerator`` it serves (its length limits size the cache).
        use_cuda_graph: replay captured steps on CUDA.
    """

    def __init__(self, model, generator: SequenceGenerator, *, use_cuda_graph: bool = True):
        super().__init__([model])
        self._limits = (generator.max_len_a, generator.max_len_b, generator.max_len,
                        generator.match_source_len, generator.beam_size)
        self._use_cuda_graph = use_cuda_graph
        self._engine: Optional[TransformerEngine] = None
        self._key = None
        # built now, with the generator (fairseq-generate has loaded, cast and moved the model
        # by then), not in the first batch: that is generation time the user waits for
        self.engine()

    def engine(self) -> TransformerEngine:
        """The engine over the model's current parameters (rebuilt when they were replaced,
        moved, cast or updated in place: the q/k/v concatenations are copies)."""
        model = self.single_model
        key = tuple((q.data_ptr(), q.dtype, q.device, q._version) for q in model.parameters())
        if self._engine is None or key != self._key:
            spec, tensors = engine_tensors(model)
            self._engine = TransformerEngine(spec, tensors, use_cuda_graph=self._use_cuda_graph,
                                             where=type(model).__name__)
            self._key = key
        return self._engine

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        src = net_input["src_tokens"]
        max_len_a, max_len_b, max_len, match_source_len, beam = self._limits
        mask = src.ne(self.single_model.encoder.padding_idx)
        # SequenceGenerator's own bound: it feeds at most max_len + 1 tokens a row
        if match_source_len:
            longest = int(mask.sum(dim=1).max())
        else:
            longest = min(int(max_len_a * src.shape[1] + max_len_b), max_len - 1)
        session = self.engine().begin(src, mask, bool((~mask).any()), max_rows=src.shape[0] * beam,
                                      max_target_tokens=longest + 1)
        return [_Encoded(session)]

    def reorder_encoder_out(self, encoder_outs: List[_Encoded], new_order: Tensor):
        encoder_outs[0].session.reorder_source(new_order)
        return encoder_outs

    def reorder_incremental_state(self, incremental_states, new_order: Tensor):
        # the search reorders between steps, before it reorders the encoder output
        self._session.reorder_target(new_order)

    def forward_decoder(self, tokens: Tensor, encoder_outs: List[_Encoded], incremental_states,
                        temperature: float = 1.0):
        """``tokens [R, t + 1]`` (the search's prefixes) -> ``([R, V]`` fp32 log-probs, None)."""
        session = self._session = encoder_outs[0].session
        if session.written != tokens.shape[1] - 1:
            raise RuntimeError(f"the search fed a prefix of {tokens.shape[1]} tokens after "
                               f"{session.written} steps: it must extend every row by one token a step")
        logits = session.step(tokens[:, -1])
        if temperature != 1.0:
            logits = logits / temperature  # in the model's dtype, as fairseq's forward_decoder
        return torch.log_softmax(logits.float(), dim=-1), None


def engine_problem(generator, models) -> Optional[str]:
    """Why ``generator`` (built by a fairseq task for ``models``) keeps fairseq's decoding."""
    setting = os.environ.get(ENV_FLAG)
    if setting == "0":
        return f"{ENV_FLAG}=0"
    if type(generator) is not SequenceGenerator:
        return f"{type(generator).__name__} (alignment or another generator) is not supported"
    if len(models) != 1:
        return f"an ensemble of {len(models)} models"
    model = models[0]
    device = next(model.parameters()).device
    if device.type != "cuda" and setting != "1":
        return f"the model is on {device.type} (the engine's CUDA graphs are the gain)"
    return model_problem(model)


def attach(generator, models) -> bool:
    """Puts :class:`EngineEnsemble` under ``generator`` when it can serve it; logs which."""
    problem = engine_problem(generator, models)
    if problem:
        logger.info("fastpatch: generation runs fairseq's decoder: %s", problem)
        return False
    generator.model = EngineEnsemble(models[0], generator)
    logger.info("fastpatch: generation runs on the decoding engine (static KV cache, CUDA-graph steps)")
    return True
