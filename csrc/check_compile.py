"""Compile one or more csrc/ files for sm_90 without a GPU, to catch errors early.

    python csrc/check_compile.py csrc/layernorm_residual.cu [more.cu ...]

Uses the same flags and include paths as the real build; writes objects to a temp dir.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from torch.utils import cpp_extension  # noqa: E402

from fastpatch import _build  # noqa: E402


def main(paths):
    includes = cpp_extension.include_paths(device_type="cuda") + _build.extra_include_dirs() + [
        HERE, sysconfig.get_paths()["include"]]
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            cmd = [nvcc, "-c", path, "-o", os.path.join(tmp, "x.o"), "-std=c++20",
                   "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
                   "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
                   "-D_GLIBCXX_USE_CXX11_ABI=1", "--resource-usage"] + _build.NVCC_FLAGS
            cmd += ["-I" + p for p in includes]
            if path.endswith(".cpp"):
                cmd = ["g++", "-c", path, "-o", os.path.join(tmp, "x.o"), "-std=c++20", "-fPIC",
                       "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"] + [
                           "-I" + p for p in includes]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "warning #" not in l]
            print(f"== {path}: {'ok' if proc.returncode == 0 else 'FAILED'}")
            if proc.returncode != 0 or os.environ.get("VERBOSE"):
                print("\n".join(lines[-60:]))
            failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
