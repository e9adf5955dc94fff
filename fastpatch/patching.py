"""``accelerate`` / ``revert`` / ``report``: walk a model and swap in fused layers in place."""
from __future__ import annotations

import logging
import re
import sys
from typing import Optional

import torch
from torch import nn

from .adapters import available_adapters, first_match, is_accelerated, revert_module
from .ops._dispatch import prepare_dispatch
from .report import AccelerationReport, UnsupportedModelError

logger = logging.getLogger("fastpatch")

_REPORT_ATTR = "_fastpatch_report"
_WRAPPERS = ("DeepSpeedEngine", "DistributedDataParallel", "DataParallel")
# Classes that look like a transformer layer; one with no adapter is reported, not ignored.
_LAYER_LIKE = re.compile(r"(EncoderLayer|DecoderLayer|TransformerLayer|Layer|Block)$")


def _unwrap(model: nn.Module, report: AccelerationReport) -> nn.Module:
    """The module holding the layers: DeepSpeed engines and DDP wrap it as ``.module``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        kind = type(model).__name__
        # by name (no framework import); subclasses such as DeepSpeed's PipelineEngine count too
        wrapper = {c.__name__ for c in type(model).__mro__} & set(_WRAPPERS)
        if wrapper and hasattr(model, "module"):
            report.notes.append(f"walked {kind}.module")
            model = model.module
    if type(model).__name__.startswith("Peft"):
        report.notes.append("PEFT-wrapped models are not supported yet: layers with LoRA adapters "
                            "are reported as skipped")
    return model


def accelerate(model: nn.Module, *, strict: bool = False, training: Optional[bool] = None,
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every layer of ``model`` that fastpatch supports by its fused version.

    Parameters are shared, not copied: ``state_dict()`` keeps its keys, an optimizer built
    before still holds the right tensors (building it after is still the documented order).

    Args:
        model: a Hugging Face, fairseq or plain PyTorch model (DDP / DeepSpeed engines are walked).
        strict: raise :class:`UnsupportedModelError` if any layer-like module is left alone.
        training: call ``model.train(training)`` first (None leaves the mode as it is).
        dtype: convert the model to this dtype first (e.g. ``torch.bfloat16``).

    Returns:
        ``model`` itself; ``fastpatch.report(model)`` tells what was replaced and skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        model.to(dtype)
    if training is not None:
        model.train(bool(training))
    report = AccelerationReport(model_class=type(model).__name__)
    root = _unwrap(model, report)
    adapters = available_adapters()
    if not adapters:
        report.notes.append("no framework adapter is active (import transformers or fairseq before "
                            "calling accelerate)")
    claimed = []  # paths of accelerated (or refused) layers: their children are not walked
    for path, module in root.named_modules():
        if any(path.startswith(prefix + ".") for prefix in claimed):
            continue
        if is_accelerated(module) and not getattr(type(module), "_fastpatch_routing_only", False):
            report.replaced[path] = type(module).__name__
            claimed.append(path)
            continue
        adapter = first_match(adapters, module)
        if adapter is None:
            if _LAYER_LIKE.search(type(module).__name__) and path and _is_transformer_like(module):
                report.skipped[path] = f"no fastpatch adapter for {type(module).__qualname__}"
                claimed.append(path)
            continue
        claimed.append(path)
        reason = adapter.unsupported_reason(module, path)
        if reason is not None:
            report.skipped[path] = reason
            continue
        adapter.accelerate(module)
        report.replaced[path] = type(module).__name__
    _route_generate(root, report)
    _route_encoder_forward(root, report)
    _fuse_loss(root, report)
    if report.replaced:
        parameter = next(root.parameters(), None)
        prepare_dispatch(parameter.device if parameter is not None else torch.device("cpu"))
    setattr(model, _REPORT_ATTR, report)
    if root is not model:
        setattr(root, _REPORT_ATTR, report)
    logger.info(report.summary())
    if strict and (report.skipped or not report.replaced):
        raise UnsupportedModelError(report)
    return model


def _route_generate(root: nn.Module, report: AccelerationReport) -> None:
    """Send ``generate()`` of a fully accelerated GPT-2 or BART LM through the decoding engine.

    Calls the engine does not implement keep Hugging Face's loop; each call logs which ran.
    """
    if not report.replaced or report.skipped:
        return
    from .inference.hf import ENGINE_MODELS, enable_generate

    if type(root).__name__ not in ENGINE_MODELS or is_accelerated(root):
        return

    enable_generate(root)
    report.notes.append("generate() runs the fastpatch decoding engine where the call allows "
                        "(greedy, sampling, beam search), else Hugging Face's loop (logged)")


def _route_encoder_forward(root: nn.Module, report: AccelerationReport) -> None:
    """Replay the encoder engine's CUDA graphs for inference forwards of BERT encoders whose
    every layer was replaced (see :mod:`fastpatch.inference.hf_encoder`)."""
    from .inference.hf_encoder import ENGINE_ENCODERS, enable_encoder_forward, routable

    routed = []
    for path, module in root.named_modules():
        if type(module).__name__ not in ENGINE_ENCODERS or is_accelerated(module):
            continue
        layers = getattr(getattr(module, "encoder", None), "layer", None)
        if not layers or not all(is_accelerated(layer) for layer in layers) or not routable(module):
            continue
        enable_encoder_forward(module)
        routed.append(path or type(module).__name__)
    if routed:
        report.notes.append(
            f"inference forwards of {', '.join(routed)} (eval, no autograd, CUDA) replay the "
            "encoder engine's CUDA graphs; other calls run the fused layers (logged at DEBUG)")


def _fuse_loss(root: nn.Module, report: AccelerationReport) -> None:
    """Compute a Hugging Face LM head's loss with the fused cross-entropy (same semantics)."""
    if not report.replaced or "transformers" not in sys.modules:
        return
    from fastpatch.integrations.huggingface.loss import fuse_lm_loss

    note = fuse_lm_loss(root)
    if note is not None:
        report.notes.append(note)


def _is_transformer_like(module: nn.Module) -> bool:
    """A layer worth reporting: it owns attention-like children and has parameters."""
    names = " ".join(n.lower() for n, _ in module.named_children())
    return any(k in names for k in ("attn", "attention")) and any(True for _ in module.parameters())


def revert(model: nn.Module) -> nn.Module:
    """Give every accelerated module its original class back; weights are the current ones."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    unfuse_loss = None
    if "transformers" in sys.modules:
        from fastpatch.integrations.huggingface.loss import unfuse_lm_loss as unfuse_loss
    for module in model.modules():
        if is_accelerated(module):
            revert_module(module)
        if unfuse_loss is not None:
            unfuse_loss(module)
    for module in (model, getattr(model, "module", None)):
        if module is not None:
            module.__dict__.pop(_REPORT_ATTR, None)
    return model


def report(model: nn.Module) -> AccelerationReport:
    """The report of the last ``accelerate(model)``; an empty one if it was never accelerated."""
    found = getattr(model, _REPORT_ATTR, None)
    return found if found is not None else AccelerationReport(model_class=type(model).__name__)
