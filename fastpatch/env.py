"""``fastpatch env``: what this installation can run, and why not where it can't."""
from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
from typing import List, Tuple

import torch

from . import _extension


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # a broken optional dependency is information, not a crash
        return f"not available ({type(exc).__name__})"


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and f"{CUDA_HOME}/bin/nvcc")
    if not nvcc:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[-1] if out else "not runnable"
    except (OSError, subprocess.TimeoutExpired):
        return "not runnable"


def collect() -> List[Tuple[str, str]]:
    from .ops import KERNELS

    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("nvcc", _nvcc_version()),
        ("transformers", _version("transformers")),
        ("fairseq", _version("fairseq")),
        ("deepspeed", _version("deepspeed")),
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm_{major}{minor})"))
    else:
        rows.append(("GPU", "none visible"))
    status = _extension.extension_status()
    rows.append(("CUDA extension", ("loaded: " if status.loaded else "not loaded: ") + status.how))
    for op, kernels in KERNELS.items():
        if not torch.cuda.is_available():
            path = "reference (no GPU)"
        elif not status.loaded:
            path = "reference (extension not loaded)"
        else:
            missing = [k for k in kernels if not _extension.has_cuda_kernel(k)]
            path = "CUDA kernel" if not missing else f"reference (kernel missing: {', '.join(missing)})"
        rows.append((f"op {op}", path))
    return rows


def format_report(rows: List[Tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
