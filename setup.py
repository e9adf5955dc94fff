"""Build script for fastpatch.

The CUDA extension ``fastpatch._C`` is built only where it can be: CUDA-enabled torch importable at
build time (install with ``pip install --no-build-isolation .``) and nvcc found through
``CUDA_HOME``. Everywhere else the package installs without it and runs the PyTorch reference
path; on first CUDA use it may JIT-build the same sources (see ``fastpatch/_extension.py``).

Environment:
    FASTPATCH_BUILD_CUDA=0     skip the extension.
    TORCH_CUDA_ARCH_LIST       target architectures (default "8.0;9.0": Ampere and Hopper).
    MAX_JOBS                   parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# FASTPATCH_SKIP_SOURCES="csrc/a.cu,csrc/b.cu" leaves files out (the GPU run script uses it to
# salvage a build when one kernel file fails to compile; its ops then take the reference path).
_SKIPPED = {p.strip() for p in os.environ.get("FASTPATCH_SKIP_SOURCES", "").split(",") if p.strip()}
CSRC_SOURCES = sorted(p for p in glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp") if p not in _SKIPPED)

def _build_settings():
    """fastpatch/_build.py, loaded by path: the package itself may not be importable yet."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_fastpatch_build",
                                                  os.path.join(HERE, "fastpatch", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_settings()


def _cuda_extension():
    """Return ([ext], cmdclass) for the CUDA build, or ([], {}) with a printed reason."""
    if os.environ.get("FASTPATCH_BUILD_CUDA", "1") == "0":
        print("fastpatch: FASTPATCH_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        print(f"fastpatch: torch not importable at build time ({exc}); installing without the "
              "CUDA extension (use --no-build-isolation to build it)", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("fastpatch: no CUDA torch or no nvcc (CUDA_HOME); installing the reference path only",
              file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD.DEFAULT_ARCH_LIST)
    ext = CUDAExtension(
        name="fastpatch._C",
        sources=CSRC_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")] + BUILD.extra_include_dirs(),
        extra_compile_args={"cxx": BUILD.CXX_FLAGS, "nvcc": BUILD.NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so an installed copy can JIT-build the extension."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastpatch", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in glob.glob(os.path.join(HERE, "csrc", "*")):
            shutil.copy(path, target)


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = BuildPyWithSources

packages = find_packages(include=["fastpatch", "fastpatch.*"])
packages += ["fastpatch.integrations"] + [
    "fastpatch.integrations." + p for p in find_packages(where="integrations")
]

setup(
    name="fastpatch",
    version="0.1.0",
    description="Drop-in fused CUDA layers for Hugging Face, Fairseq and DeepSpeed transformers",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastpatch.integrations": "integrations"},
    package_data={"fastpatch.integrations.fairseq": ["data/*", "data/**/*"],
                  "fastpatch.integrations.deepspeed": ["*.json"]},
    install_requires=["torch>=2.6", "wrapt", "pybind11"],
    extras_require={
        "hf": ["transformers>=5.0", "safetensors"],
        "fairseq": [
            "fairseq==0.12.2; python_version < '3.11'",
            "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        ],
        "deepspeed": ["deepspeed>=0.19"],
        "test": ["pytest", "transformers>=5.0", "safetensors", "ninja", "accelerate>=1.1"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={
        "console_scripts": [
            "fastpatch=fastpatch.cli:main",
            "lightseq-train=fastpatch.integrations.fairseq.cli:train",
            "lightseq-generate=fastpatch.integrations.fairseq.cli:generate",
            "lightseq-interactive=fastpatch.integrations.fairseq.cli:interactive",
            "lightseq-deepspeed=fastpatch.integrations.deepspeed.cli:main",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
