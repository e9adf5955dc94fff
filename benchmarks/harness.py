"""Side-by-side timing: eager PyTorch vs torch.compile of the same code vs fastpatch, same run.

A benchmark module exposes ``cases() -> list[Case]``; ``bench_ops.py`` runs them all. Times are
medians of CUDA-event-timed runs after warm-up (``triton.testing.do_bench`` when available), and
peak memory is measured per variant from a clean allocator state.
"""
from __future__ import annotations

import dataclasses
import subprocess
from typing import Callable, Dict, List

import torch


@dataclasses.dataclass
class Case:
    """One workload: ``variants`` maps "eager" / "compile" / "fastpatch" to a zero-arg callable
    (each builds nothing: inputs are captured when the case is made)."""

    op: str
    shape: str
    dtype: str
    variants: Dict[str, Callable[[], object]]
    note: str = ""


def time_ms(fn: Callable[[], object], warmup_ms: float = 50, rep_ms: float = 300) -> float:
    try:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def kernel_times(fn: Callable[[], object], calls: int = 10, top: int = 6) -> tuple[float, list]:
    """GPU kernel time of one call (device time of every kernel, summed, over ``calls`` calls),
    and the ``top`` kernels as ``(name, ms a call, launches a call)``.

    Set beside :func:`time_ms`, it says what bounds a variant: a wall time well above the kernel
    time is host time (Python, dispatch, launches) the GPU waits through; the top kernels say
    which one to work on otherwise."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0.0) > 0]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
    return total_ms, [(e.key[:100], round(e.self_device_time_total / 1e3 / calls, 4),
                       round(e.count / calls, 1)) for e in kernels[:top]]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(case: Case) -> List[dict]:
    rows = []
    for name, fn in case.variants.items():
        try:
            fn()  # compile / JIT outside the timing
            ms = time_ms(fn)
            mem = peak_memory_mb(fn)
            try:
                kernel_ms, top_kernels = kernel_times(fn)
            except Exception as exc:  # the profiler failing must not lose the timing
                kernel_ms, top_kernels = None, [(f"profiler failed: {type(exc).__name__}", 0.0, 0.0)]
            rows.append(dict(op=case.op, shape=case.shape, dtype=case.dtype, variant=name,
                             ms=ms, kernel_ms=kernel_ms, top_kernels=top_kernels, peak_mb=mem,
                             note=case.note))
        except Exception as exc:  # a failing variant is reported, not fatal to the run
            rows.append(dict(op=case.op, shape=case.shape, dtype=case.dtype, variant=name,
                             ms=None, peak_mb=None, note=f"failed: {type(exc).__name__}: {exc}"[:300]))
    return rows


def fwd_bwd(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    """A callable running forward and backward of ``fn(*inputs)`` with a fixed random grad."""
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        o = fn(*inputs)
        o = o[0] if isinstance(o, tuple) else o
        torch.autograd.grad(o, leaves, grad)

    return step


def environment() -> dict:
    """Device, versions and commit. The GPU machine gets a copy of the tree without .git, so the
    caller passes the commit as FASTPATCH_COMMIT (run_gpu.sh's documented invocation does)."""
    import os

    commit = os.environ.get("FASTPATCH_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "unknown"
            if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                              capture_output=True, text=True).stdout.strip():
                commit += "-dirty"
        except OSError:
            commit = "unknown"
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, commit=commit)
