"""The engine a routed Hugging Face model keeps between calls."""
from __future__ import annotations

from typing import Callable, Hashable, Optional


class EngineState:
    """An engine built from a model's parameters, rebuilt when ``key`` (a fingerprint of those
    parameters) changes.

    A copy of the model (``copy.deepcopy``, pickle) starts without an engine and builds its own
    on first use: CUDA graphs cannot be copied, and the engine must read the copy's parameters.
    """

    __slots__ = ("engine", "key")

    def __init__(self):
        self.engine: Optional[object] = None
        self.key: Hashable = None

    def current(self, key: Hashable, build: Callable[[], object]) -> object:
        if self.engine is None or self.key != key:
            self.engine = build()
            self.key = key
        return self.engine

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())
