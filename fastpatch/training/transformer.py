"""``LSTransformer``: LightSeq's full encoder-decoder, on the fused layers, with generation."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..inference.exclusive import guard_of
from ..layers import KVCache, TransformerDecoderLayer
from . import generation
from .config import LSConfig, _require, get_config
from .layers import (LSTransformerDecoderLayer, LSTransformerEmbeddingLayer,
                     LSTransformerEncoderLayer, padding_mask)


class LSTransformerEncoder(nn.Module):
    """Embedding, encoder layers, final LayerNorm (LightSeq applies it in pre- and post-LN)."""

    def __init__(self, config: LSConfig, embed_tokens: LSTransformerEmbeddingLayer):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.padding_idx = config.padding_idx
        self.layers = nn.ModuleList(LSTransformerEncoderLayer(config)
                                    for _ in range(config.num_encoder_layer))
        self.num_layers = len(self.layers)
        self.layer_norm = nn.LayerNorm(embed_tokens.config.hidden_size, eps=config.layer_norm_eps)

    def encode(self, src_tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """``src_tokens [B, S]`` -> batch-first ``([B, S, H], padding mask [B, S])``."""
        mask = src_tokens.eq(self.padding_idx)
        x = self.embed_tokens(src_tokens)
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x), mask

    def forward(self, src_tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """LightSeq's convention: returns ``(encoder_out [S, B, H], padding mask [B, S])``."""
        x, mask = self.encode(src_tokens)
        return x.transpose(0, 1), mask


class LSTransformerDecoder(nn.Module):
    """Embedding, decoder layers, final LayerNorm, output projection tied to the embedding."""

    def __init__(self, config: LSConfig, embed_tokens: LSTransformerEmbeddingLayer):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.padding_idx = config.padding_idx
        self.layers = nn.ModuleList(LSTransformerDecoderLayer(config)
                                    for _ in range(config.num_decoder_layer))
        self.num_layers = len(self.layers)
        vocab, dim = embed_tokens.embeddings.shape
        self.layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.output_projection = nn.Linear(dim, vocab, bias=False)
        self.output_projection.weight = embed_tokens.embeddings

    def forward(self, trg_tokens: Tensor, encoder_out: Tensor, encoder_padding_mask: Tensor,
                cache: Optional[Dict] = None) -> Tensor:
        """LightSeq's convention: ``encoder_out`` is ``[S, B, H]``; returns logits ``[B, T, V]``.

        With ``cache`` (a dict, ``{}`` at the first step) ``trg_tokens`` is the whole prefix so
        far and only its last token is run, at position ``T - 1``; the dict collects one cache
        dict per layer (see :class:`LSTransformerDecoderLayer`).
        """
        step = 0
        if cache is not None:
            step = trg_tokens.shape[1] - 1
            trg_tokens = trg_tokens[:, -1:]
            if not cache:
                cache.update({i: {} for i in range(self.num_layers)})
        x = self.embed_tokens(trg_tokens, step)
        for i, layer in enumerate(self.layers):
            x = layer(x, encoder_out, encoder_padding_mask, None if cache is None else cache[i])
        return self.output_projection(self.layer_norm(x))

    @staticmethod
    def reorder_cache(cache: Dict, order: Tensor) -> None:
        """Keeps rows ``order`` of every tensor of a LightSeq-style cache (beam search)."""
        for layer_cache in cache.values():
            for key, value in layer_cache.items():
                if value is not None:
                    layer_cache[key] = value.index_select(0, order)

    def decode(self, tokens: Tensor, encoder_out: Tensor, encoder_padding_mask: Tensor,
               caches: Optional[List[KVCache]] = None, step: int = 0) -> Tensor:
        """Batch-first decoding for generation: ``tokens [B, L]`` starting at position ``step``,
        ``encoder_out [B, S, H]``, one :class:`KVCache` per layer (or None); logits ``[B, L, V]``."""
        x = self.embed_tokens(tokens, step)
        for i, layer in enumerate(self.layers):
            # the fused layer's own (batch-first) forward, not LightSeq's wrapper
            x = TransformerDecoderLayer.forward(layer, x, encoder_out,
                                                padding_mask(encoder_padding_mask),
                                                cache=None if caches is None else caches[i])
        return self.output_projection(self.layer_norm(x))


class LSTransformer(nn.Module):
    """LightSeq's ``LSTransformer``: ``forward(src_tokens, trg_tokens) -> logits [B, T, V]``,
    trained with :class:`LSCrossEntropyLayer` and :class:`LSAdam`; :meth:`generate` decodes
    greedily or with beam search.

    Config fields used: ``vocab_size``, ``padding_idx``, ``num_encoder_layer``,
    ``num_decoder_layer`` and the layer fields (see ``get_config``). Encoder and decoder have
    separate embeddings; the decoder's is tied to the output projection.
    """

    get_config = staticmethod(get_config)

    def __init__(self, config: LSConfig):
        super().__init__()
        if not isinstance(config, LSConfig):
            raise TypeError(f"config must come from get_config, got {type(config).__name__}")
        _require(config, "vocab_size", "padding_idx", "num_encoder_layer", "num_decoder_layer")
        self.config = config
        self.encoder = LSTransformerEncoder(config, LSTransformerEmbeddingLayer(config))
        self.decoder = LSTransformerDecoder(config, LSTransformerEmbeddingLayer(config))

    def forward(self, src_tokens: Tensor, trg_tokens: Tensor) -> Tensor:
        encoder_out, encoder_padding_mask = self.encoder(src_tokens)
        return self.decoder(trg_tokens, encoder_out, encoder_padding_mask)

    @torch.no_grad()
    def generate(self, src_tokens: Tensor, eos_idx: int, *, bos_idx: Optional[int] = None,
                 beam_size: int = 1, max_len: int = 200, length_penalty: float = 1.0,
                 nbest: int = 1, use_engine: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
        """Translates ``src_tokens [B, S]`` (padded with ``padding_idx``).

        Args:
            eos_idx: end-of-sentence token; ``bos_idx`` (default ``eos_idx``, fairseq's
                convention) starts every target.
            beam_size: 1 = greedy; otherwise beam search (see ``generation.beam_search``).
            max_len: most tokens generated per sentence (EOS included).
            length_penalty: beam scores are ``sum log p / length ** length_penalty``.
            nbest: hypotheses returned per sentence (beam search only).
            use_engine: decode on ``fastpatch.inference``'s encoder-decoder engine (the encoder
                once, cached cross-attention keys/values, CUDA-graph decoder steps; see
                ``fastpatch.training.engine``). None (default): where its graphs run (parameters
                on CUDA, kernels built) and it supports the model, else the fused layers, the
                reason logged at INFO on the ``fastpatch`` logger. True: always (eagerly on the
                CPU), ``ValueError`` if it cannot honour the model. False: the fused layers. The
                search is the same code either way; the engine is kept on the model between
                calls and rebuilt when the parameters are replaced, moved or cast.

        Returns:
            ``(tokens [B, T], scores [B])``: the best hypothesis per sentence, without BOS, ended
            by EOS (unless greedy ran out of ``max_len``), padded with ``padding_idx``; greedy
            scores are summed log-probabilities, beam scores length-normalised. With
            ``nbest > 1``: ``(tokens [B, nbest, T], scores [B, nbest])``, best first.
        """
        bos_idx = eos_idx if bos_idx is None else bos_idx
        # one call at a time: the engine's caches (and the train/eval flag) are the model's
        with guard_of(self).hold():
            was_training = self.training
            self.eval()
            try:
                if beam_size == 1 and nbest == 1:
                    return generation.greedy_search(self, src_tokens, eos_idx=eos_idx,
                                                    bos_idx=bos_idx, max_len=max_len,
                                                    use_engine=use_engine)
                return generation.beam_search(self, src_tokens, beam_size=beam_size, eos_idx=eos_idx,
                                              bos_idx=bos_idx, max_len=max_len,
                                              length_penalty=length_penalty, nbest=nbest,
                                              use_engine=use_engine)
            finally:
                self.train(was_training)
