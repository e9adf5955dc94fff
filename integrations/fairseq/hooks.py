"""Accelerating every model fairseq builds, for the ``lightseq-*`` commands, and (for
``lightseq-generate`` / ``lightseq-interactive``) decoding on fastpatch's engine.

fairseq builds models through ``FairseqTask.build_model`` (``LegacyFairseqTask.build_model`` for
argparse-era tasks); the commands wrap both so that a plain ``--arch transformer_*`` (and any
model with fairseq transformer layers) is accelerated when it is built, for training and when a
checkpoint is loaded for generation. The wrap is installed only inside the commands, never by
importing fastpatch: a process that did not ask for it keeps fairseq's behaviour.

The generation commands also wrap ``FairseqTask.build_generator``: a ``SequenceGenerator`` it
builds for a model the engine can serve decodes through :class:`.engine.EngineEnsemble` (fairseq's
search over the engine's graph-replayed steps). Training keeps fairseq's generator (``--eval-bleu``
generates with weights that change between validations).

Distributed training starts its workers with ``spawn``; they inherit :data:`ENV_FLAG`, and the
``--user-dir`` module they import installs the wrap again when the flag is set.
"""
from __future__ import annotations

import contextlib
import functools
import os

ENV_FLAG = "FASTPATCH_FAIRSEQ_ACCELERATE"
_ORIGINAL = "_fastpatch_original"


def _task_classes():
    from fairseq.tasks import FairseqTask, LegacyFairseqTask

    return (FairseqTask, LegacyFairseqTask)


def _wrap(build_model):
    @functools.wraps(build_model)
    def build_model_and_accelerate(self, *args, **kwargs):
        from .models import accelerate_model

        return accelerate_model(build_model(self, *args, **kwargs))

    setattr(build_model_and_accelerate, _ORIGINAL, build_model)
    return build_model_and_accelerate


def install() -> None:
    """Wraps the tasks' ``build_model`` (idempotent)."""
    for cls in _task_classes():
        if not hasattr(cls.build_model, _ORIGINAL):
            cls.build_model = _wrap(cls.build_model)


def remove() -> None:
    """Restores fairseq's ``build_model``."""
    for cls in _task_classes():
        original = getattr(cls.build_model, _ORIGINAL, None)
        if original is not None:
            cls.build_model = original


def install_if_requested() -> None:
    """:func:`install` when :data:`ENV_FLAG` is set (a worker of a ``lightseq-*`` command)."""
    if os.environ.get(ENV_FLAG) == "1":
        install()


@contextlib.contextmanager
def accelerate_built_models():
    """Within the block, every model a fairseq task builds is accelerated (workers included)."""
    previous = os.environ.get(ENV_FLAG)
    os.environ[ENV_FLAG] = "1"
    install()
    try:
        yield
    finally:
        remove()
        if previous is None:
            del os.environ[ENV_FLAG]
        else:
            os.environ[ENV_FLAG] = previous


def _wrap_build_generator(build_generator):
    @functools.wraps(build_generator)
    def build_generator_on_engine(self, models, *args, **kwargs):
        from .engine import attach

        generator = build_generator(self, models, *args, **kwargs)
        attach(generator, list(models))
        return generator

    setattr(build_generator_on_engine, _ORIGINAL, build_generator)
    return build_generator_on_engine


@contextlib.contextmanager
def generators_on_engine():
    """Within the block, the sequence generators fairseq's tasks build decode on the engine
    where it can serve them (see :func:`.engine.attach`, which logs the choice)."""
    from fairseq.tasks import FairseqTask

    original = FairseqTask.build_generator
    if hasattr(original, _ORIGINAL):  # already inside such a block
        yield
        return
    FairseqTask.build_generator = _wrap_build_generator(original)
    try:
        yield
    finally:
        FairseqTask.build_generator = original
