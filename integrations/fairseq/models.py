"""The ``ls_transformer`` model and an ``ls_<arch>`` twin of every ``transformer`` architecture.

``ls_transformer`` is fairseq's ``TransformerModel`` whose ``build_model`` ends with
``fastpatch.accelerate``: same modules, parameter names and initialisation, fused forward. The
``ls_*`` architectures set exactly the hyper-parameters of the architecture they are named after.

Checkpoints name the plain architecture: ``build_model`` records ``transformer_wmt_en_de`` (not
``ls_transformer_wmt_en_de``) in the model config it was given, which is the one fairseq saves.
So a checkpoint written under ``--arch ls_*`` is an ordinary ``transformer`` checkpoint that plain
``fairseq-generate`` loads without ``--user-dir``, and ``lightseq-generate`` accelerates it again.
"""
from __future__ import annotations

import logging

from fairseq.models import (ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY, ARCH_MODEL_REGISTRY,
                            register_model, register_model_architecture)
from fairseq.models.transformer import TransformerModel

import fastpatch

logger = logging.getLogger("fastpatch.fairseq")
PREFIX = "ls_"


def accelerate_model(model):
    """``fastpatch.accelerate`` with the report in fairseq's log; returns ``model``.

    A model accelerated already (an ``ls_transformer`` seen again by the commands' task hook)
    is left as it is."""
    if fastpatch.report(model).replaced:
        return model
    fastpatch.accelerate(model)
    report = fastpatch.report(model)
    logger.info("%s", report)
    if report.skipped:
        logger.warning("fastpatch left %d layer(s) unfused; see the report above",
                       len(report.skipped))
    return model


@register_model("ls_transformer")
class LSTransformerModel(TransformerModel):
    """fairseq's ``TransformerModel`` with fastpatch's fused layers (state dict unchanged)."""

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        arch = getattr(args, "arch", None)
        if isinstance(arch, str) and arch.startswith(PREFIX):
            # the checkpoint keeps fairseq's own architecture name (see the module docstring)
            args.arch = arch[len(PREFIX):]
            if getattr(args, "_name", None) == arch:
                args._name = args.arch
        return accelerate_model(model)


def _twin(arch_fn):
    def ls_arch(args):
        return arch_fn(args)

    ls_arch.__doc__ = f"The hyper-parameters of ``{arch_fn.__name__}``."
    return ls_arch


def register_architectures() -> None:
    """Registers ``ls_<name>`` for every architecture of ``transformer`` registered so far."""
    for name in list(ARCH_MODEL_INV_REGISTRY.get("transformer", ())):
        if PREFIX + name not in ARCH_MODEL_REGISTRY:
            register_model_architecture("ls_transformer", PREFIX + name)(
                _twin(ARCH_CONFIG_REGISTRY[name]))


register_architectures()
