"""Beam search with each step captured in one CUDA graph: search update, cache reorder, decode.

At small batches a beam-search step is some sixty small kernels of bookkeeping (log-softmax,
two top-k, gathers of the hypotheses, the length penalty) around one replayed decode graph,
and issuing them one by one from Python takes longer than the GPU needs to run them. Capturing
:meth:`~fastpatch.inference.search.BeamSearch.advance`, the KV-cache reorder and the decode
step together makes a step one replay; the host only looks every few steps whether the search
is done (the same check, at the same steps, as the eager loop).

The numbers are those of the eager loop (the same kernels on the same shapes). What differs is
the reorder: a graph cannot read the host's count of written cache slots, so it moves every
slot of the step's bucket; that traffic grows with rows x slots, and past :data:`MAX_ROWS` rows
(where the GPU, not the host, bounds a step anyway) the eager loop runs instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .graphs import CapturedCall, bucket
from .options import GenerationOptions
from .search import BeamResult, BeamSearch, BeamState

#: most (padded) cache rows a captured search step serves
MAX_ROWS = 64
# hypothesis buffers are bucketed so calls with different max_new_tokens share a graph
_MIN_LENGTH = 16


class CapturedBeamStep:
    """One captured beam-search step of a :class:`BeamSearch` over a decode step graph.

    Args:
        search: the search constants (batch, beams, hypothesis length).
        decode: the session's ``StepGraph`` (its static tokens / start / slot and step function).
        arena: the KV cache the decode step reads, reordered in the graph.
        rows: live rows (``batch * beams``); ``slots``: the decode step's cache slots.
        logits: ``[rows, V]`` logits of the first new token (for shape and dtype).
    """

    def __init__(self, search: BeamSearch, decode, arena, rows: int, slots: int, logits: Tensor):
        self.search = search
        device = logits.device
        self.t = torch.zeros(1, dtype=torch.int64, device=device)
        self.limit = torch.full((1,), search.length, dtype=torch.int64, device=device)
        self.state = search.initial_state()
        self.logits = torch.zeros_like(logits)

        def one_step():
            advance = search.advance(self.state, self.logits, self.t, self.limit)
            self.state.copy_(advance.state)
            arena.reorder_rows(advance.reorder_index, slots)
            decode.tokens[:rows].copy_(advance.next_tokens)
            self.logits.copy_(decode.step(decode.tokens, decode.start, decode.slot)[:rows])
            decode.slot.add_(1)
            self.t.add_(1)

        # The capture's warm-up runs reorder the cache and write two slots past the current
        # one: what is in the cache now (the prompt, the first step) must survive them.
        cache = arena.data[:, :, : decode.rows, :, :slots]
        saved_cache, saved_slot = cache.clone(), decode.slot.clone()
        self.call = CapturedCall(one_step, device)
        cache.copy_(saved_cache)
        decode.slot.copy_(saved_slot)

    def run(self, logits: Tensor, steps: int, check_every: int) -> BeamState:
        """Search ``steps`` new tokens from the first token's ``logits`` ``[rows, V]``."""
        self.state.copy_(self.search.initial_state())
        self.t.zero_()
        self.limit.fill_(steps)
        self.logits.copy_(logits)
        for n in range(steps - 1):
            self.call()
            if (n + 1) % check_every == 0 and bool(self.search.done(self.state)):
                return self.state
        # the last token: no decode step after it
        return self.search.advance(self.state, self.logits, self.t, self.limit).state


def captured_beam_search(session, logits: Tensor, options: GenerationOptions, batch: int, *,
                         prompt_length: int, fill_value: int, check_every: int) -> Optional[BeamResult]:
    """:func:`~fastpatch.inference.search.beam_search` with captured steps, or None where it
    does not apply (no decode graph, sampling, a single step, more than :data:`MAX_ROWS` rows);
    the caller then runs the eager loop. Arguments as ``beam_search``'s."""
    decode = getattr(session, "graph", None)
    steps = options.max_new_tokens
    if decode is None or options.do_sample or steps < 2 or decode.rows > MAX_ROWS:
        return None
    length = bucket(steps, _MIN_LENGTH)
    # everything the graph's kernels and constants depend on; max_new_tokens is a device input
    forcing_prompt = prompt_length if options.forced_bos_token_id is not None else None
    key = ("beam", batch, options.num_beams, length, options.eos_token_id, options.length_penalty,
           options.early_stopping, options.min_new_tokens, options.forced_bos_token_id,
           options.forced_eos_token_id, forcing_prompt, fill_value, session.slots, logits.dtype)

    def capture():
        search = BeamSearch(options, batch, logits.shape[-1], length, prompt_length, logits.device, fill_value)
        return CapturedBeamStep(search, decode, session.arena, session.rows, session.slots, logits)

    step = decode.search_graph(key, capture)
    state = step.run(logits, steps, check_every)
    return step.search.result(state, options.num_return_sequences)
