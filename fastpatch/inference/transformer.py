"""Encoder-decoder engine (BART, fairseq transformer): ``fi.Transformer(path).infer(src)``.

Per call: the encoder runs once over the padded source batch; each decoder layer's
cross-attention keys/values are computed from its output once and stored in a static buffer
(with the source padding as an additive mask), repeated for the beams of each sentence. The
decoder then runs one token per step from the start token, with its self-attention keys and
values in the same static arena as the decoder-only engine and the step captured in a CUDA
graph per (rows, target slots, source slots) bucket. Cross-attention keys are identical across
the beams of a sentence, so beam search reorders only the self-attention cache.

Supported checkpoints: Hugging Face BART (``BartForConditionalGeneration``) through
``fastpatch.export``, and fairseq's ``TransformerModel`` (post- or pre-LN, sinusoidal or learned
positions) through ``fastpatch.integrations.fairseq.engine``, which also drives the engine from
fairseq's own ``SequenceGenerator``, and a live ``fastpatch.training.LSTransformer`` (its
``generate`` drives it through ``fastpatch.training.engine``). The tensor layout is
framework-neutral (fused q/k/v, ``nn.Linear`` layouts), see :class:`TransformerSpec`.

Besides the one-call :meth:`TransformerEngine.start` (used by :class:`Transformer`'s searches),
the engine serves searches written elsewhere (fairseq's, LightSeq's): :meth:`~TransformerEngine.begin`
encodes and caches a source batch and returns a :class:`DrivenSession`, whose ``step`` decodes
one token for any number of rows (one graph per row bucket) and whose ``reorder_target`` /
``reorder_source`` follow the search's beams, also when its batch shrinks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..layers.functional import (LayerNormWeights, Projection, feed_forward, layer_norm, post_norm_residual,
                                 pre_norm_residual)
from ..ops._dispatch import prepare_dispatch
from . import checkpoint
from .blocks import EncoderLayer, encoder_layer, encoder_layer_shapes, linear, norm
from .cache import KVArena
from .generation import GenerativeModel, Started
from .graphs import bucket, graphs_available
from .inputs import token_batch
from .options import GenerationOptions
from .session import DecodeSession, StepGraphs

ARCHITECTURE = "transformer"
_MIN_SLOTS = 64
_MIN_SOURCE_SLOTS = 16


@dataclasses.dataclass(frozen=True)
class TransformerSpec(checkpoint.ModelSpec):
    """Shape and numerics of an encoder-decoder transformer.

    The defaults describe BART (post-LN, learned positions counted from the first column, a
    LayerNorm after the embeddings, one shared token table, ``final_logits_bias``); fairseq's
    transformer sets the fields after ``decoder_start_token_id``.
    """

    vocab_size: int
    #: rows of each position table; position ``p`` reads row ``p + position_offset``
    max_positions: int
    position_offset: int
    hidden_size: int
    encoder_layers: int
    decoder_layers: int
    num_heads: int
    ffn_size: int
    activation: str
    layer_norm_eps: float
    #: token embeddings are multiplied by it (``sqrt(hidden)`` with BART's ``scale_embedding``)
    embed_scale: float = 1.0
    #: the decoder's first input token
    decoder_start_token_id: int = 2
    #: the LM head is the token embedding (no ``lm_head.weight`` tensor)
    tie_word_embeddings: bool = True
    #: pre-LN layers (each sub-block normalises its input); False: post-LN. Pre-LN needs
    #: ``final_layer_norm``
    normalize_before: bool = False
    #: a LayerNorm right after the embeddings (``encoder.embed_ln``, ``decoder.embed_ln``)
    embed_layer_norm: bool = True
    #: source positions count tokens only (fairseq: a left-padded row's first token is position
    #: 0); False: position = column (BART)
    positions_skip_padding: bool = False
    #: the LM head adds ``final_logits_bias`` ``[V]``
    logits_bias: bool = True
    #: source vocabulary size when the encoder has its own token table
    #: (``encoder.embed.tokens``); 0: the encoder reads ``embed.tokens``
    source_vocab_size: int = 0
    #: a LayerNorm after each stack's last layer (``encoder.final_ln``, ``decoder.final_ln``):
    #: fairseq's pre-LN stacks, LightSeq's transformer in pre- and post-LN
    final_layer_norm: bool = False

    def __post_init__(self):
        checkpoint.validate_spec(self, (
            "vocab_size", "max_positions", "hidden_size", "encoder_layers", "decoder_layers",
            "num_heads", "ffn_size"))
        if self.source_vocab_size < 0:
            raise ValueError(f"model.source_vocab_size must be >= 0, got {self.source_vocab_size}")
        if self.normalize_before and not self.final_layer_norm:
            raise ValueError("model.final_layer_norm must be True when model.normalize_before is: a "
                             "pre-LN stack's output is normalised only by its final LayerNorm")

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerSpec":
        if "final_layer_norm" not in d and d.get("normalize_before"):
            # exported before the field existed, when pre-LN implied the final LayerNorms
            d = {**d, "final_layer_norm": True}
        return super().from_dict(d)

    @property
    def positions(self) -> int:
        """Tokens a source or a target may have."""
        return self.max_positions - self.position_offset

    def tensor_shapes(self) -> Dict[str, Tuple[int, ...]]:
        h, f, v = self.hidden_size, self.ffn_size, self.vocab_size
        shapes = {"embed.tokens": (v, h)}
        if self.logits_bias:
            shapes["final_logits_bias"] = (v,)
        if self.source_vocab_size:
            shapes["encoder.embed.tokens"] = (self.source_vocab_size, h)
        for side in ("encoder", "decoder"):
            shapes[f"{side}.positions"] = (self.max_positions, h)
            if self.embed_layer_norm:
                shapes.update({f"{side}.embed_ln.weight": (h,), f"{side}.embed_ln.bias": (h,)})
            if self.final_layer_norm:
                shapes.update({f"{side}.final_ln.weight": (h,), f"{side}.final_ln.bias": (h,)})
        for i in range(self.encoder_layers):
            p = f"encoder.layers.{i}."
            shapes.update(encoder_layer_shapes(p, h, f))
        for i in range(self.decoder_layers):
            p = f"decoder.layers.{i}."
            shapes.update({
                p + "self_attn.qkv.weight": (3 * h, h), p + "self_attn.qkv.bias": (3 * h,),
                p + "self_attn.out.weight": (h, h), p + "self_attn.out.bias": (h,),
                p + "ln1.weight": (h,), p + "ln1.bias": (h,),
                p + "cross_attn.q.weight": (h, h), p + "cross_attn.q.bias": (h,),
                p + "cross_attn.kv.weight": (2 * h, h), p + "cross_attn.kv.bias": (2 * h,),
                p + "cross_attn.out.weight": (h, h), p + "cross_attn.out.bias": (h,),
                p + "ln2.weight": (h,), p + "ln2.bias": (h,),
                p + "ffn.fc1.weight": (f, h), p + "ffn.fc1.bias": (f,),
                p + "ffn.fc2.weight": (h, f), p + "ffn.fc2.bias": (h,),
                p + "ln3.weight": (h,), p + "ln3.bias": (h,),
            })
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes



@dataclasses.dataclass(frozen=True)
class _DecoderLayer:
    qkv: Projection
    out: Projection
    ln1: LayerNormWeights
    cross_q: Projection
    cross_kv: Projection
    cross_out: Projection
    ln2: LayerNormWeights
    fc1: Projection
    fc2: Projection
    ln3: LayerNormWeights


class TransformerEngine:
    """Encoder forward, cross-attention cache and decode step over a :class:`TransformerSpec`."""

    def __init__(self, spec: TransformerSpec, tensors: Dict[str, Tensor], *, use_cuda_graph: bool = True,
                 where: str = "tensors"):
        checkpoint.check_tensors(spec.tensor_shapes(), tensors, where)
        self.spec, self.t = spec, tensors
        eps = spec.layer_norm_eps
        optional_norm = lambda prefix, present: norm(tensors, prefix, eps) if present else None  # noqa: E731
        self.encoder_embed_ln = optional_norm("encoder.embed_ln", spec.embed_layer_norm)
        self.decoder_embed_ln = optional_norm("decoder.embed_ln", spec.embed_layer_norm)
        self.encoder_final_ln = optional_norm("encoder.final_ln", spec.final_layer_norm)
        self.decoder_final_ln = optional_norm("decoder.final_ln", spec.final_layer_norm)
        self.encoder_layers = [EncoderLayer.of(tensors, f"encoder.layers.{i}.", eps)
                               for i in range(spec.encoder_layers)]
        self.decoder_layers: List[_DecoderLayer] = []
        for i in range(spec.decoder_layers):
            p = f"decoder.layers.{i}."
            self.decoder_layers.append(_DecoderLayer(
                linear(tensors, p + "self_attn.qkv"), linear(tensors, p + "self_attn.out"),
                norm(tensors, p + "ln1", eps), linear(tensors, p + "cross_attn.q"),
                linear(tensors, p + "cross_attn.kv"), linear(tensors, p + "cross_attn.out"),
                norm(tensors, p + "ln2", eps), linear(tensors, p + "ffn.fc1"), linear(tensors, p + "ffn.fc2"),
                norm(tensors, p + "ln3", eps)))
        self.source_tokens = tensors["encoder.embed.tokens" if spec.source_vocab_size else "embed.tokens"]
        self.lm_head = tensors["embed.tokens"] if spec.tie_word_embeddings else tensors["lm_head.weight"]
        self.logits_bias = tensors["final_logits_bias"] if spec.logits_bias else None
        self.device, self.dtype = self.lm_head.device, self.lm_head.dtype
        head_dim = spec.hidden_size // spec.num_heads
        self.arena = KVArena(spec.decoder_layers, spec.num_heads, head_dim, self.dtype, self.device)
        self.cross = KVArena(spec.decoder_layers, spec.num_heads, head_dim, self.dtype, self.device)
        self._source_bias: Optional[Tensor] = None  # [rows, source slots] additive, follows self.cross
        prepare_dispatch(self.device)
        self.use_cuda_graph = use_cuda_graph and graphs_available(self.device)
        self.graphs = StepGraphs(self.arena, self.cross)

    def _embed(self, ids: Tensor, positions: Tensor, tokens: Tensor, table: str, ln) -> Tensor:
        x = F.embedding(ids, tokens) * self.spec.embed_scale
        x = x + F.embedding(positions + self.spec.position_offset, self.t[table])
        return layer_norm(x, ln) if ln is not None else x

    def encode(self, src: Tensor, mask: Tensor, padded: bool) -> Tensor:
        """``src [B, S]`` (``mask`` True = token) -> encoder output ``[B, S, H]``."""
        if self.spec.positions_skip_padding:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # padding: any valid row, masked
        else:
            positions = torch.arange(src.shape[1], device=src.device)
        x = self._embed(src, positions, self.source_tokens, "encoder.positions", self.encoder_embed_ln)
        padding = ~mask if padded else None
        for layer in self.encoder_layers:
            x = encoder_layer(x, layer, self.spec.num_heads, self.spec.activation, padding,
                              normalize_before=self.spec.normalize_before)
        return layer_norm(x, self.encoder_final_ln) if self.encoder_final_ln is not None else x

    def decode(self, tokens: Tensor, start: Tensor, slot: Tensor, slots: int, source_slots: int) -> Tensor:
        """One target token per row at slot ``slot`` (every row starts at slot 0, so ``start``
        is unused); attends to target slots ``<= slot`` and to the cached source. ``[R, V]``."""
        rows, heads, pre = tokens.shape[0], self.spec.num_heads, self.spec.normalize_before
        x = self._embed(tokens, slot.expand(rows), self.t["embed.tokens"], "decoder.positions",
                        self.decoder_embed_ln).unsqueeze(1)
        index = torch.arange(slots, device=tokens.device)
        self_bias = torch.zeros(1, 1, 1, slots, dtype=self.dtype, device=tokens.device)
        self_bias = self_bias.masked_fill(index > slot, float("-inf"))
        source_bias = self._source_bias[:rows, :source_slots].view(rows, 1, 1, source_slots)

        def end_of_block(y, bias, residual, own_norm, next_norm):
            # (new residual stream, input of the next sub-block): post-LN normalises with the
            # block's own LayerNorm, pre-LN adds and applies the next block's
            if pre:
                return pre_norm_residual(y, bias, residual, next_norm, 0.0, False)
            x = post_norm_residual(y, bias, residual, own_norm, 0.0, False)
            return x, x

        h = layer_norm(x, self.decoder_layers[0].ln1) if pre else x
        for i, layer in enumerate(self.decoder_layers):
            q, k, v = ops.split_heads(layer.qkv(h, with_bias=False), layer.qkv.bias(), heads, 3)
            cache_k, cache_v = self.arena.layer(i, rows, slots)
            ops.kv_cache_append_(cache_k, cache_v, k, v, slot)
            # the mask is never empty for a row (its own slot, source slot 0), so SDPA takes it as is
            context = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=self_bias)
            x, h = end_of_block(layer.out(ops.merge_heads(context), with_bias=False), layer.out.bias(),
                                x, layer.ln1, layer.ln2)
            (q,) = ops.split_heads(layer.cross_q(h, with_bias=False), layer.cross_q.bias(), heads, 1)
            source_k, source_v = self.cross.layer(i, rows, source_slots)
            context = F.scaled_dot_product_attention(q, source_k, source_v, attn_mask=source_bias)
            x, h = end_of_block(layer.cross_out(ops.merge_heads(context), with_bias=False),
                                layer.cross_out.bias(), x, layer.ln2, layer.ln3)
            y = feed_forward(h, layer.fc1, layer.fc2, self.spec.activation)
            if pre:
                last = i + 1 == len(self.decoder_layers)
                x, h = pre_norm_residual(y, layer.fc2.bias(), x, self.decoder_final_ln if last
                                         else self.decoder_layers[i + 1].ln1, 0.0, False)
            else:
                x = h = post_norm_residual(y, layer.fc2.bias(), x, layer.ln3, 0.0, False)
        if not pre and self.decoder_final_ln is not None:  # pre-LN applied it with the last residual
            h = layer_norm(h, self.decoder_final_ln)
        return F.linear(h[:, 0], self.lm_head, self.logits_bias)

    def _reserve(self, rows: int, target_slots: int, source_length: int) -> Tuple[int, int]:
        """Room for ``rows`` decoder rows: ``(slots, source_slots)`` of the step graphs."""
        slots, source_slots = bucket(target_slots, _MIN_SLOTS), bucket(source_length, _MIN_SOURCE_SLOTS)
        self.arena.reserve(rows, slots)
        self.cross.reserve(rows, source_slots)
        bias_shape = (self.cross.data.shape[2], self.cross.data.shape[4])  # (rows, source slots)
        if self._source_bias is None or tuple(self._source_bias.shape) != bias_shape:
            self._source_bias = torch.zeros(bias_shape, dtype=self.dtype, device=self.device)
        return slots, source_slots

    def start(self, src: Tensor, mask: Tensor, padded: bool, max_new_tokens: int, expand: int):
        """Encode, fill the cross-attention cache and run the start token: ``(session, logits)``
        for ``B * expand`` rows (each sentence repeated ``expand`` times)."""
        batch, length = src.shape
        if max_new_tokens > self.spec.positions:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's "
                             f"{self.spec.positions} target positions")
        rows = batch * expand
        padded_rows = bucket(rows)
        slots, source_slots = self._reserve(padded_rows, max_new_tokens, length)
        step = functools.partial(self.decode, slots=slots, source_slots=source_slots)
        graph = (self.graphs.get((padded_rows, slots, source_slots), padded_rows, step)
                 if self.use_cuda_graph else None)
        self._fill_source(self.encode(src, mask, padded), mask, expand, source_slots)
        start = torch.zeros(padded_rows, dtype=torch.int64, device=self.device)
        session = DecodeSession(self.arena, rows, padded_rows, step, start, 0, graph, slots)
        first = torch.full((rows,), self.spec.decoder_start_token_id, dtype=torch.int64, device=self.device)
        return session, session.step(first)

    def begin(self, src: Tensor, mask: Tensor, padded: bool, *, max_rows: int,
              max_target_tokens: int) -> "DrivenSession":
        """Encode ``src [B, S]`` into the cross-attention cache (rows ``0..B-1``) for a search
        that drives the decoder itself (:class:`DrivenSession`): it may grow the batch to at
        most ``max_rows`` rows (beams) and feeds at most ``max_target_tokens`` tokens a row."""
        if max_target_tokens > self.spec.positions:
            raise ValueError(f"{max_target_tokens} target tokens exceed the model's "
                             f"{self.spec.positions} target positions")
        # one slot beyond the need: graphs captured mid-search warm up there (see DrivenSession)
        slots, source_slots = self._reserve(bucket(max_rows), max_target_tokens + 1, src.shape[1])
        self._fill_source(self.encode(src, mask, padded), mask, 1, source_slots)
        return DrivenSession(self, src.shape[0], slots, source_slots)

    def _fill_source(self, encoded: Tensor, mask: Tensor, expand: int, source_slots: int) -> None:
        batch, length = mask.shape
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        for i, layer in enumerate(self.decoder_layers):
            k, v = ops.split_heads(layer.cross_kv(encoded, with_bias=False), layer.cross_kv.bias(),
                                   self.spec.num_heads, 2)
            cache_k, cache_v = self.cross.layer(i, batch, source_slots)
            ops.kv_cache_append_(cache_k, cache_v, k, v, zero)
        self.cross.repeat_rows(batch, expand, length)
        bias = self._source_bias[:, :source_slots]
        bias.fill_(float("-inf"))
        bias[:, 0] = 0  # rows past the batch (bucket filler) see one finite key
        rows = batch * expand
        bias[:rows, :length] = torch.zeros_like(mask, dtype=self.dtype).masked_fill(
            ~mask, float("-inf")).repeat_interleave(expand, dim=0)


class DrivenSession:
    """The decoder state of one source batch, stepped by a search outside the engine (fairseq's
    ``SequenceGenerator``), which may repeat, permute and drop rows between steps.

    Each step runs on the power-of-two bucket of the current row count, so a search whose batch
    shrinks as sentences finish replays a few graphs (one per bucket, kept by the engine across
    calls). A graph first needed mid-search is captured then; its warm-up runs write the one
    spare slot past :attr:`slots` ``- 1`` that no step reaches, so the cache stays intact.
    """

    def __init__(self, engine: TransformerEngine, rows: int, slots: int, source_slots: int):
        self.engine, self.slots, self.source_slots = engine, slots, source_slots
        self.rows = self.source_rows = rows
        self.written = 0
        self._step = functools.partial(engine.decode, slots=slots, source_slots=source_slots)
        self._slot = torch.zeros(1, dtype=torch.int64, device=engine.device)
        self._start = torch.zeros(0, dtype=torch.int64, device=engine.device)  # decode ignores it
        self._tokens = torch.zeros(0, dtype=torch.int64, device=engine.device)  # eager steps' input

    def reorder_target(self, index: Tensor) -> None:
        """Target row ``i`` becomes row ``index[i]`` (``[R']`` int64 on the device; ``R'`` may
        differ from the current rows)."""
        if self.written:
            self.engine.arena.reorder_rows(index, self.written)
        self.rows = index.shape[0]

    def reorder_source(self, index: Tensor) -> None:
        """The same for the cached source. It moves only when the row count changes: a search
        that reorders beams within their sentence (fairseq's) leaves every row's source as is,
        and copying it every step would cost more than the step."""
        if index.shape[0] == self.source_rows:
            return
        engine = self.engine
        engine.cross.reorder_rows(index, self.source_slots)
        bias = engine._source_bias[:, :self.source_slots]
        bias[: index.shape[0]] = bias.index_select(0, index)
        self.source_rows = index.shape[0]
        if not self.written:
            self.rows = self.source_rows

    def step(self, tokens: Tensor) -> Tensor:
        """``tokens [R]`` (R = the current rows) at the next target position: ``[R, V]`` logits."""
        if not tokens.shape[0] == self.rows == self.source_rows:
            raise ValueError(f"tokens has {tokens.shape[0]} rows, the session {self.rows} target and "
                             f"{self.source_rows} source rows")
        if self.written >= self.slots - 1:
            raise ValueError(f"more than {self.slots - 1} target tokens in a session begun for fewer")
        engine, rows = self.engine, bucket(self.rows)
        if engine.use_cuda_graph:
            graph = engine.graphs.get((rows, self.slots, self.source_slots), rows, self._step,
                                      warmup_slot=self.slots - 1)
            graph.tokens[: self.rows].copy_(tokens)
            graph.slot.fill_(self.written)
            logits = graph.call()
        else:  # the same shapes as the graphs, so both give the same numbers
            if self._tokens.shape[0] < rows:
                self._tokens = torch.zeros(rows, dtype=torch.int64, device=engine.device)
            self._tokens[: self.rows].copy_(tokens)
            self._slot.fill_(self.written)
            logits = self._step(self._tokens[:rows], self._start, self._slot)
        self.written += 1
        return logits[: self.rows]


class Transformer(GenerativeModel):
    """Three-line translation / summarisation:
    ``fi.Transformer(path, max_batch_size=8).infer([[1, 2, 3], [4, 5, 6]])``.

    Args:
        path: a directory written by ``fastpatch.export`` from a BART or fairseq transformer
            model. Searches follow Hugging Face's rules (``generate``'s beam search); for
            fairseq's own search over the engine see ``fastpatch.integrations.fairseq.engine``.
        max_batch_size: most source sentences per call (more raise ``ValueError``).
        device, dtype, use_cuda_graph: as :class:`fastpatch.inference.Gpt`.
    """

    def __init__(self, path, max_batch_size: int = 8, *, device=None, dtype: Optional[torch.dtype] = None,
                 use_cuda_graph: bool = True):
        model, tensors, generation = checkpoint.load(path, ARCHITECTURE, device=device, dtype=dtype)
        self._setup(TransformerSpec.from_dict(model), tensors, GenerationOptions.from_dict(generation),
                    max_batch_size, use_cuda_graph, str(path))

    @classmethod
    def from_hf(cls, model, max_batch_size: int = 8, *, use_cuda_graph: bool = True) -> "Transformer":
        """An engine over a live ``BartForConditionalGeneration`` (q/k/v concatenated once: a copy)."""
        from .hf_models import bart_tensors

        spec, tensors, generation = bart_tensors(model)
        self = cls.__new__(cls)
        self._setup(spec, tensors, generation, max_batch_size, use_cuda_graph, type(model).__name__)
        return self

    def _setup(self, spec, tensors, generation, max_batch_size, use_cuda_graph, where) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.spec, self.generation, self.max_batch_size = spec, generation, max_batch_size
        self.engine = TransformerEngine(spec, tensors, use_cuda_graph=use_cuda_graph, where=where)
        self.device = self.engine.device

    def _start(self, input_ids, attention_mask, options: GenerationOptions, expand: int) -> Started:
        batch = token_batch(input_ids, attention_mask, vocab_size=self.spec.vocab_size,
                            max_batch_size=self.max_batch_size, device=self.device, left_align=False)
        if batch.ids.shape[1] > self.spec.positions:
            raise ValueError(f"input_ids has {batch.ids.shape[1]} tokens per row, more than the "
                             f"model's {self.spec.positions} positions")
        session, logits = self.engine.start(batch.ids, batch.mask, batch.padded, options.max_new_tokens,
                                            expand)
        return Started(session, logits, batch.ids.shape[0], 1)  # the decoder prompt: the start token

    def infer(self, input_ids, attention_mask=None, **options):
        """Decode every source sentence with the exported options (beam search for a translation
        export), overridden by ``options``; returns :class:`GenerationOutput` (``tokens`` are the
        new target tokens, without the start token, best hypothesis first)."""
        return self.generate(input_ids, attention_mask, **options)
