"""Decode sessions: the static step inputs, the captured step graphs, and the session API
(``step`` / ``reorder``) the search loops drive. Shared by the decoder-only and the
encoder-decoder engines, which differ only in their step function.

A step function ``step(tokens [R], start [R], slot [1]) -> logits [R, V]`` reads its inputs
from device tensors and has fixed shapes, so one capture per shape bucket serves every call;
``slot`` is the cache slot the step writes (advanced by the session after each step) and
``start`` the first slot each row may attend to (its left padding ends there).
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .cache import KVArena
from .graphs import CapturedCall

logger = logging.getLogger("fastpatch")

StepFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


class StepGraph:
    """A step function captured with its static inputs for ``rows`` rows.

    It also keeps the graphs captured around it (``captured_search``: a search step and this
    decode step in one graph, reading the same static inputs), a few by key, least recently
    used dropped first: they share its lifetime, since they captured the same cache addresses.
    """

    MAX_SEARCH_GRAPHS = 8

    def __init__(self, step: StepFunction, rows: int, device: torch.device, version: Tuple[int, ...],
                 warmup_slot: int = 0, owner: Optional["StepGraphs"] = None):
        self.step, self.rows, self.version, self.owner = step, rows, version, owner
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.start = torch.zeros(rows, dtype=torch.int64, device=device)
        # the capture's warm-up runs write this cache slot of every row
        self.slot = torch.full((1,), warmup_slot, dtype=torch.int64, device=device)
        self.call = CapturedCall(lambda: step(self.tokens, self.start, self.slot), device)
        self._searches: "collections.OrderedDict[Tuple, object]" = collections.OrderedDict()

    def search_graph(self, key: Tuple, capture: Callable[[], object]):
        """The search graph of ``key``, made by ``capture()`` if it is not kept."""
        graph = self._searches.get(key)
        if graph is not None:
            self._searches.move_to_end(key)
            return graph
        began = time.perf_counter()
        graph = self._searches[key] = capture()
        if self.owner is not None:
            self.owner.count_capture(key, time.perf_counter() - began)
        if len(self._searches) > self.MAX_SEARCH_GRAPHS:
            self._searches.popitem(last=False)
        return graph


class StepGraphs:
    """The captured steps of one engine, by shape bucket; all are dropped when an arena they
    captured moves (it grew), since their addresses are stale."""

    def __init__(self, *arenas: KVArena):
        self.arenas = arenas
        self._graphs: Dict[Tuple, StepGraph] = {}
        # what capturing has cost so far (warm-up runs included): captures mid-search are
        # host time the search waits for, which benchmarks and logs report
        self.captures = 0
        self.capture_seconds = 0.0

    def get(self, key: Tuple, rows: int, step: StepFunction, *, warmup_slot: int = 0) -> StepGraph:
        """The graph of ``key``, captured now (warm-up runs writing cache slot ``warmup_slot``)
        if there is none for the arenas' current addresses."""
        version = tuple(a.version for a in self.arenas)
        graph = self._graphs.get(key)
        if graph is not None and graph.version != version:
            self._graphs.clear()
            graph = None
        if graph is None:
            began = time.perf_counter()
            graph = self._graphs[key] = StepGraph(step, rows, self.arenas[0].device, version, warmup_slot,
                                                  owner=self)
            self.count_capture(key, time.perf_counter() - began)
        return graph

    def count_capture(self, key: Tuple, seconds: float) -> None:
        self.captures += 1
        self.capture_seconds += seconds
        logger.debug("fastpatch.inference: captured the step of %s in %.1f ms", key, 1e3 * seconds)

    def __len__(self) -> int:
        return len(self._graphs)


class DecodeSession:
    """Decode state of one ``generate`` call (see ``search.DecodeSession``).

    Args:
        arena: the engine's KV cache (reordered for beam search).
        rows: live rows; ``padded_rows`` >= rows is the bucket the step runs on.
        step: the step function (run eagerly when ``graph`` is None).
        start: ``[padded_rows]`` first visible slot per row.
        first_slot: the slot the first step writes.
        slots: the cache slots the step attends over (its shape bucket).
    """

    def __init__(self, arena: KVArena, rows: int, padded_rows: int, step: StepFunction, start: Tensor,
                 first_slot: int, graph: Optional[StepGraph], slots: int):
        self.arena, self.rows, self.step_function, self.graph = arena, rows, step, graph
        self.slots = slots
        if graph is None:
            self.tokens = torch.zeros(padded_rows, dtype=torch.int64, device=arena.device)
            self.start = start
            self.slot = torch.zeros(1, dtype=torch.int64, device=arena.device)
        else:
            self.tokens, self.start, self.slot = graph.tokens, graph.start, graph.slot
            self.tokens.zero_()
            self.start.copy_(start)
        self.slot.fill_(first_slot)
        self.written = first_slot  # host copy of the slot: the number of cached slots

    def step(self, tokens: Tensor) -> Tensor:
        self.tokens[: self.rows].copy_(tokens)
        if self.graph is not None:
            logits = self.graph.call()
        else:
            logits = self.step_function(self.tokens, self.start, self.slot)
        self.slot.add_(1)
        self.written += 1
        return logits[: self.rows]

    def reorder(self, index: Tensor) -> None:
        self.arena.reorder_rows(index, self.written)
