"""fastpatch: drop-in fused CUDA layers for Hugging Face, Fairseq and DeepSpeed transformers.

``import fastpatch`` imports torch only; frameworks and the CUDA extension load on first use.
"""
__version__ = "0.1.0"
