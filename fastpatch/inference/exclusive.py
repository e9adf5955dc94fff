"""One call at a time per engine.

An engine's KV cache, the static inputs of its captured graphs and their outputs serve one call
at a time. A server that calls ``m.infer`` from a thread pool would otherwise interleave two
calls on the same cache and return wrong tokens without any error. So calls from other threads
wait their turn. A call from the thread that already holds the engine (``generate`` between two
tokens of an unfinished ``stream()``, or from inside a streamer callback) raises instead,
because waiting on itself would never end.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional


class EngineGuard:
    """The lock of one engine; ``what`` names it in the error."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._owner: Optional[int] = None  # thread ident of the holder

    def __reduce__(self):
        # copy.deepcopy / pickle of a model that holds a guard: a fresh, free one (a lock
        # cannot be pickled, and a copy is a different engine)
        return (EngineGuard, (self.what,))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        me = threading.get_ident()
        # only this thread can have written its own ident: reading it without the lock is safe
        if self._owner == me:
            raise RuntimeError(
                f"{self.what} is already decoding in this thread: an unfinished stream() holds its "
                f"cache (exhaust or close() that iterator first), or this call comes from inside "
                f"a streamer callback of the running one")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


def guard_of(engine_holder: object) -> EngineGuard:
    """The guard of ``engine_holder`` (an ``fi.Gpt`` / ``fi.Transformer`` / ``fi.Bert``, an
    ``LSTransformer``), made on first use. ``dict.setdefault`` is atomic, so two threads racing
    here get the same guard."""
    guard = engine_holder.__dict__.get("_engine_guard")
    if guard is None:
        guard = engine_holder.__dict__.setdefault("_engine_guard", EngineGuard(type(engine_holder).__name__))
    return guard
