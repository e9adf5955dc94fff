"""Hugging Face transformers adapters (BERT family, GPT-2, BART family)."""


def adapters():
    """The adapters for the transformers version installed (imported on demand)."""
    from .bart import BartDecoderLayerAdapter, BartEncoderLayerAdapter
    from .bert import BertLayerAdapter
    from .embeddings import TransformerEmbeddingsAdapter
    from .gpt2 import GPT2BlockAdapter

    return [BertLayerAdapter(), GPT2BlockAdapter(), BartEncoderLayerAdapter(),
            BartDecoderLayerAdapter(), TransformerEmbeddingsAdapter()]
