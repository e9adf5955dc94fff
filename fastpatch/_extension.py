"""Finding, loading and (once) JIT-building the CUDA extension.

The extension is a shared library whose static initialisers register the CUDA kernels as
``torch.ops.fastpatch_cuda.*``. Nothing here runs at ``import fastpatch``: the first CUDA tensor
that reaches a fused op calls :func:`cuda_ops`, which tries, in order,

1. the prebuilt ``fastpatch._C`` (from ``pip install --no-build-isolation .``),
2. a JIT build of ``csrc/`` with ninja, cached under ``$FASTPATCH_CACHE`` (default
   ``~/.cache/fastpatch``) and announced on stderr because it takes a minute or two.

Whatever happens is remembered with its reason, so ``fastpatch env`` can say why the reference
path is in use. ``FASTPATCH_DISABLE_CUDA_KERNELS=1`` forces the reference path (useful to
bisect a numerical difference).
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import os
import sys
import threading
from dataclasses import dataclass

import torch

from . import _build

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class ExtensionStatus:
    """Outcome of loading the CUDA extension: ``loaded`` and, either way, how or why not."""

    loaded: bool
    how: str


_lock = threading.Lock()
_status: ExtensionStatus | None = None


def _source_dir() -> str | None:
    """csrc/ of a source checkout, or the copy that setup.py ships inside the package."""
    for candidate in (os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"),
                      os.path.join(_PACKAGE_DIR, "csrc")):
        if glob.glob(os.path.join(candidate, "*.cu")):
            return candidate
    return None


def _jit_build() -> ExtensionStatus:
    from torch.utils import cpp_extension

    src = _source_dir()
    if src is None:
        return ExtensionStatus(False, "no prebuilt fastpatch._C and no csrc/ sources to JIT-build")
    if cpp_extension.CUDA_HOME is None:
        return ExtensionStatus(False, "no prebuilt fastpatch._C and nvcc not found (set CUDA_HOME)")
    sources = sorted(glob.glob(os.path.join(src, "*.cu")) + glob.glob(os.path.join(src, "*.cpp")))
    digest = hashlib.sha256()
    for path in sources + sorted(glob.glob(os.path.join(src, "*.h*"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(torch.__version__.encode())
    cache = os.environ.get("FASTPATCH_CACHE", os.path.expanduser("~/.cache/fastpatch"))
    build_dir = os.path.join(cache, "build-" + digest.hexdigest()[:16])
    os.makedirs(build_dir, exist_ok=True)
    print(f"fastpatch: building CUDA kernels once (JIT, cached in {build_dir}); "
          "this takes a minute or two", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name="fastpatch_jit_C",
            sources=sources,
            extra_include_paths=[src] + _build.extra_include_dirs(),
            extra_cflags=_build.CXX_FLAGS,
            extra_cuda_cflags=_build.NVCC_FLAGS,
            build_directory=build_dir,
            verbose=False,
        )
    except Exception as exc:  # a failed build must leave the reference path usable
        return ExtensionStatus(False, f"JIT build failed: {type(exc).__name__}: {exc}")
    return ExtensionStatus(True, f"JIT-built in {build_dir}")


def _load() -> ExtensionStatus:
    if os.environ.get("FASTPATCH_DISABLE_CUDA_KERNELS", "0") == "1":
        return ExtensionStatus(False, "disabled by FASTPATCH_DISABLE_CUDA_KERNELS=1")
    if torch.version.cuda is None:
        return ExtensionStatus(False, "torch was built without CUDA")
    try:
        importlib.import_module("fastpatch._C")
        return ExtensionStatus(True, "prebuilt fastpatch._C")
    except ImportError as exc:
        prebuilt_error = str(exc)
    if not torch.cuda.is_available():
        return ExtensionStatus(False, f"fastpatch._C not importable ({prebuilt_error}) and no GPU "
                                      "visible to JIT-build for")
    if os.environ.get("FASTPATCH_JIT", "1") == "0":
        return ExtensionStatus(False, f"fastpatch._C not importable ({prebuilt_error}); JIT disabled")
    return _jit_build()


def extension_status(load: bool = True) -> ExtensionStatus:
    """Load the extension if not tried yet (``load=True``) and say how it went."""
    global _status
    if _status is None and load:
        with _lock:
            if _status is None:
                _status = _load()
    return _status or ExtensionStatus(False, "not loaded yet (no CUDA tensor reached a fused op)")


def cuda_ops():
    """``torch.ops.fastpatch_cuda`` if the kernels are loaded, else ``None``."""
    return torch.ops.fastpatch_cuda if extension_status().loaded else None


def has_cuda_kernel(name: str) -> bool:
    """Whether the loaded extension registers ``fastpatch_cuda::<name>``."""
    ops = cuda_ops()
    return ops is not None and hasattr(ops, name)
