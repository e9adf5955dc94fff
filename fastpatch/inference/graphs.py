"""Capturing a fixed-shape computation once in a CUDA graph and replaying it.

Decoding one token of GPT-2 small is ~150 kernel launches of a few microseconds each; issued
one by one from Python the GPU mostly waits for the CPU. Replaying a captured graph issues them
all with one call. The engines capture one graph per shape bucket (batch rows x cache slots for
the decoder step, batch x length for encoders) and feed it through static input buffers.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("fastpatch")


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= ``max(n, minimum)``: few shapes, each at most 2x the need."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def graphs_available(device: torch.device) -> bool:
    """Whether steps on ``device`` can be captured: it is CUDA and the fused ops' CUDA kernels
    are loaded. Without them the ops run their PyTorch references, and the KV-cache write's
    (boolean indexing) syncs with the host, which capture forbids; the engine then runs eagerly
    and says so once (``fastpatch env`` tells why the kernels are missing)."""
    if device.type != "cuda":
        return False
    from ..ops._dispatch import kernel_for

    if kernel_for("attn_kv_cache_append", torch.empty(1, device=device)) is None:
        logger.warning("fastpatch.inference: CUDA kernels unavailable (see `fastpatch env`); "
                       "decoding runs eagerly, without CUDA graphs")
        return False
    return True


class CapturedCall:
    """``fn()`` captured in a CUDA graph; calling the object replays it.

    ``fn`` must read its inputs from tensors it closes over (write new inputs into them with
    ``copy_``/``fill_`` before each call) and return the output tensor(s), which are static too:
    the next replay overwrites them. Graph capture forbids host syncs and allocations that
    depend on data, which the decode step and encoder forward avoid by construction.
    """

    def __init__(self, fn: Callable[[], object], device: torch.device, warmup: int = 2):
        # Warm-up outside capture initialises what must not happen during it (cuBLAS handles
        # and workspaces, SDPA backend selection, lazy extension loading). It runs on a side
        # stream, as torch.cuda.graphs requires for the captured stream's allocator state.
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engines capture inside other people's programs, whose threads keep
        # calling CUDA meanwhile (fairseq's DataLoader pins every batch with cudaHostAlloc on its
        # pin-memory thread); in the default "global" mode such a call anywhere in the process
        # invalidates the capture. Our own thread's unsafe calls still fail the capture.
        # stream=side, a stream of the engine's device: torch.cuda.graph's default capture stream
        # is made once per process, on whichever device was current at its first capture, and
        # the kernels of an engine on another device would not be recorded in it.
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.output = fn()

    def __call__(self):
        self.graph.replay()
        return self.output
