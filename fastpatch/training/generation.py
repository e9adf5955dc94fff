"""Greedy and beam-search decoding for :class:`~fastpatch.training.LSTransformer`.

The searches are eager Python bookkeeping, as in fairseq's generator, and drop finished
sentences from the batch as they go. What they ask of the model (log-probabilities of the next
token, following the search's rows) is a :class:`DecodingState`, of which there are two:

* :class:`LayerDecoding`: the model's own fused layers, one
  :class:`~fastpatch.layers.KVCache` per decoder layer (``KVCache.reorder_`` with a shrinking
  index);
* :class:`EngineDecoding`: the encoder-decoder engine of ``fastpatch.inference`` through a
  :class:`~fastpatch.inference.transformer.DrivenSession` (static cache arena, cross-attention
  keys/values computed once, CUDA-graph steps on the GPU); see ``fastpatch.training.engine``.

Both give the same tokens and scores (up to the arithmetic of the dtype): the search does not
know which one runs.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..layers import KVCache

_NEG_INF = float("-inf")


def _check_args(model, src_tokens, eos_idx, bos_idx, max_len) -> None:
    if not isinstance(src_tokens, Tensor) or src_tokens.dim() != 2 or src_tokens.is_floating_point():
        raise ValueError("src_tokens must be an integer tensor [batch, src_len]")
    vocab = model.config.vocab_size
    for name, value in (("eos_idx", eos_idx), ("bos_idx", bos_idx)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")


def _log_probs(model, logits: Tensor) -> Tensor:
    """fp32 log-probabilities ``[rows, V]`` of next-token ``logits``; padding is never generated."""
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    lprobs[:, model.config.padding_idx] = _NEG_INF
    return lprobs


class DecodingState:
    """The model's side of one search over a source batch: rows ``0..B-1`` are the sentences
    until :meth:`expand` or :meth:`reorder` say otherwise."""

    def expand(self, index: Tensor) -> None:
        """Before the first step: row ``i`` becomes a copy of sentence ``index[i]`` (beams)."""
        raise NotImplementedError

    def next_log_probs(self, tokens: Tensor) -> Tensor:
        """``tokens [R]``, the last token of every row, at the next target position: fp32
        log-probabilities ``[R, V]`` of the token after it (padding at ``-inf``)."""
        raise NotImplementedError

    def reorder(self, index: Tensor) -> None:
        """Between steps: row ``i`` continues old row ``index[i]`` (``index`` may be shorter:
        finished sentences leave). A row keeps its sentence unless the row count changes (beams
        move within their sentence), which :class:`EngineDecoding` relies on."""
        raise NotImplementedError


class LayerDecoding(DecodingState):
    """The model's fused layers, decoding incrementally with one :class:`KVCache` per layer."""

    def __init__(self, model, src_tokens: Tensor):
        self.model = model
        self.encoder_out, self.mask = model.encoder.encode(src_tokens)
        self.caches = [KVCache() for _ in model.decoder.layers]
        self.step = 0

    def expand(self, index: Tensor) -> None:
        self.encoder_out, self.mask = self.encoder_out.index_select(0, index), self.mask.index_select(0, index)

    def next_log_probs(self, tokens: Tensor) -> Tensor:
        logits = self.model.decoder.decode(tokens.unsqueeze(1), self.encoder_out, self.mask, self.caches,
                                           self.step)[:, -1]
        self.step += 1
        return _log_probs(self.model, logits)

    def reorder(self, index: Tensor) -> None:
        for cache in self.caches:
            cache.reorder_(index)
        self.expand(index)


class EngineDecoding(DecodingState):
    """The model on the encoder-decoder engine: ``begin`` encodes the batch into the engine's
    cross-attention cache, each step is one ``DrivenSession.step`` (a graph replay on CUDA)."""

    def __init__(self, model, engine, src_tokens: Tensor, *, max_rows: int, max_steps: int):
        self.model = model
        mask = src_tokens.ne(model.encoder.padding_idx)  # True = token
        self.session = engine.begin(src_tokens, mask, bool((~mask).any()), max_rows=max_rows,
                                    max_target_tokens=max_steps)

    def expand(self, index: Tensor) -> None:
        self.session.reorder_source(index)

    def next_log_probs(self, tokens: Tensor) -> Tensor:
        return _log_probs(self.model, self.session.step(tokens))

    def reorder(self, index: Tensor) -> None:
        self.session.reorder_target(index)
        self.session.reorder_source(index)  # moves only when the row count changes


def start_decoding(model, src_tokens: Tensor, *, max_rows: int, max_steps: int,
                   use_engine: Optional[bool] = None) -> DecodingState:
    """The :class:`DecodingState` of ``src_tokens`` for a search of at most ``max_rows`` rows and
    ``max_steps`` steps; ``use_engine`` as in ``LSTransformer.generate``."""
    from . import engine

    if not engine.use_engine_for(model, use_engine):
        return LayerDecoding(model, src_tokens)
    runner = engine.engine_for(model, max(src_tokens.shape[1], max_steps))
    return EngineDecoding(model, runner, src_tokens, max_rows=max_rows, max_steps=max_steps)


def greedy_search(model, src_tokens: Tensor, *, eos_idx: int, bos_idx: int,
                  max_len: int, use_engine: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Most likely next token at every step, until EOS or ``max_len`` tokens.

    Returns ``(tokens [B, T], scores [B])``: tokens after EOS are ``padding_idx``; a score is the
    sum of the chosen tokens' log-probabilities.
    """
    _check_args(model, src_tokens, eos_idx, bos_idx, max_len)
    pad = model.config.padding_idx
    batch, device = src_tokens.shape[0], src_tokens.device
    state = start_decoding(model, src_tokens, max_rows=batch, max_steps=max_len, use_engine=use_engine)
    out = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    rows = torch.arange(batch, device=device)  # original row of each active row
    last = torch.full((batch,), bos_idx, dtype=torch.long, device=device)
    length = 0
    for step in range(max_len):
        lprobs = state.next_log_probs(last)
        best, token = lprobs.max(dim=-1)
        out[rows, step] = token
        scores[rows] += best
        length = step + 1
        running = token.ne(eos_idx)
        if not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(1)
            state.reorder(keep)
            rows, token = rows[keep], token[keep]
        last = token
    return out[:, :length], scores


def beam_search(model, src_tokens: Tensor, *, beam_size: int, eos_idx: int, bos_idx: int,
                max_len: int, length_penalty: float = 1.0, nbest: int = 1,
                use_engine: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """fairseq's beam search (without its length constraints and n-gram blocking).

    Each step extends every live beam by every token and keeps the ``2 * beam_size`` best
    candidates by summed log-probability. In that order, an EOS candidate among the first
    ``beam_size`` finishes a hypothesis (score ``sum / length ** length_penalty``, the length
    counting EOS) and other candidates become the next beams until there are ``beam_size``.
    A sentence is done once it has ``beam_size`` finished hypotheses; at ``max_len`` every live
    beam is finished with EOS.

    Returns ``(tokens [B, T], scores [B])``: the best finished hypothesis per sentence (ending
    with EOS, padded with ``padding_idx``) and its normalised score; with ``nbest > 1``,
    ``(tokens [B, nbest, T], scores [B, nbest])``, best first.
    """
    _check_args(model, src_tokens, eos_idx, bos_idx, max_len)
    vocab, pad = model.config.vocab_size, model.config.padding_idx
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
    if 2 * beam_size > vocab - 1:
        raise ValueError(f"beam_size ({beam_size}) needs a vocabulary of more than 2 * beam_size "
                         f"tokens besides padding (vocab_size={vocab})")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if isinstance(nbest, bool) or not isinstance(nbest, int) or not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be an int in [1, beam_size={beam_size}], got {nbest!r}")
    k = beam_size
    device, batch = src_tokens.device, src_tokens.shape[0]
    state = start_decoding(model, src_tokens, max_rows=batch * k, max_steps=max_len, use_engine=use_engine)
    state.expand(torch.arange(batch, device=device).repeat_interleave(k))
    tokens = torch.full((batch * k, 1), bos_idx, dtype=torch.long, device=device)
    beam_scores = torch.full((batch, k), _NEG_INF, device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sentences = list(range(batch))  # sentence of each group of k live rows
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(batch)]

    for step in range(max_len):
        lprobs = state.next_log_probs(tokens[:, -1])
        if step == max_len - 1:  # out of room: only EOS may follow
            eos = lprobs[:, eos_idx].clone()
            lprobs.fill_(_NEG_INF)
            lprobs[:, eos_idx] = eos
        groups = len(sentences)
        candidates = (beam_scores.unsqueeze(2) + lprobs.view(groups, k, vocab)).view(groups, -1)
        top_scores, top_index = candidates.topk(2 * k, dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()

        keep_rows, next_tokens, next_scores, live = [], [], [], []
        for g, sentence in enumerate(sentences):
            chosen = []
            for rank, (score, index) in enumerate(zip(top_scores[g], top_index[g])):
                if score == _NEG_INF:
                    break
                beam, token = divmod(index, vocab)
                if token == eos_idx:
                    if rank < k and len(finished[sentence]) < k:
                        hypothesis = tokens[g * k + beam, 1:].tolist() + [eos_idx]
                        normalised = score / math.pow(step + 1, length_penalty)
                        finished[sentence].append((normalised, hypothesis))
                elif len(chosen) < k:
                    chosen.append((g * k + beam, token, score))
            # at max_len every live beam has just been finished with EOS; at max_len == 1 the k
            # beams are still identical, so a sentence ends there with a single hypothesis
            if len(finished[sentence]) >= k or step == max_len - 1:
                continue
            live.append(sentence)
            for row, token, score in chosen:
                keep_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if not live:
            break
        index = torch.tensor(keep_rows, device=device)
        tokens = torch.cat([tokens.index_select(0, index),
                            torch.tensor(next_tokens, device=device).unsqueeze(1)], dim=1)
        beam_scores = torch.tensor(next_scores, device=device).view(len(live), k)
        state.reorder(index)
        sentences = live

    # best first (sorted() is stable: equal scores keep the order they were finished in). A
    # sentence can hold fewer than nbest hypotheses only when max_len == 1 (one distinct beam):
    # the missing ones are all padding with score -inf
    ranked = [sorted(hyps, key=lambda h: -h[0])[:nbest] for hyps in finished]
    longest = max(len(h[1]) for r in ranked for h in r)
    out = torch.full((batch, nbest, longest), pad, dtype=torch.long, device=device)
    scores = torch.full((batch, nbest), _NEG_INF, device=device)
    for i, hyps in enumerate(ranked):
        for j, (score, hypothesis) in enumerate(hyps):
            out[i, j, :len(hypothesis)] = torch.tensor(hypothesis, device=device)
            scores[i, j] = score
    if nbest == 1:
        return out[:, 0], scores[:, 0]
    return out, scores
