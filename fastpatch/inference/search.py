"""Token selection loops: greedy / sampling and beam search, over any decode session.

A *session* is what an engine returns after its prefill: ``step(tokens [R]) -> logits [R, V]``
feeds one token per row (the logits may live in a buffer the next step overwrites) and
``reorder(index [R])`` permutes its cache rows. The loops never look at the model, so the
decoder-only and encoder-decoder engines share them.

The algorithms are Hugging Face's (``GenerationMixin._sample`` and the vectorised
``_beam_search`` of transformers 5), step for step, so identical logits give identical tokens
and beam scores. Everything stays on the device; the host only checks now and then whether
every row has finished, because each check is a sync that stalls the queued decode steps.
Running a few steps past the point where everything finished changes no result: finished rows
emit padding, and a finished beam-search prompt can no longer admit hypotheses.

A beam-search step (:meth:`BeamSearch.advance`) reads the step number from a device tensor and
writes nothing the host must read, so ``captured_search`` can capture it together with the
cache reorder and the decode step in one CUDA graph; the eager loop here runs the same code.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

from .options import GenerationOptions
from .sampling import draw, warp

# Large negative score that removes a candidate while keeping arithmetic finite (HF's value).
_NEG = -1.0e9

StepNumber = Union[int, Tensor]  # a step number: a host int, or a [1] int64 tensor on the device


class TokenForcing:
    """HF's minimum-length and forced-BOS / forced-EOS processors, in HF's order.

    Before ``min_new_tokens`` new tokens the EOS ids score ``-inf``. A forced id keeps score 0
    and every other id gets ``-inf``: BOS is forced when the sequence so far is one token (an
    encoder-decoder's start token), EOS at the last position the step limit allows. The step
    ``t`` and the limit may be host ints or device tensors (``[1]`` int64): with tensors the
    rules become ``where`` selections, so the same call runs inside a captured graph. The
    constant rows are made here, once, on ``device``.
    """

    def __init__(self, options: GenerationOptions, prompt_length: int, vocab: int, device: torch.device):
        def row(ids, inside: float, outside: float) -> Tensor:
            r = torch.full((vocab,), outside, dtype=torch.float32, device=device)
            r[list(ids)] = inside
            return r

        eos = options.eos_token_id
        self.min_new_tokens = options.min_new_tokens if eos else 0
        # [V] bool: the EOS columns
        self.eos_columns = row(eos, 1.0, 0.0).bool() if self.min_new_tokens else None
        bos_step = 1 - prompt_length  # the step whose sequence so far is one token
        self.bos_step = bos_step if options.forced_bos_token_id is not None and bos_step >= 0 else None
        self.bos_row = (row((options.forced_bos_token_id,), 0.0, float("-inf"))
                        if self.bos_step is not None else None)
        self.eos_row = row(options.forced_eos_token_id, 0.0, float("-inf")) if options.forced_eos_token_id else None

    def __call__(self, scores: Tensor, t: StepNumber, limit: StepNumber) -> Tensor:
        """``scores [R, V]`` fp32 of new token ``t`` (of at most ``limit``) -> processed scores
        (a new tensor where anything changes: the caller may keep the input)."""
        if self.min_new_tokens:
            barred = t < self.min_new_tokens
            if isinstance(barred, Tensor):
                scores = scores.masked_fill(barred & self.eos_columns, float("-inf"))
            elif barred:
                scores = scores.masked_fill(self.eos_columns, float("-inf"))
        # BOS last: where both apply, HF forces BOS
        if self.eos_row is not None:
            scores = _select(t == limit - 1, self.eos_row, scores)
        if self.bos_row is not None:
            scores = _select(t == self.bos_step, self.bos_row, scores)
        return scores


def _select(condition, row: Tensor, scores: Tensor) -> Tensor:
    """``row`` (``[V]``, broadcast over the rows) where ``condition`` holds, else ``scores``."""
    if isinstance(condition, Tensor):
        return torch.where(condition, row, scores)
    return row.expand_as(scores).clone() if condition else scores


class DecodeSession(Protocol):
    def step(self, tokens: Tensor) -> Tensor: ...

    def reorder(self, index: Tensor) -> None: ...


@dataclasses.dataclass
class Step:
    """One new token per row."""

    tokens: Tensor      # [R] int64
    unfinished: Tensor  # [R] bool: the row has not produced an EOS yet (after this token)
    scores: Tensor      # [R, V] fp32 scores the token was chosen from (warped when sampling)
    logits: Tensor      # [R, V] fp32 raw logits


def token_steps(session: DecodeSession, logits: Tensor, options: GenerationOptions,
                generator: Optional[torch.Generator], prompt_length: int) -> Iterator[Step]:
    """Greedy or sampled tokens, one :class:`Step` per position, ``max_new_tokens`` at most.

    ``logits`` ``[R, V]`` are those of each row's last prompt token (``prompt_length`` tokens,
    padding included, as HF counts). A row that produced an EOS emits ``options.pad`` from then on.
    """
    device = logits.device
    eos = torch.tensor(options.eos_token_id, device=device) if options.eos_token_id else None
    forcing = TokenForcing(options, prompt_length, logits.shape[-1], device)
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
    for t in range(options.max_new_tokens):
        # a copy: the session reuses its logits buffer on the next step
        raw = logits.to(torch.float32, copy=True)
        scores = forcing(raw, t, options.max_new_tokens)
        if options.do_sample:
            scores = warp(scores, options)
            tokens = draw(scores, 1, generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, options.pad)
            unfinished = unfinished & ~torch.isin(tokens, eos)
        yield Step(tokens, unfinished, scores, raw)
        if t + 1 < options.max_new_tokens:
            logits = session.step(tokens)


def collect_tokens(steps: Iterator[Step], rows: int, options: GenerationOptions, device: torch.device,
                   *, check_every: int, on_step: Optional[Callable[[Step], None]] = None) -> Tensor:
    """Run ``steps`` into a ``[R, T]`` tensor; ``T`` is where the last row ended (or the max).

    The all-finished check syncs with the device every ``check_every`` steps; the extra steps
    it lets run are cut off again, so the result equals stopping at the exact step.
    """
    out = torch.full((rows, options.max_new_tokens), options.pad, dtype=torch.int64, device=device)
    n = 0
    for step in steps:
        out[:, n] = step.tokens
        n += 1
        if on_step is not None:
            on_step(step)
        if options.eos_token_id and n % check_every == 0 and not bool(step.unfinished.any()):
            break
    out = out[:, :n]
    if options.eos_token_id:
        is_eos = torch.isin(out, torch.tensor(options.eos_token_id, device=device))
        if bool(is_eos.any(dim=1).all()):
            out = out[:, : int(is_eos.to(torch.int8).argmax(dim=1).max()) + 1]
    return out


@dataclasses.dataclass
class BeamResult:
    """The best ``num_return_sequences`` hypotheses of each prompt, best first."""

    tokens: Tensor        # [B * R, T] int64 new tokens; ``fill_value`` after a hypothesis' end
    scores: Tensor        # [B * R] fp32 length-penalised log-probability
    beam_indices: Tensor  # [B * R, T] int32 flat beam row each token was appended to; -1 after the end
    step_scores: List[Tensor]  # per step, the [B * K, V] fp32 log-probs (only when recorded)


@dataclasses.dataclass
class BeamState:
    """Beam search over ``B`` prompts, ``K`` beams, room for ``T`` new tokens a hypothesis."""

    running_tokens: Tensor   # [B, K, T] int64 the K live beams' tokens so far
    running_indices: Tensor  # [B, K, T] int32 flat beam row each of them was appended to
    running_scores: Tensor   # [B, K] fp32 summed log-probabilities of the live beams
    tokens: Tensor           # [B, K, T] int64 the best finished hypotheses (``fill_value`` after)
    indices: Tensor          # [B, K, T] int32
    scores: Tensor           # [B, K] fp32 their length-penalised scores (_NEG: none yet)
    finished: Tensor         # [B, K] bool: slot holds a finished hypothesis
    improvable: Tensor       # [B, 1] bool: a live beam may still beat the finished ones

    def copy_(self, other: "BeamState") -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).copy_(getattr(other, field.name))


class BeamAdvance(NamedTuple):
    state: BeamState
    next_tokens: Tensor    # [B * K] int64 each live beam's new token, to feed the next step
    reorder_index: Tensor  # [B * K] int64 the cache row each live beam continues
    log_probs: Tensor      # [B * K, V] fp32 the processed log-probabilities of this step


class BeamSearch:
    """Beam search with HF's semantics: length penalty, EOS handling, early stopping, pruning.

    Holds the constants of one search shape on the device (built once, so a captured graph can
    keep reading them): ``batch`` prompts, ``num_beams`` beams, hypotheses of up to ``length``
    tokens (>= every step limit the search is run with), ``vocab`` logits a row.
    """

    def __init__(self, options: GenerationOptions, batch: int, vocab: int, length: int, prompt_length: int,
                 device: torch.device, fill_value: int):
        k = options.num_beams
        self.options, self.batch, self.k, self.vocab, self.length = options, batch, k, vocab, length
        self.device, self.fill_value = device, fill_value
        self.eos = torch.tensor(options.eos_token_id, device=device) if options.eos_token_id else None
        # each step keeps the 2K best continuations ((1 + #eos) K with several EOS ids)
        self.keep = max(2, 1 + len(options.eos_token_id)) * k
        self.top_k_mask = torch.arange(self.keep, device=device) < k
        self.batch_offset = torch.arange(batch, device=device).view(-1, 1) * k
        # length ** length_penalty per hypothesis length 1..T, rounded from the host's double as
        # dividing by a Python float would be
        lp = options.length_penalty
        self.penalty = torch.tensor([(n + 1) ** lp for n in range(length)], dtype=torch.float32, device=device)
        self.forcing = TokenForcing(options, prompt_length, vocab, device)

    def initial_state(self) -> BeamState:
        b, k, n, device = self.batch, self.k, self.length, self.device
        running_tokens = torch.full((b, k, n), self.fill_value, dtype=torch.int64, device=device)
        running_indices = torch.full((b, k, n), -1, dtype=torch.int32, device=device)
        running_scores = torch.zeros(b, k, dtype=torch.float32, device=device)
        running_scores[:, 1:] = _NEG  # only beam 0 is live at first: the K copies are identical
        return BeamState(running_tokens, running_indices, running_scores, running_tokens.clone(),
                         running_indices.clone(), torch.full((b, k), _NEG, dtype=torch.float32, device=device),
                         torch.zeros(b, k, dtype=torch.bool, device=device),
                         torch.ones(b, 1, dtype=torch.bool, device=device))

    def done(self, state: BeamState) -> Tensor:
        """A 0-dim bool tensor: no prompt can change its finished hypotheses any more."""
        return ~state.improvable.any() | (state.finished.all() & (self.options.early_stopping is True))

    def advance(self, state: BeamState, logits: Tensor, t: Tensor, limit: Tensor,
                generator: Optional[torch.Generator] = None) -> BeamAdvance:
        """Choose new token ``t`` (``[1]`` int64) of at most ``limit`` (``[1]`` int64) from the
        ``[B * K, V]`` logits of the live beams: keep the ``2K`` best continuations, move those
        ending in EOS (or at the limit) among the top ``K`` into the finished set, continue with
        the best ``K`` that did not end. Returns a new state; ``state`` is not modified."""
        options, batch, k, vocab = self.options, self.batch, self.k, self.vocab
        log_probs = self.forcing(torch.log_softmax(logits.float(), dim=-1), t, limit)
        if options.do_sample:
            log_probs = warp(log_probs, options, min_tokens_to_keep=len(options.eos_token_id) + 1)
        total = (log_probs.view(batch, k, vocab) + state.running_scores[:, :, None]).view(batch, k * vocab)

        # (a) the best `keep` continuations over all beams of each prompt
        if options.do_sample:
            flat = draw(total, self.keep, generator)
            top_scores = torch.gather(total, 1, flat)
        else:
            top_scores, flat = torch.topk(total, self.keep)
        beam = flat // vocab
        new_token = flat % vocab
        position = t.view(1, 1, 1).expand(batch, self.keep, 1)
        cand_tokens = _gather(state.running_tokens, beam).scatter_(2, position, new_token.unsqueeze(2))
        cand_indices = _gather(state.running_indices, beam).scatter_(
            2, position, (beam + self.batch_offset).to(torch.int32).unsqueeze(2))
        last = t + 1 >= limit
        if self.eos is None:
            ended = last.expand(batch, self.keep)
        else:  # not torch.isin: past a few elements it sorts and syncs, which a capture forbids
            ended = (new_token.unsqueeze(-1) == self.eos).any(dim=-1) | last

        # (b) the K best continuations that did not end keep running
        running_candidates = top_scores + ended.to(torch.float32) * _NEG
        pick = torch.topk(running_candidates, k=k)[1]
        running_tokens = _gather(cand_tokens, pick)
        running_scores = _gather(running_candidates, pick)
        running_indices = _gather(cand_indices, pick)

        # (c) ended continuations among the top K join the finished set if they beat it
        just_finished = ended & self.top_k_mask[None, :]
        final = top_scores / self.penalty.index_select(0, t)
        full = torch.all(state.finished, dim=-1, keepdim=True) & (options.early_stopping is True)
        final = final + full.to(torch.float32) * _NEG
        final = final + (~state.improvable).to(torch.float32) * _NEG
        final = final + (~just_finished) * _NEG
        merged = torch.topk(torch.cat((state.scores, final), dim=1), k=k)[1]
        tokens = _gather(torch.cat((state.tokens, cand_tokens), dim=1), merged)
        scores = _gather(torch.cat((state.scores, final), dim=1), merged)
        indices = _gather(torch.cat((state.indices, cand_indices), dim=1), merged)
        finished = _gather(torch.cat((state.finished, just_finished), dim=1), merged)

        # (d) can a running beam still beat the worst finished one? (HF's heuristic)
        optimistic = options.early_stopping == "never" and options.length_penalty > 0.0
        best_running = running_scores[:, :1] / self.penalty.index_select(0, limit - 1 if optimistic else t)
        worst_finished = torch.where(finished, torch.min(scores, dim=1, keepdim=True)[0], _NEG)
        improvable = state.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        position = t.view(1, 1, 1).expand(batch, k, 1)
        next_tokens = running_tokens.gather(2, position).reshape(-1)
        reorder_index = running_indices.gather(2, position).reshape(-1).to(torch.int64)
        return BeamAdvance(BeamState(running_tokens, running_indices, running_scores, tokens, indices, scores,
                                     finished, improvable), next_tokens, reorder_index, log_probs)

    def result(self, state: BeamState, num_return_sequences: int) -> BeamResult:
        """The best ``num_return_sequences`` finished hypotheses of each prompt."""
        r = num_return_sequences
        tokens = state.tokens[:, :r].reshape(self.batch * r, self.length)
        scores = state.scores[:, :r].reshape(self.batch * r)
        indices = state.indices[:, :r].reshape(self.batch * r, self.length)
        length = int((indices >= 0).sum(dim=1).max())
        return BeamResult(tokens[:, :length], scores, indices[:, :length], [])


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t [B, N, ...]`` rows ``index [B, M]`` of each prompt: ``[B, M, ...]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(session: DecodeSession, logits: Tensor, options: GenerationOptions, batch: int,
                generator: Optional[torch.Generator], *, prompt_length: int, fill_value: int,
                check_every: int, record_scores: bool = False) -> BeamResult:
    """Beam search (:class:`BeamSearch`) over ``session``, one step at a time from the host.

    ``logits`` are ``[B * K, V]``: each prompt's last-token logits repeated for its ``K`` beams
    (the session's cache rows are laid out the same way); the session's cache rows are
    reordered to follow the live beams on the device.
    """
    steps_max = options.max_new_tokens
    search = BeamSearch(options, batch, logits.shape[-1], steps_max, prompt_length, logits.device, fill_value)
    state = search.initial_state()
    t = torch.zeros(1, dtype=torch.int64, device=logits.device)
    limit = torch.full((1,), steps_max, dtype=torch.int64, device=logits.device)
    step_scores: List[Tensor] = []
    for n in range(steps_max):
        state, next_tokens, reorder_index, log_probs = search.advance(state, logits, t, limit, generator)
        if record_scores:
            step_scores.append(log_probs.clone())
        if n + 1 >= steps_max:
            break
        if (n + 1) % check_every == 0 and bool(search.done(state)):
            break
        session.reorder(reorder_index)
        logits = session.step(next_tokens)
        t = t + 1
    result = search.result(state, options.num_return_sequences)
    result.step_scores.extend(step_scores)
    return result
