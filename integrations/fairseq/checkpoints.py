"""Loading fairseq 0.12 checkpoints under torch >= 2.6 without turning safe loading off.

torch 2.6 made ``torch.load`` default to ``weights_only=True``, which refuses any pickled object
whose type is not allow-listed; fairseq 0.12 calls ``torch.load(f)`` and its checkpoints pickle:

* ``argparse.Namespace``: the model/task/criterion/optimizer config of argparse-era models
  (``transformer`` among them), and the whole ``args`` of checkpoints older than 0.10;
* numpy arrays and scalars: meter states in ``extra_state["metrics"]`` (e.g. the BLEU n-gram
  counts logged by ``--eval-bleu``), written as ``numpy.core.*`` by numpy 1 and
  ``numpy._core.*`` by numpy 2.

:func:`allow_fairseq_checkpoints` adds exactly these types to torch's allow-list; anything else
in a checkpoint is still refused with torch's own message.
"""
from __future__ import annotations

import argparse

import torch

_NUMPY_DTYPES = ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                 "Int16DType", "Int8DType", "UInt8DType", "BoolDType")


def _numpy_globals() -> list:
    try:
        import numpy as np
    except ImportError:  # no numpy: no numpy objects can be in a loadable checkpoint either
        return []
    core = np._core if hasattr(np, "_core") else np.core
    entries = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core.multiarray, name)
        # a checkpoint names the module it was written from, numpy 1 or 2
        entries += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        entries += [getattr(dtypes, name) for name in _NUMPY_DTYPES if hasattr(dtypes, name)]
    return entries


def fairseq_safe_globals() -> list:
    """The types fairseq 0.12 checkpoints pickle besides tensors and builtins."""
    return [argparse.Namespace] + _numpy_globals()


def allow_fairseq_checkpoints() -> None:
    """Allow-lists :func:`fairseq_safe_globals` for ``torch.load(weights_only=True)``.

    Process-wide (that is how torch's allow-list works), additive and idempotent.
    """
    torch.serialization.add_safe_globals(fairseq_safe_globals())
