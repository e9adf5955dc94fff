"""Decoder-only engine (GPT-2 family): parallel prefill, static KV cache, graph-replayed steps.

Per ``generate`` call:

1. **Prefill**: one forward over the left-aligned ``[B, L]`` prompt (per-row position ids
   from the mask, causal + padding mask) writes slots ``0..L-1`` of the cache and gives the
   last token's logits. Rows of a prompt share slot numbers; row ``b``'s padding occupies
   slots ``< start[b]`` and is masked forever after.
2. **Decode steps**: one token per row at slot ``L + t``, position ``slot - start[b]``, attending
   to the slots ``start[b]..slot``. The step has fixed shapes (rows and slots rounded up to a
   power of two), so on CUDA it is captured once per shape in a CUDA graph and replayed with
   the token, the slot and the row starts in static device buffers. On the CPU the same step
   function runs eagerly.

The block math is fastpatch's fused ops (``split_heads``, ``kv_cache_append_``, ``attention``,
``bias_dropout_residual_prenorm`` chaining each residual add into the next LayerNorm, and
``bias_activation_dropout``) applied to tensors the engine does not own: those of an exported
file, or views of a live Hugging Face model's parameters (no copy, see :meth:`Gpt.from_hf`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..layers.functional import (LayerNormWeights, Projection, feed_forward, layer_norm,
                                 pre_norm_residual)
from ..ops._dispatch import prepare_dispatch
from . import checkpoint
from .cache import KVArena
from .generation import GenerativeModel, Started
from .graphs import bucket, graphs_available
from .inputs import token_batch
from .options import GenerationOptions
from .session import DecodeSession, StepGraphs

ARCHITECTURE = "gpt"
# Smallest cache length of a step graph: shorter generations share one graph.
_MIN_SLOTS = 64


@dataclasses.dataclass(frozen=True)
class GptSpec(checkpoint.ModelSpec):
    """Shape and numerics of a pre-LN decoder-only transformer with learned positions."""

    vocab_size: int
    max_positions: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    activation: str
    layer_norm_eps: float
    #: factor on ``q @ k^T`` per layer (GPT-2: ``head_dim ** -0.5``, optionally ``/ (layer + 1)``)
    attention_scales: Tuple[float, ...]
    #: the LM head is the token embedding (no ``lm_head.weight`` tensor)
    tie_word_embeddings: bool = True

    def __post_init__(self):
        checkpoint.validate_spec(self, (
            "vocab_size", "max_positions", "hidden_size", "num_layers", "num_heads", "ffn_size"))
        object.__setattr__(self, "attention_scales", tuple(float(s) for s in self.attention_scales))
        if len(self.attention_scales) != self.num_layers:
            raise ValueError(f"model.attention_scales has {len(self.attention_scales)} entries for "
                             f"{self.num_layers} layers")

    def tensor_shapes(self) -> Dict[str, Tuple[int, ...]]:
        h, f = self.hidden_size, self.ffn_size
        shapes = {"embed.tokens": (self.vocab_size, h), "embed.positions": (self.max_positions, h)}
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "ln1.weight": (h,), p + "ln1.bias": (h,),
                p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
                p + "attn.out.weight": (h, h), p + "attn.out.bias": (h,),
                p + "ln2.weight": (h,), p + "ln2.bias": (h,),
                p + "ffn.fc1.weight": (f, h), p + "ffn.fc1.bias": (f,),
                p + "ffn.fc2.weight": (h, f), p + "ffn.fc2.bias": (h,),
            })
        shapes.update({"final_ln.weight": (h,), "final_ln.bias": (h,)})
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["attention_scales"] = list(self.attention_scales)
        return d


@dataclasses.dataclass(frozen=True)
class _Layer:
    ln1: LayerNormWeights
    qkv: Projection
    out: Projection
    ln2: LayerNormWeights
    fc1: Projection
    fc2: Projection
    scale: float


class GptEngine:
    """Prefill and decode step over a :class:`GptSpec`'s tensors (see the module docstring)."""

    def __init__(self, spec: GptSpec, tensors: Dict[str, Tensor], *, use_cuda_graph: bool = True,
                 where: str = "tensors"):
        checkpoint.check_tensors(spec.tensor_shapes(), tensors, where)
        self.spec = spec
        t = tensors
        eps = spec.layer_norm_eps
        norm = lambda p: LayerNormWeights(t[p + ".weight"], t[p + ".bias"], eps)  # noqa: E731
        linear = lambda p: Projection((t[p + ".weight"],), (t[p + ".bias"],))  # noqa: E731
        self.layers: List[_Layer] = [
            _Layer(norm(f"layers.{i}.ln1"), linear(f"layers.{i}.attn.qkv"), linear(f"layers.{i}.attn.out"),
                   norm(f"layers.{i}.ln2"), linear(f"layers.{i}.ffn.fc1"), linear(f"layers.{i}.ffn.fc2"),
                   spec.attention_scales[i])
            for i in range(spec.num_layers)]
        self.final_ln = norm("final_ln")
        self.token_embedding = t["embed.tokens"]
        self.position_embedding = t["embed.positions"]
        self.lm_head = t["embed.tokens"] if spec.tie_word_embeddings else t["lm_head.weight"]
        self.device, self.dtype = self.token_embedding.device, self.token_embedding.dtype
        self.arena = KVArena(spec.num_layers, spec.num_heads, spec.hidden_size // spec.num_heads,
                             self.dtype, self.device)
        prepare_dispatch(self.device)
        self.use_cuda_graph = use_cuda_graph and graphs_available(self.device)
        self.graphs = StepGraphs(self.arena)

    # ------------------------------------------------------------------------------ math
    def _blocks(self, x: Tensor, attend) -> Tensor:
        """The layers over ``x [R, L, H]``; returns the final LayerNorm's output.

        ``attend(i, q, k, v)`` does layer ``i``'s attention (and cache write) on
        ``[R, heads, L, head_dim]`` tensors. Each residual add is fused with the LayerNorm that
        follows it (the next sub-block's, or the final one).
        """
        heads = self.spec.num_heads
        normed = layer_norm(x, self.layers[0].ln1)
        for i, layer in enumerate(self.layers):
            q, k, v = ops.split_heads(layer.qkv(normed, with_bias=False), layer.qkv.bias(), heads, 3)
            context = ops.merge_heads(attend(i, q, k, v))
            x, normed = pre_norm_residual(layer.out(context, with_bias=False), layer.out.bias(), x,
                                          layer.ln2, 0.0, False)
            y = feed_forward(normed, layer.fc1, layer.fc2, self.spec.activation)
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.final_ln
            x, normed = pre_norm_residual(y, layer.fc2.bias(), x, after, 0.0, False)
        return normed

    def _embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return F.embedding(ids, self.token_embedding) + F.embedding(positions, self.position_embedding)

    def prefill(self, ids: Tensor, mask: Tensor, slots: int) -> Tensor:
        """Forward the left-aligned prompt ``[B, L]`` into cache rows ``0..B-1``, slots ``0..L-1``.

        Returns the ``[B, V]`` logits of each row's last token.
        """
        batch = ids.shape[0]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # padding: any valid index, masked
        padding = ~mask
        zero = torch.zeros(1, dtype=torch.int64, device=ids.device)

        def attend(i, q, k, v):
            cache_k, cache_v = self.arena.layer(i, batch, slots)
            ops.kv_cache_append_(cache_k, cache_v, k, v, zero)
            return ops.attention(q, k, v, key_padding_mask=padding, causal=True,
                                 scale=self.layers[i].scale)

        normed = self._blocks(self._embed(ids, positions), attend)
        return F.linear(normed[:, -1], self.lm_head)

    def decode(self, tokens: Tensor, start: Tensor, slot: Tensor, slots: int) -> Tensor:
        """One token per row: ``tokens [R]`` at cache slot ``slot [1]``; rows see slots
        ``start[r]..slot``. Returns ``[R, V]`` logits. Pure function of device tensors (no
        host sync, fixed shapes): the unit the CUDA graph captures."""
        rows = tokens.shape[0]
        x = self._embed(tokens, slot - start).unsqueeze(1)  # [R, 1, H]
        index = torch.arange(slots, device=tokens.device)
        visible = (index >= start[:, None]) & (index <= slot)
        # one additive mask for all layers; no row is fully masked (its own slot is visible),
        # so SDPA can take it directly without ops.attention's fully-masked-row fix-up
        bias = torch.zeros(rows, 1, 1, slots, dtype=self.dtype, device=tokens.device)
        bias = bias.masked_fill(~visible[:, None, None, :], float("-inf"))

        def attend(i, q, k, v):
            cache_k, cache_v = self.arena.layer(i, rows, slots)
            ops.kv_cache_append_(cache_k, cache_v, k, v, slot)
            return F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=bias,
                                                  scale=self.layers[i].scale)

        return F.linear(self._blocks(x, attend)[:, 0], self.lm_head)

    # --------------------------------------------------------------------------- sessions
    def start(self, ids: Tensor, mask: Tensor, max_new_tokens: int, expand: int):
        """Prefill and a session of ``B * expand`` rows (each prompt repeated ``expand`` times,
        for beams or several samples). Returns ``(session, logits [B * expand, V])``."""
        batch, length = ids.shape
        if length + max_new_tokens > self.spec.max_positions:
            raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of {length} tokens "
                             f"exceeds the model's {self.spec.max_positions} positions")
        rows = batch * expand
        padded_rows, slots = bucket(rows), bucket(length + max_new_tokens, _MIN_SLOTS)
        self.arena.reserve(padded_rows, slots)
        step = functools.partial(self.decode, slots=slots)
        graph = self.graphs.get((padded_rows, slots), padded_rows, step) if self.use_cuda_graph else None
        logits = self.prefill(ids, mask, slots)  # after the capture: its warm-up wrote slot 0
        self.arena.repeat_rows(batch, expand, length)
        start = torch.full((padded_rows,), length - 1, dtype=torch.int64, device=self.device)
        start[:rows] = (length - mask.sum(dim=1)).repeat_interleave(expand)
        session = DecodeSession(self.arena, rows, padded_rows, step, start, length, graph, slots)
        return session, logits.repeat_interleave(expand, dim=0)


class Gpt(GenerativeModel):
    """Three-line GPT inference: ``fi.Gpt(path, max_batch_size=8).sample(ids, max_new_tokens=32)``.

    Args:
        path: a directory written by ``fastpatch.export`` (``config.json`` + ``model.safetensors``).
        max_batch_size: most prompts per call (more raise ``ValueError``); not a memory
            reservation: the cache grows to what calls need.
        device: default CUDA when available, else CPU.
        dtype: cast the weights (e.g. ``torch.float16``); default as exported.
        use_cuda_graph: replay captured decode steps on CUDA (False: eager steps, for debugging).
    """

    def __init__(self, path, max_batch_size: int = 8, *, device=None, dtype: Optional[torch.dtype] = None,
                 use_cuda_graph: bool = True):
        model, tensors, generation = checkpoint.load(path, ARCHITECTURE, device=device, dtype=dtype)
        self._setup(GptSpec.from_dict(model), tensors, GenerationOptions.from_dict(generation),
                    max_batch_size, use_cuda_graph, where=str(path))

    @classmethod
    def from_hf(cls, model, max_batch_size: int = 8, *, use_cuda_graph: bool = True) -> "Gpt":
        """An engine over a live ``transformers`` GPT-2 model's own parameters (views, no copy:
        later in-place weight updates are seen; moving or casting the model needs a new engine)."""
        from .hf_models import gpt2_tensors

        spec, tensors, generation = gpt2_tensors(model)
        self = cls.__new__(cls)
        self._setup(spec, tensors, generation, max_batch_size, use_cuda_graph,
                    where=type(model).__name__)
        return self

    def _setup(self, spec: GptSpec, tensors, generation: GenerationOptions, max_batch_size: int,
               use_cuda_graph: bool, where: str) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.spec, self.generation, self.max_batch_size = spec, generation, max_batch_size
        self.engine = GptEngine(spec, tensors, use_cuda_graph=use_cuda_graph, where=where)
        self.device = self.engine.device

    def _start(self, input_ids, attention_mask, options: GenerationOptions, expand: int):
        batch = token_batch(input_ids, attention_mask, vocab_size=self.spec.vocab_size,
                            max_batch_size=self.max_batch_size, device=self.device)
        session, logits = self.engine.start(batch.ids, batch.mask, options.max_new_tokens, expand)
        return Started(session, logits, batch.ids.shape[0], batch.ids.shape[1])
