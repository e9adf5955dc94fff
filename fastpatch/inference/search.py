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
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, Optional, Protocol

import torch
from torch import Tensor

from .options import GenerationOptions
from .sampling import draw, warp

# Large negative score that removes a candidate while keeping arithmetic finite (HF's value).
_NEG = -1.0e9


def force_tokens(scores: Tensor, options: GenerationOptions, prompt_length: int, t: int) -> Tensor:
    """HF's minimum-length and forced-BOS / forced-EOS processors for new token ``t``, in HF's
    order. Before ``min_new_tokens`` tokens the EOS ids score ``-inf``. A forced id keeps score
    0 and every other id gets ``-inf``: BOS is forced when the sequence so far is one token (an
    encoder-decoder's start token), EOS at the last position ``max_new_tokens`` allows."""
    if t < options.min_new_tokens and options.eos_token_id:
        scores = scores.clone()  # the caller may keep the unprocessed scores
        scores[:, list(options.eos_token_id)] = float("-inf")
    forced = ()
    if options.forced_bos_token_id is not None and prompt_length + t == 1:
        forced = (options.forced_bos_token_id,)
    elif options.forced_eos_token_id and t == options.max_new_tokens - 1:
        forced = options.forced_eos_token_id
    if not forced:
        return scores
    out = torch.full_like(scores, float("-inf"))
    out[:, list(forced)] = 0
    return out


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
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
    for t in range(options.max_new_tokens):
        # a copy: the session reuses its logits buffer on the next step
        raw = logits.to(torch.float32, copy=True)
        scores = force_tokens(raw, options, prompt_length, t)
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


def beam_search(session: DecodeSession, logits: Tensor, options: GenerationOptions, batch: int,
                generator: Optional[torch.Generator], *, prompt_length: int, fill_value: int,
                check_every: int, record_scores: bool = False) -> BeamResult:
    """Beam search with HF's semantics: length penalty, EOS handling, early stopping, pruning.

    ``logits`` are ``[B * K, V]``: each prompt's last-token logits repeated for its ``K`` beams
    (the session's cache rows are laid out the same way). Every step keeps the ``2K`` best
    continuations (``(1 + #eos) K`` with several EOS ids), moves those ending in EOS (or at the
    length limit) among the top ``K`` into the finished set, and continues with the best ``K``
    that did not end; the session's cache rows are reordered to follow them on the device.
    """
    k, steps_max = options.num_beams, options.max_new_tokens
    device = logits.device
    vocab = logits.shape[-1]
    eos = torch.tensor(options.eos_token_id, device=device) if options.eos_token_id else None
    keep = max(2, 1 + len(options.eos_token_id)) * k
    top_k_mask = torch.arange(keep, device=device) < k
    lp, early = options.length_penalty, options.early_stopping

    running_tokens = torch.full((batch, k, steps_max), fill_value, dtype=torch.int64, device=device)
    running_indices = torch.full((batch, k, steps_max), -1, dtype=torch.int32, device=device)
    running_scores = torch.zeros(batch, k, dtype=torch.float32, device=device)
    running_scores[:, 1:] = _NEG  # only beam 0 is live at first: the K copies are identical
    tokens = running_tokens.clone()
    indices = running_indices.clone()
    scores = torch.full((batch, k), _NEG, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * k
    step_scores: List[Tensor] = []

    def gather(t: Tensor, index: Tensor) -> Tensor:
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(t, index, dim=1)

    for t in range(steps_max):
        log_probs = force_tokens(torch.log_softmax(logits.float(), dim=-1), options, prompt_length, t)
        if options.do_sample:
            log_probs = warp(log_probs, options, min_tokens_to_keep=len(options.eos_token_id) + 1)
        if record_scores:
            step_scores.append(log_probs.clone())
        total = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)

        # (a) the best `keep` continuations over all beams of each prompt
        if options.do_sample:
            flat = draw(total, keep, generator)
            top_scores = torch.gather(total, 1, flat)
        else:
            top_scores, flat = torch.topk(total, keep)
        beam = flat // vocab
        cand_indices = gather(running_indices, beam)
        cand_tokens = gather(running_tokens, beam)
        new_token = flat % vocab
        cand_tokens[:, :, t] = new_token
        cand_indices[:, :, t] = (beam + batch_offset).to(torch.int32)
        ended = torch.zeros_like(new_token, dtype=torch.bool) if eos is None else torch.isin(new_token, eos)
        if t + 1 >= steps_max:
            ended = torch.ones_like(ended)

        # (b) the K best continuations that did not end keep running
        running_candidates = top_scores + ended.to(torch.float32) * _NEG
        pick = torch.topk(running_candidates, k=k)[1]
        running_tokens = gather(cand_tokens, pick)
        running_scores = gather(running_candidates, pick)
        running_indices = gather(cand_indices, pick)

        # (c) ended continuations among the top K join the finished set if they beat it
        just_finished = ended & top_k_mask[None, :]
        final = top_scores / ((t + 1) ** lp)
        full = torch.all(finished, dim=-1, keepdim=True) & (early is True)
        final = final + full.to(torch.float32) * _NEG
        final = final + (~improvable).to(torch.float32) * _NEG
        final = final + (~just_finished) * _NEG
        merged = torch.topk(torch.cat((scores, final), dim=1), k=k)[1]
        tokens = gather(torch.cat((tokens, cand_tokens), dim=1), merged)
        scores = gather(torch.cat((scores, final), dim=1), merged)
        indices = gather(torch.cat((indices, cand_indices), dim=1), merged)
        finished = gather(torch.cat((finished, just_finished), dim=1), merged)

        # (d) can a running beam still beat the worst finished one? (HF's heuristic)
        best_length = steps_max if (early == "never" and lp > 0.0) else t + 1
        best_running = running_scores[:, :1] / (best_length ** lp)
        worst_finished = torch.where(finished, torch.min(scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        if t + 1 >= steps_max:
            break
        if (t + 1) % check_every == 0:
            done = ~improvable.any() | (finished.all() & (early is True))
            if bool(done):
                break
        session.reorder(running_indices[:, :, t].reshape(-1).to(torch.int64))
        logits = session.step(running_tokens[:, :, t].reshape(-1))

    r = options.num_return_sequences
    tokens = tokens[:, :r].reshape(batch * r, steps_max)
    scores = scores[:, :r].reshape(batch * r)
    indices = indices[:, :r].reshape(batch * r, steps_max)
    length = int((indices >= 0).sum(dim=1).max())
    return BeamResult(tokens[:, :length], scores, indices[:, :length], step_scores)
