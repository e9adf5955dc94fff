"""fastpatch: drop-in fused CUDA layers for Hugging Face, Fairseq and DeepSpeed transformers.

    model = fastpatch.accelerate(model)     # in place; parameters and state_dict keys unchanged
    print(fastpatch.report(model))          # what was replaced, what was left alone and why
    fastpatch.revert(model)                 # original modules, current weights

``import fastpatch`` imports torch only; frameworks and the CUDA extension load on first use.
"""
from .patching import accelerate, report, revert
from .report import AccelerationReport, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["accelerate", "revert", "report", "AccelerationReport", "UnsupportedModelError",
           "export", "export_onnx", "__version__"]


def __getattr__(name):
    # the exporters live in fastpatch.inference, imported on first use (import stays torch-only)
    if name in ("export", "export_onnx"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'fastpatch' has no attribute {name!r}")
