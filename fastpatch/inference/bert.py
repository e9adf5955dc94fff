"""BERT encoder inference: ``fi.Bert(path, max_batch_size=8).infer(ids)``.

The forward is fastpatch's fused ops (``blocks.encoder_layer``) over the exported tensors. On CUDA one forward per (rows, length) bucket, lengths and rows rounded
up to powers of two, is captured in a CUDA graph: at batch 1 a BERT-base forward is ~100
kernels that eager PyTorch issues slower than the GPU runs them. Padding added to reach a
bucket is masked, so it changes no real token's output; an input without padding that fills
its bucket exactly runs a graph without any mask (SDPA's fastest kernels).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.functional import layer_norm
from ..ops._dispatch import prepare_dispatch
from . import checkpoint
from .blocks import EncoderLayer, encoder_layer, encoder_layer_shapes, norm
from .exclusive import guard_of
from .graphs import CapturedCall, bucket, graphs_available
from .inputs import token_batch

ARCHITECTURE = "bert"


@dataclasses.dataclass(frozen=True)
class BertSpec(checkpoint.ModelSpec):
    """Shape and numerics of a BERT encoder (post-LN, learned absolute positions, token types)."""

    vocab_size: int
    max_positions: int
    type_vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    activation: str
    layer_norm_eps: float
    #: the model has BERT's pooler (``tanh(W h[CLS] + b)``)
    pooler: bool = True

    def __post_init__(self):
        checkpoint.validate_spec(self, (
            "vocab_size", "max_positions", "type_vocab_size", "hidden_size", "num_layers",
            "num_heads", "ffn_size"))

    def tensor_shapes(self) -> Dict[str, Tuple[int, ...]]:
        h, f = self.hidden_size, self.ffn_size
        shapes = {"embed.tokens": (self.vocab_size, h), "embed.positions": (self.max_positions, h),
                  "embed.token_types": (self.type_vocab_size, h), "embed.ln.weight": (h,),
                  "embed.ln.bias": (h,)}
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update(encoder_layer_shapes(p, h, f))
        if self.pooler:
            shapes.update({"pooler.weight": (h, h), "pooler.bias": (h,)})
        return shapes


class EncoderOutput(NamedTuple):
    """``last_hidden_state [B, L, H]`` and ``pooler_output [B, H]`` (None without a pooler)."""

    last_hidden_state: Tensor
    pooler_output: Optional[Tensor]


class BertEngine:
    """The encoder forward over a :class:`BertSpec`'s tensors, eager or graph-replayed."""

    def __init__(self, spec: BertSpec, tensors: Dict[str, Tensor], *, use_cuda_graph: bool = True,
                 where: str = "tensors"):
        checkpoint.check_tensors(spec.tensor_shapes(), tensors, where)
        self.spec, self.t = spec, tensors
        eps = spec.layer_norm_eps
        self.embed_ln = norm(tensors, "embed.ln", eps)
        self.layers = [EncoderLayer.of(tensors, f"layers.{i}.", eps) for i in range(spec.num_layers)]
        self.device = tensors["embed.tokens"].device
        prepare_dispatch(self.device)
        self.use_cuda_graph = use_cuda_graph and graphs_available(self.device)
        self._graphs: Dict[Tuple[int, int, bool], "_ForwardGraph"] = {}

    def forward(self, ids: Tensor, types: Tensor, padding: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """``ids``/``types`` ``[R, L]``, ``padding`` ``[R, L]`` bool (True = padding) or None.
        Returns ``(hidden [R, L, H], pooled [R, H] or None)``."""
        t = self.t
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = F.embedding(ids, t["embed.tokens"]) + F.embedding(types, t["embed.token_types"])
        x = layer_norm(x + F.embedding(positions, t["embed.positions"]), self.embed_ln)
        for layer in self.layers:
            x = encoder_layer(x, layer, self.spec.num_heads, self.spec.activation, padding)
        pooled = None
        if self.spec.pooler:
            pooled = torch.tanh(F.linear(x[:, 0], t["pooler.weight"], t["pooler.bias"]))
        return x, pooled

    def run(self, ids: Tensor, types: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Forward of a validated batch (``mask`` None: no padding); on CUDA through the
        bucket's graph, outputs copied out of its static buffers."""
        rows, length = ids.shape
        if not self.use_cuda_graph:
            return self.forward(ids, types, None if mask is None else ~mask)
        padded_rows = bucket(rows)
        padded_length = min(bucket(length, 16), self.spec.max_positions)
        masked = mask is not None or padded_length != length
        graph = self._graphs.get((padded_rows, padded_length, masked))
        if graph is None:
            graph = self._graphs[(padded_rows, padded_length, masked)] = \
                _ForwardGraph(self, padded_rows, padded_length, masked)
        graph.ids.zero_()
        graph.types.zero_()
        graph.ids[:rows, :length].copy_(ids)
        graph.types[:rows, :length].copy_(types)
        if masked:
            graph.padding.fill_(True)
            graph.padding[rows:] = False  # filler rows attend to themselves; their output is dropped
            graph.padding[:rows, :length] = False if mask is None else ~mask
        hidden, pooled = graph.call()
        return hidden[:rows, :length].clone(), None if pooled is None else pooled[:rows].clone()


class _ForwardGraph:
    def __init__(self, engine: BertEngine, rows: int, length: int, masked: bool):
        device = engine.device
        self.ids = torch.zeros(rows, length, dtype=torch.int64, device=device)
        self.types = torch.zeros(rows, length, dtype=torch.int64, device=device)
        self.padding = torch.zeros(rows, length, dtype=torch.bool, device=device) if masked else None
        self.call = CapturedCall(lambda: engine.forward(self.ids, self.types, self.padding), device)


class Bert:
    """Three-line BERT inference: ``fi.Bert(path, max_batch_size=8).infer(ids)``.

    Args:
        path: a directory written by ``fastpatch.export`` from a ``BertModel`` (or ``BertFor...``).
        max_batch_size: most rows per call (more raise ``ValueError``).
        device: default CUDA when available, else CPU.
        dtype: cast the weights (e.g. ``torch.float16``); default as exported.
        use_cuda_graph: replay captured forwards on CUDA (False: eager, for debugging).
    """

    def __init__(self, path, max_batch_size: int = 8, *, device=None, dtype: Optional[torch.dtype] = None,
                 use_cuda_graph: bool = True):
        model, tensors, _ = checkpoint.load(path, ARCHITECTURE, device=device, dtype=dtype)
        self._setup(BertSpec.from_dict(model), tensors, max_batch_size, use_cuda_graph, str(path))

    @classmethod
    def from_hf(cls, model, max_batch_size: int = 8, *, use_cuda_graph: bool = True) -> "Bert":
        """An engine over a live ``transformers`` BERT model (q/k/v concatenated once: a copy)."""
        from .hf_models import bert_tensors

        spec, tensors = bert_tensors(model)
        self = cls.__new__(cls)
        self._setup(spec, tensors, max_batch_size, use_cuda_graph, type(model).__name__)
        return self

    def _setup(self, spec: BertSpec, tensors, max_batch_size: int, use_cuda_graph: bool, where: str):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.spec, self.max_batch_size = spec, max_batch_size
        self.engine = BertEngine(spec, tensors, use_cuda_graph=use_cuda_graph, where=where)
        self.device = self.engine.device

    def infer(self, input_ids, attention_mask=None, token_type_ids=None) -> EncoderOutput:
        """Encode ``input_ids [B, L]`` (tensor or rectangular list; ``attention_mask`` 0 = padding,
        any side). Returns the last hidden states ``[B, L, H]`` and the pooled ``[B, H]``."""
        # one call at a time: the graphs' static inputs are the engine's (see exclusive)
        with guard_of(self).hold(), torch.inference_mode():
            batch = token_batch(input_ids, attention_mask, vocab_size=self.spec.vocab_size,
                                max_batch_size=self.max_batch_size, device=self.device,
                                type_ids=token_type_ids, type_vocab_size=self.spec.type_vocab_size,
                                left_align=False)
            if batch.ids.shape[1] > self.spec.max_positions:
                raise ValueError(f"input_ids has {batch.ids.shape[1]} tokens per row, more than the "
                                 f"model's {self.spec.max_positions} positions")
            types = torch.zeros_like(batch.ids) if batch.types is None else batch.types
            return EncoderOutput(*self.engine.run(batch.ids, types, batch.mask if batch.padded else None))
