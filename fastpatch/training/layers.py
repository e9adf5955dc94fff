"""LightSeq's module names and forward conventions over fastpatch's fused layers.

Each class is the fused module plus LightSeq's calling convention; the parameters are the fused
module's ordinary named parameters (LightSeq kept each layer in one flat ``para`` buffer).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layers import (CONCAT, Entry, KVCache, LabelSmoothedCrossEntropy, TransformerDecoderLayer,
                      TransformerEmbedding, TransformerEncoderLayer, WeightMap)
from .config import LSConfig, embedding_config, get_config, layer_config


def padding_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """LightSeq's padding mask (1/True = padding; bool, int or float such as HF's additive mask
    divided by -10000) as the bool mask the fused layers take."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


def _initial_weights_map(weight_targets: Sequence, bias_targets: Sequence) -> WeightMap:
    """A map from LightSeq's ``initial_weights``/``initial_biases`` lists (sources ``w0``...,
    ``b0``...) to fused names; a tuple target takes that many consecutive tensors, stacked."""
    entries = []
    for prefix, targets in (("w", weight_targets), ("b", bias_targets)):
        index = 0
        for target in targets:
            count = 3 if target.startswith("qkv") else 2 if target.startswith("cross_kv") else 1
            sources = tuple(f"{prefix}{index + i}" for i in range(count))
            entries.append(Entry(target, sources, CONCAT) if count > 1 else Entry(target, sources))
            index += count
    return WeightMap(entries)


def _load_initial(layer, weight_targets, bias_targets, weights, biases) -> None:
    if (weights is None) != (biases is None):
        raise ValueError("initial_weights and initial_biases must be given together")
    if weights is None:
        return
    wmap = _initial_weights_map(weight_targets, bias_targets)
    expected = sum(1 for s in wmap.source_keys if s.startswith("w"))
    if len(weights) != expected or len(biases) != expected:
        raise ValueError(f"initial_weights and initial_biases must have {expected} tensors each, "
                         f"got {len(weights)} and {len(biases)}")
    state = {f"w{i}": w for i, w in enumerate(weights)}
    state.update({f"b{i}": b for i, b in enumerate(biases)})
    wmap.load_into(layer, state)


_ENCODER_WEIGHTS = ("qkv_weight", "attn_out_weight", "attn_norm_weight", "fc1_weight",
                    "fc2_weight", "ffn_norm_weight")
_DECODER_WEIGHTS = ("qkv_weight", "attn_out_weight", "attn_norm_weight", "cross_q_weight",
                    "cross_out_weight", "cross_norm_weight", "fc1_weight", "fc2_weight",
                    "ffn_norm_weight", "cross_kv_weight")


def _biases(names):
    return tuple(n.replace("weight", "bias") for n in names)


class LSTransformerEncoderLayer(TransformerEncoderLayer):
    """LightSeq's encoder layer: ``forward(hidden_states [B, L, H], encoder_padding_mask [B, L])``
    with 1/True marking padding.

    ``initial_weights``/``initial_biases`` take LightSeq's lists: q, k, v, attention output,
    attention LayerNorm, FFN in, FFN out, FFN LayerNorm (weights and biases respectively).
    """

    get_config = staticmethod(get_config)

    def __init__(self, config: LSConfig, initial_weights: Optional[Sequence[Tensor]] = None,
                 initial_biases: Optional[Sequence[Tensor]] = None):
        super().__init__(layer_config(config))
        self.ls_config = config
        _load_initial(self, _ENCODER_WEIGHTS, _biases(_ENCODER_WEIGHTS), initial_weights,
                      initial_biases)

    def forward(self, hidden_states: Tensor, encoder_padding_mask: Optional[Tensor],
                **kwargs) -> Tensor:
        return super().forward(hidden_states, padding_mask(encoder_padding_mask))


class LSTransformerDecoderLayer(TransformerDecoderLayer):
    """LightSeq's decoder layer: ``forward(decoder_states [B, T, H], encoder_out [S, B, H]
    (sequence-first, as LightSeq), encoder_padding_mask [B, S], cache)``.

    ``cache`` is None (training: causal over ``decoder_states``) or a dict, empty at the first
    decoding step, that the layer fills with batch-first tensors: ``dec_self_k``/``dec_self_v``
    ``[B, heads, steps, head_dim]`` and ``encdec_k``/``encdec_v`` ``[B, heads, S, head_dim]``.
    For beam search reorder every tensor in it with ``index_select(0, order)``
    (:meth:`LSTransformerDecoder.reorder_cache` does).

    ``initial_weights``/``initial_biases``: q, k, v, self-attention output, its LayerNorm, cross
    q, cross output, cross LayerNorm, FFN in, FFN out, FFN LayerNorm, cross k, cross v. (LightSeq
    kept every layer's cross k/v in layer 0; here each layer owns its own.)
    """

    get_config = staticmethod(get_config)

    def __init__(self, config: LSConfig, initial_weights: Optional[Sequence[Tensor]] = None,
                 initial_biases: Optional[Sequence[Tensor]] = None):
        super().__init__(layer_config(config, decoder=True))
        self.ls_config = config
        _load_initial(self, _DECODER_WEIGHTS, _biases(_DECODER_WEIGHTS), initial_weights,
                      initial_biases)

    def forward(self, decoder_states: Tensor, encoder_out: Tensor,
                encoder_padding_mask: Optional[Tensor], cache: Optional[dict] = None,
                **kwargs) -> Tensor:
        if cache is not None and not isinstance(cache, dict):
            raise TypeError(f"cache must be a dict or None, got {type(cache).__name__}")
        kv = None
        if cache is not None:
            kv = KVCache()
            kv.key, kv.value = cache.get("dec_self_k"), cache.get("dec_self_v")
            kv.cross_key, kv.cross_value = cache.get("encdec_k"), cache.get("encdec_v")
        out = super().forward(decoder_states, encoder_out.transpose(0, 1),
                              padding_mask(encoder_padding_mask), cache=kv)
        if kv is not None:
            cache.update(dec_self_k=kv.key, dec_self_v=kv.value, encdec_k=kv.cross_key,
                         encdec_v=kv.cross_value)
        return out


class LSTransformerEmbeddingLayer(TransformerEmbedding):
    """LightSeq's embedding: ``forward(input [B, L], step=0)`` returns
    ``dropout(sqrt(dim) * embeddings[input] + sinusoid(position))`` where a token's position is
    the number of non-padding tokens before it plus ``step`` (the decoding step when one token
    is fed at a time). The table is the ``embeddings`` attribute, as in LightSeq."""

    get_config = staticmethod(get_config)

    def __init__(self, config: LSConfig, initial_embeddings: Optional[Tensor] = None):
        super().__init__(embedding_config(config))
        self.ls_config = config
        if initial_embeddings is not None:
            if tuple(initial_embeddings.shape) != tuple(self.token_weight.shape):
                raise ValueError(f"initial_embeddings must have shape "
                                 f"{tuple(self.token_weight.shape)}, got "
                                 f"{tuple(initial_embeddings.shape)}")
            with torch.no_grad():
                self.token_weight.copy_(initial_embeddings)

    @property
    def embeddings(self) -> torch.nn.Parameter:
        return self.token_weight

    def forward(self, input: Tensor, step: Optional[int] = 0, **kwargs) -> Tensor:
        step = 0 if step is None else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        real = input.ne(self.config.padding_idx)
        positions = torch.cumsum(real, dim=1) - real.to(torch.int64) + step
        return super().forward(input, position_ids=positions)


class LSCrossEntropyLayer(LabelSmoothedCrossEntropy):
    """LightSeq's loss: ``forward(inputs [B, L, V] logits, targets [B, L])`` returns the summed
    ``(loss, nll_loss)`` over non-padding targets, label-smoothed by ``config.epsilon`` with
    fairseq's formula."""

    get_config = staticmethod(get_config)

    def __init__(self, config: LSConfig):
        if not isinstance(config, LSConfig):
            raise TypeError(f"config must come from get_config, got {type(config).__name__}")
        if config.padding_idx is None:
            raise ValueError("config is missing padding_idx")
        super().__init__(epsilon=config.epsilon, ignore_index=config.padding_idx,
                         reduction="sum")
        self.ls_config = config

    def forward(self, inputs: Tensor, targets: Tensor, **kwargs):
        return super().forward(inputs, targets)
