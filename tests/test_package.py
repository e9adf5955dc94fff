"""The package itself: import stays light, `fastpatch env` reports every op, the demo runs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_import_fastpatch_imports_no_framework_and_no_extension():
    proc = _python("import sys, fastpatch, fastpatch.ops; "
                   "print(sorted(m for m in ('transformers', 'fairseq', 'deepspeed', 'fastpatch._C') "
                   "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_env_lists_versions_extension_status_and_every_op():
    from fastpatch.ops import KERNELS

    proc = _python("from fastpatch.cli import main; main(['env'])")
    assert proc.returncode == 0, proc.stderr
    for field in ("python", "torch", "nvcc", "transformers", "fairseq", "deepspeed", "GPU", "CUDA extension"):
        assert field in proc.stdout
    for op in KERNELS:
        assert f"op {op}" in proc.stdout


def test_disabled_kernels_say_why():
    proc = _python("from fastpatch import _extension; print(_extension.extension_status().how)",
                   env={"FASTPATCH_DISABLE_CUDA_KERNELS": "1"})
    assert "FASTPATCH_DISABLE_CUDA_KERNELS" in proc.stdout


def test_demo_runs_on_cpu_and_reports_parity():
    pytest.importorskip("transformers")
    proc = _python("import sys; from fastpatch.cli import main; sys.exit(main(['demo', '--device', 'cpu']))")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "identical tokens = True" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")
