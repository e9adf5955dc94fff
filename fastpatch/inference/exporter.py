"""``fastpatch.export(model, path)``: a live model -> a self-contained inference file set."""
from __future__ import annotations

import os
import sys

from torch import nn

from . import checkpoint


def export(model: nn.Module, path, **generation) -> str:
    """Write ``model`` as ``path/model.safetensors`` + ``path/config.json`` for ``fastpatch.inference``.

    Supported: Hugging Face GPT-2 (``GPT2LMHeadModel``/``GPT2Model``, read by ``fi.Gpt``), BERT
    (``BertModel`` or a ``BertFor...`` model's encoder, read by ``fi.Bert``), BART
    (``BartForConditionalGeneration``, read by ``fi.Transformer``) and fairseq's
    ``TransformerModel`` (read by ``fi.Transformer``; decoding defaults those of
    ``fairseq-generate``: beam 5, 1 to 200 tokens, its EOS and pad ids), vanilla or accelerated
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
    if _is_fairseq_transformer(model):
        _export_fairseq(model, path, source, generation)
        return path
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
        raise TypeError(f"fastpatch.export supports Hugging Face GPT-2, BERT and BART models and "
                        f"fairseq's TransformerModel; got {type(model).__name__}")
    return path


def _is_fairseq_transformer(model: nn.Module) -> bool:
    if "fairseq" not in sys.modules:  # a fairseq model cannot exist without it
        return False
    from fairseq.models.transformer import TransformerModelBase

    return isinstance(model, TransformerModelBase)


def _export_fairseq(model, path, source: str, generation: dict) -> None:
    from fastpatch.integrations.fairseq.engine import engine_tensors

    from .options import GenerationOptions

    spec, tensors = engine_tensors(model)
    dictionary = model.decoder.dictionary
    # fairseq-generate's defaults (--min-len 1 bars EOS as the first token)
    options = GenerationOptions(max_new_tokens=200, min_new_tokens=1, num_beams=5, early_stopping=True,
                                eos_token_id=(dictionary.eos(),), pad_token_id=dictionary.pad())
    checkpoint.check_tensors(spec.tensor_shapes(), tensors, source)
    checkpoint.save(path, "transformer", spec.to_dict(), options.replace(**generation).to_dict(),
                    tensors, source)
