"""Compiler settings shared by setup.py and the JIT build (kept import-free for setup.py)."""
import glob
import os
import sysconfig

NVCC_FLAGS = [
    "-O3",
    "--expt-relaxed-constexpr",
    # torch's defaults hide the half/bfloat16 operators; the kernels convert explicitly.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-lineinfo",
]
CXX_FLAGS = ["-O3"]
DEFAULT_ARCH_LIST = "8.0;9.0"


def extra_include_dirs():
    """Headers of the CUDA libraries that pip's CUDA torch ships (curand, cusparse, cublas).

    A minimal CUDA toolkit (nvcc only) lacks them, but ATen's CUDA headers include them.
    """
    purelib = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")))
