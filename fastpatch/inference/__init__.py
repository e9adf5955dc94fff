"""Inference engine: graph-captured decoding, export and three-line inference.

    import fastpatch
    fastpatch.export(model, "gpt2-export")            # safetensors weights + config.json

    import fastpatch.inference as fi
    m = fi.Gpt("gpt2-export", max_batch_size=8)
    m.sample([[464, 3290, 318]], max_new_tokens=32)   # greedy unless the export / kwargs say otherwise
    fi.Bert("bert-export", max_batch_size=8).infer(ids)
    fi.Transformer("bart-export", max_batch_size=8).infer([[1, 2, 3], [4, 5, 6]])  # exported decoding

Nothing here imports transformers or fairseq: an exported model runs with torch and
safetensors only. ``fi.Gpt.from_hf(model)`` and :func:`enable_generate` work on live models.
"""
from .bert import Bert, EncoderOutput
from .exporter import export
from .generation import GenerationOutput
from .gpt import Gpt
from .hf import enable_generate
from .onnx_export import export_onnx
from .options import GenerationOptions
from .transformer import Transformer

__all__ = ["Gpt", "Bert", "Transformer", "EncoderOutput", "GenerationOptions", "GenerationOutput", "enable_generate",
           "export", "export_onnx"]
