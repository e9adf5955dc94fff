"""Greedy and beam-search decoding for :class:`~fastpatch.training.LSTransformer`.

Both decode incrementally with one :class:`~fastpatch.layers.KVCache` per decoder layer and
drop finished sentences from the batch as they go (``KVCache.reorder_`` with a shrinking
index). The bookkeeping is eager Python, as in fairseq's generator; the graph-captured engine for
serving lives in ``fastpatch.inference``.
"""
from __future__ import annotations

import math
from typing import List, Tuple

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


def _next_log_probs(model, last_tokens, encoder_out, mask, caches, step) -> Tensor:
    """fp32 log-probabilities ``[rows, V]`` of the next token; padding is never generated."""
    logits = model.decoder.decode(last_tokens, encoder_out, mask, caches, step)[:, -1]
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    lprobs[:, model.config.padding_idx] = _NEG_INF
    return lprobs


def _shrink(index: Tensor, encoder_out: Tensor, mask: Tensor, caches: List[KVCache]):
    for cache in caches:
        cache.reorder_(index)
    return encoder_out.index_select(0, index), mask.index_select(0, index)


def greedy_search(model, src_tokens: Tensor, *, eos_idx: int, bos_idx: int,
                  max_len: int) -> Tuple[Tensor, Tensor]:
    """Most likely next token at every step, until EOS or ``max_len`` tokens.

    Returns ``(tokens [B, T], scores [B])``: tokens after EOS are ``padding_idx``; a score is the
    sum of the chosen tokens' log-probabilities.
    """
    _check_args(model, src_tokens, eos_idx, bos_idx, max_len)
    pad = model.config.padding_idx
    encoder_out, mask = model.encoder.encode(src_tokens)
    batch, device = src_tokens.shape[0], src_tokens.device
    caches = [KVCache() for _ in model.decoder.layers]
    out = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    rows = torch.arange(batch, device=device)  # original row of each active row
    last = torch.full((batch, 1), bos_idx, dtype=torch.long, device=device)
    length = 0
    for step in range(max_len):
        lprobs = _next_log_probs(model, last, encoder_out, mask, caches, step)
        best, token = lprobs.max(dim=-1)
        out[rows, step] = token
        scores[rows] += best
        length = step + 1
        running = token.ne(eos_idx)
        if not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(1)
            encoder_out, mask = _shrink(keep, encoder_out, mask, caches)
            rows, token = rows[keep], token[keep]
        last = token.unsqueeze(1)
    return out[:, :length], scores


def beam_search(model, src_tokens: Tensor, *, beam_size: int, eos_idx: int, bos_idx: int,
                max_len: int, length_penalty: float = 1.0,
                nbest: int = 1) -> Tuple[Tensor, Tensor]:
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
    encoder_out, mask = model.encoder.encode(src_tokens)
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    encoder_out, mask = encoder_out.index_select(0, expand), mask.index_select(0, expand)
    caches = [KVCache() for _ in model.decoder.layers]
    tokens = torch.full((batch * k, 1), bos_idx, dtype=torch.long, device=device)
    beam_scores = torch.full((batch, k), _NEG_INF, device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sentences = list(range(batch))  # sentence of each group of k live rows
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(batch)]

    for step in range(max_len):
        lprobs = _next_log_probs(model, tokens[:, -1:], encoder_out, mask, caches, step)
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
            if len(finished[sentence]) >= k:
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
        encoder_out, mask = _shrink(index, encoder_out, mask, caches)
        sentences = live

    # best first (sorted() is stable: equal scores keep the order they were finished in); every
    # sentence has beam_size finished hypotheses, as max_len finishes all live beams
    ranked = [sorted(hyps, key=lambda h: -h[0])[:nbest] for hyps in finished]
    longest = max(len(h[1]) for r in ranked for h in r)
    out = torch.full((batch, nbest, longest), pad, dtype=torch.long, device=device)
    scores = torch.empty(batch, nbest, device=device)
    for i, hyps in enumerate(ranked):
        for j, (score, hypothesis) in enumerate(hyps):
            out[i, j, :len(hypothesis)] = torch.tensor(hypothesis, device=device)
            scores[i, j] = score
    if nbest == 1:
        return out[:, 0], scores[:, 0]
    return out, scores
