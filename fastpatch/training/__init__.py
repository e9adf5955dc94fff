"""LightSeq-compatible training API: switch from LightSeq by changing the import.

    from fastpatch.training import (LSTransformer, LSTransformerEmbeddingLayer,
                                    LSTransformerEncoderLayer, LSTransformerDecoderLayer,
                                    LSCrossEntropyLayer, LSAdam)

The modules keep LightSeq's constructors, ``get_config`` argument names and forward signatures
(see ``config.py`` for the few deliberate differences) and run on fastpatch's fused layers:
ordinary named parameters, no length or batch caps, exact GELU unless told otherwise.
"""
from .config import MODEL_ARCH, LSConfig, get_config
from .layers import (LSCrossEntropyLayer, LSTransformerDecoderLayer, LSTransformerEmbeddingLayer,
                     LSTransformerEncoderLayer)
from .optim import LSAdam
from .transformer import LSTransformer, LSTransformerDecoder, LSTransformerEncoder

__all__ = [
    "get_config", "LSConfig", "MODEL_ARCH",
    "LSTransformer", "LSTransformerEncoder", "LSTransformerDecoder",
    "LSTransformerEncoderLayer", "LSTransformerDecoderLayer", "LSTransformerEmbeddingLayer",
    "LSCrossEntropyLayer", "LSAdam",
]
