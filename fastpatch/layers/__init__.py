"""Framework-agnostic fused layers, configured by :class:`LayerConfig`.

Adapters (Hugging Face, fairseq, DeepSpeed) build these from a model's layers through a
:class:`WeightMap` and swap them in; ``fastpatch.training`` wraps them in LightSeq's names.
"""
from .config import EmbeddingConfig, LayerConfig
from .decoder_layer import TransformerDecoderLayer
from .embedding import TransformerEmbedding
from .encoder_layer import TransformerEncoderLayer
from .kv_cache import KVCache, StaticKVCache
from .loss import LabelSmoothedCrossEntropy, LinearCrossEntropy
from .weight_map import (CONCAT, IDENTITY, TRANSPOSE, Concat, Entry, Identity, Transform,
                         Transpose, WeightMap, fairseq_layer_map, hf_bert_layer_map,
                         hf_gpt2_block_map)

__all__ = [
    "LayerConfig", "EmbeddingConfig",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "KVCache", "StaticKVCache",
    "TransformerEmbedding", "LabelSmoothedCrossEntropy", "LinearCrossEntropy",
    "WeightMap", "Entry", "Transform", "Identity", "Concat", "Transpose",
    "IDENTITY", "CONCAT", "TRANSPOSE",
    "fairseq_layer_map", "hf_bert_layer_map", "hf_gpt2_block_map",
]
