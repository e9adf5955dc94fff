"""``fastpatch.export_onnx(model, path)``: an (accelerated) encoder or GPT-2 as a standard ONNX file.

The fused layers run ``fastpatch::*`` custom ops, which ONNX runtimes do not know. Every
accelerated layer is a subclass of its original class over the same parameters, and the
original ``forward`` computes the same function with standard PyTorch ops (that is what the
parity tests check). So the export swaps each accelerated layer back to its original class for
the duration of the trace and restores it afterwards: the file holds only standard ONNX ops
(LayerNormalization, MatMul, Softmax...), which ONNX Runtime then fuses for its own kernels.

The graph is the model's plain forward (no KV cache inputs): ``input_ids``, ``attention_mask``
(and ``token_type_ids`` for BERT-style models) with dynamic batch and sequence axes, and the
model's main outputs (``logits``, or ``last_hidden_state`` and ``pooler_output``).
"""
from __future__ import annotations

import contextlib
import os
from typing import List

import torch
from torch import nn

from ..adapters import is_accelerated

_GPT = ("GPT2LMHeadModel", "GPT2Model")


@contextlib.contextmanager
def _original_layers(model: nn.Module):
    """Accelerated modules of ``model`` wear their original class inside the block."""
    swapped = [(m, type(m)) for m in model.modules() if is_accelerated(m)]
    for module, fused in swapped:
        module.__class__ = fused._fastpatch_original_class
    try:
        yield
    finally:
        for module, fused in swapped:
            module.__class__ = fused


class _Forward(nn.Module):
    """The model's inputs in, a flat tuple of the chosen output fields out."""

    def __init__(self, model: nn.Module, outputs: List[str]):
        super().__init__()
        self.model, self.outputs = model, outputs
        self.extra = {"use_cache": False} if is_gpt(model) else {}  # no KV cache in the graph

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **types, **self.extra)
        return tuple(out[name] for name in self.outputs)


def is_gpt(model: nn.Module) -> bool:
    cls = type(model)
    name = cls._fastpatch_original_class.__name__ if is_accelerated(model) else cls.__name__
    return name in _GPT


def export_onnx(model: nn.Module, path, *, opset_version: int = 18, example_batch: int = 2,
                example_length: int = 8) -> str:
    """Write ``model``'s forward to the ONNX file ``path`` with standard ops only.

    Supported: Hugging Face GPT-2 and BERT-style encoders (BERT, RoBERTa... with or without a
    task head), vanilla or accelerated. Needs the ``onnx`` and ``onnxscript`` packages (the
    ``fastpatch[onnx]`` extra); the model is traced on its own device and dtype.

    Args:
        path: the ``.onnx`` file to write (weights inside it).
        opset_version: ONNX opset (18 has LayerNormalization and the attention building blocks).
        example_batch, example_length: shape of the example inputs that are traced; both axes
            are exported as dynamic.

    Returns:
        ``path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise TypeError(f"export_onnx supports Hugging Face GPT-2 and BERT-style models; got {type(model).__name__}")
    device = next(model.parameters()).device
    shape = (example_batch, example_length)
    ids = torch.randint(0, config.vocab_size, shape, device=device)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not is_gpt(model) and getattr(config, "type_vocab_size", 0):
        example["token_type_ids"] = torch.zeros_like(ids)
    was_training = model.training
    model.eval()
    try:
        with _original_layers(model), torch.no_grad():
            wrapper = _Forward(model, []).eval()
            sample = model(**example, **wrapper.extra)
            outputs = [name for name in ("logits", "last_hidden_state", "pooler_output")
                       if getattr(sample, name, None) is not None]
            wrapper.outputs = ["logits"] if "logits" in outputs else outputs
            batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(wrapper, (), str(path), kwargs=example, dynamo=True,
                              opset_version=opset_version, input_names=list(example),
                              output_names=wrapper.outputs,
                              dynamic_shapes={name: {0: batch, 1: length} for name in example},
                              external_data=False, verbose=False)
    finally:
        model.train(was_training)
    return path
