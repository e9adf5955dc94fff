"""``generate`` / ``sample`` / ``stream``: the user-facing decoding calls shared by the engines.

An engine provides ``_start(input_ids, attention_mask, options, expand)``: validate the prompt,
run the prefill and return ``(session, logits [B * expand, V], B)``; this class picks the search
(greedy, sampling, beam) from the options and runs it. Options come from the export
(``config.json`` -> ``"generation"``), overridden by keyword arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .captured_search import captured_beam_search
from .exclusive import guard_of
from .options import GenerationOptions
from .sampling import make_generator
from .search import beam_search, collect_tokens, token_steps

# Steps between two host checks for "every row has finished" (each check is a sync that drains
# the queue of decode steps); on the CPU there is no queue, so it checks every step.
_CUDA_CHECK_EVERY = 8


class Started(NamedTuple):
    """What an engine's prefill hands to the search."""

    session: object       # search.DecodeSession
    logits: Tensor        # [B * expand, V] next-token logits of each row
    batch: int            # B prompts
    prompt_length: int    # tokens per row before the first new one, padding included (HF's count)


@dataclasses.dataclass
class GenerationOutput:
    """Result of :meth:`GenerativeModel.generate`.

    Attributes:
        tokens: ``[B * n, T]`` int64 new tokens (the prompt is not repeated), ``n`` =
            ``num_return_sequences``; rows that ended early are filled with ``pad_token_id``.
            ``T`` is where the longest row ended, at most ``max_new_tokens``.
        scores: ``[B * n]`` length-penalised log-probabilities (beam search), else None.
        beam_indices: ``[B * n, T]`` int32 beam row each token was appended to, -1 past the end
            (beam search), else None.
        step_scores: with ``output_scores=True``, per step the ``[rows, V]`` fp32 scores the
            token was chosen from (HF's ``scores``), else None.
    """

    tokens: Tensor
    scores: Optional[Tensor] = None
    beam_indices: Optional[Tensor] = None
    step_scores: Optional[Tuple[Tensor, ...]] = None


class GenerativeModel:
    """Mixin of the generating engines (``fi.Gpt``, ``fi.Transformer``)."""

    generation: GenerationOptions
    device: torch.device

    def _start(self, input_ids, attention_mask, options: GenerationOptions, expand: int) -> "Started":
        raise NotImplementedError

    def _options(self, overrides: dict) -> GenerationOptions:
        return self.generation.replace(**overrides)

    def generate(self, input_ids, attention_mask=None, *,
                 streamer: Optional[Callable[[Tensor], None]] = None, output_scores: bool = False,
                 **options) -> GenerationOutput:
        """Decode from the prompts ``input_ids`` with the exported options, overridden by ``options``.

        Args:
            input_ids: ``[B, L]`` token ids (tensor or rectangular list), ``B <= max_batch_size``.
            attention_mask: ``[B, L]`` 1 = token, 0 = padding (left, right or in between).
            streamer: called after every step with the ``[B]`` new tokens (a device tensor;
                calling ``.tolist()`` on it syncs). Greedy and sampling only.
            output_scores: also return the per-step scores (costs ``[rows, V]`` per step).
            **options: any :class:`GenerationOptions` field (``max_new_tokens``, ``do_sample``,
                ``top_k``, ``top_p``, ``temperature``, ``num_beams``, ``length_penalty``...).
        """
        opts = self._options(options)
        if opts.num_beams > 1 and streamer is not None:
            raise ValueError("streamer needs num_beams=1: beam hypotheses change until the end")
        # one call at a time: the cache and the graphs' static buffers are the engine's (see exclusive)
        with guard_of(self).hold(), torch.inference_mode():
            expand = opts.num_beams if opts.num_beams > 1 else opts.num_return_sequences
            session, logits, batch, prompt_length = self._start(input_ids, attention_mask, opts, expand)
            generator = make_generator(opts, logits.device)
            # recorded scores must stop exactly where the search does: check every step then
            check_every = _CUDA_CHECK_EVERY if logits.device.type == "cuda" and not output_scores else 1
            if opts.num_beams > 1:
                result = None if output_scores else captured_beam_search(
                    session, logits, opts, batch, prompt_length=prompt_length, fill_value=opts.pad,
                    check_every=check_every)
                if result is None:
                    result = beam_search(session, logits, opts, batch, generator, prompt_length=prompt_length,
                                         fill_value=opts.pad, check_every=check_every,
                                         record_scores=output_scores)
                return GenerationOutput(result.tokens, result.scores, result.beam_indices,
                                        tuple(result.step_scores) if output_scores else None)
            scores = []

            def on_step(step):
                if output_scores:
                    scores.append(step.scores)
                if streamer is not None:
                    streamer(step.tokens)

            tokens = collect_tokens(token_steps(session, logits, opts, generator, prompt_length),
                                    logits.shape[0], opts, logits.device, check_every=check_every,
                                    on_step=on_step)
            return GenerationOutput(tokens, step_scores=tuple(scores[: tokens.shape[1]])
                                    if output_scores else None)

    def sample(self, input_ids, attention_mask=None, **options) -> Tensor:
        """The new tokens ``[B * num_return_sequences, T]``: greedy unless the exported options or
        ``options`` say ``do_sample`` / ``num_beams`` (then the best hypotheses, best first)."""
        return self.generate(input_ids, attention_mask, **options).tokens

    def stream(self, input_ids, attention_mask=None, **options) -> Iterator[Tensor]:
        """Yield each step's ``[B * num_return_sequences]`` new tokens (on the CPU) as soon as they
        exist; stops when every row has produced an EOS or at ``max_new_tokens``. Until the
        iterator is exhausted or closed it holds the engine: calls from other threads wait, and
        a call from this thread raises ``RuntimeError``."""
        opts = self._options(options)
        if opts.num_beams > 1:
            raise ValueError("stream needs num_beams=1: beam hypotheses change until the end")
        # The engine is held from the first token until the iterator is exhausted or closed
        # (other threads' calls wait; this thread's raise). Inference mode is entered per step,
        # never held across a yield: it is thread state the caller's code between two tokens
        # must not inherit.
        with guard_of(self).hold():
            with torch.inference_mode():
                session, logits, _, prompt_length = self._start(input_ids, attention_mask, opts,
                                                                opts.num_return_sequences)
                steps = token_steps(session, logits, opts, make_generator(opts, logits.device), prompt_length)
            while True:
                with torch.inference_mode():
                    step = next(steps, None)
                    if step is None:
                        return
                    tokens, done = step.tokens.cpu(), opts.eos_token_id and not bool(step.unfinished.any())
                yield tokens
                if done:
                    return
