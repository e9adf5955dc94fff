"""Hugging Face transformers adapters (BERT family, GPT-2)."""


def adapters():
    """The adapters for the transformers version installed (imported on demand)."""
    from .bert import BertLayerAdapter
    from .gpt2 import GPT2BlockAdapter

    return [BertLayerAdapter(), GPT2BlockAdapter()]
