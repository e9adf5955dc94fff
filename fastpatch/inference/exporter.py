"""``fastpatch.export(model, path)``: a live model -> a self-contained inference file set."""
from __future__ import annotations

import os

from torch import nn

from . import checkpoint


def export(model: nn.Module, path, **generation) -> str:
    """Write ``model`` as ``path/model.safetensors`` + ``path/config.json`` for ``fastpatch.inference``.

    Supported: Hugging Face GPT-2 (``GPT2LMHeadModel``/``GPT2Model``, read by ``fi.Gpt``), BERT
    (``BertModel`` or a ``BertFor...`` model's encoder, read by ``fi.Bert``) and BART
    (``BartForConditionalGeneration``, read by ``fi.Transformer``), vanilla or accelerated
    (``fastpatch.accelerate`` keeps the parameters). Weights keep the model's dtype.

    Args:
        path: output directory (created; existing files of the set are overwritten).
        **generation: decoding defaults stored with a generative model (any
            ``fi.GenerationOptions`` field, e.g. ``max_new_tokens=64, do_sample=True``); they
            override the model's ``generation_config``.

    Returns:
        ``path``.
    """
    from .hf_models import bart_tensors, bert_tensors, gpt2_tensors

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    source = f"{type(model).__module__}.{type(model).__name__}"
    kind = type(getattr(model, "transformer", getattr(model, "bert", model))).__name__
    generative = {"GPT2Model": ("gpt", gpt2_tensors), "BartModel": ("transformer", bart_tensors)}
    if type(model).__name__ == "BartForConditionalGeneration":
        kind = type(model.model).__name__
    if kind in generative:
        architecture, to_tensors = generative[kind]
        spec, tensors, options = to_tensors(model)
        checkpoint.check_tensors(spec.tensor_shapes(), tensors, source)
        checkpoint.save(path, architecture, spec.to_dict(), options.replace(**generation).to_dict(),
                        tensors, source)
    elif kind == "BertModel":
        if generation:
            raise ValueError(f"decoding options {sorted(generation)} given for an encoder-only model")
        spec, tensors = bert_tensors(model)
        checkpoint.check_tensors(spec.tensor_shapes(), tensors, source)
        checkpoint.save(path, "bert", spec.to_dict(), {}, tensors, source)
    else:
        raise TypeError(f"fastpatch.export supports Hugging Face GPT-2, BERT and BART models; got "
                        f"{type(model).__name__}")
    return path
