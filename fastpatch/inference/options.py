"""Decoding options: one validated, JSON-serialisable record shared by every model and search.

An exported model carries its defaults (``config.json`` -> ``"generation"``); keyword arguments
of ``generate``/``sample`` override them per call. Names and semantics follow Hugging Face's
``GenerationConfig`` so that the same numbers give the same tokens (see ``search.py``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick the next token.

    Attributes:
        max_new_tokens: tokens generated per row at most (the prompt is not counted).
        min_new_tokens: EOS ids are barred until a row has generated this many tokens (HF's
            ``MinNewTokensLengthLogitsProcessor``; fairseq's ``--min-len``).
        do_sample: sample from the (warped) distribution instead of taking the best token(s).
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep the ``top_k`` most likely tokens when sampling (0 = no limit).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = all).
        num_beams: beam width; 1 is greedy / plain sampling.
        num_return_sequences: hypotheses returned per prompt (at most ``num_beams`` for beam
            search, any number for sampling, 1 for greedy).
        length_penalty: a finished beam scores ``sum(log p) / length ** length_penalty``.
        early_stopping: beam search stops a prompt when ``num_beams`` hypotheses are finished
            (True), when no running beam can beat them by a length heuristic (False, HF's
            default), or only at ``max_new_tokens`` with the optimistic bound ("never").
        eos_token_id: ids that end a row (empty: rows run to ``max_new_tokens``).
        pad_token_id: written after a row's end (default: the first EOS id, else 0).
        seed: seeds a private generator so sampling is reproducible regardless of the global
            RNG; None samples from PyTorch's default generator (``torch.manual_seed``).
        forced_bos_token_id: the first token of a sequence whose prompt is one token (BART's
            decoder start), as HF's ``ForcedBOSTokenLogitsProcessor``.
        forced_eos_token_id: ids forced at the last allowed position (HF's
            ``ForcedEOSTokenLogitsProcessor``; BART configs set it).
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    seed: Optional[int] = None
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Tuple[int, ...] = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("min_new_tokens", self.min_new_tokens, 0)
        _bool("do_sample", self.do_sample)
        set_("temperature", _float("temperature", self.temperature, positive=True))
        _int("top_k", self.top_k, 0)
        set_("top_p", _float("top_p", self.top_p, positive=True))
        if self.top_p > 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("num_beams", self.num_beams, 1)
        _int("num_return_sequences", self.num_return_sequences, 1)
        set_("length_penalty", _float("length_penalty", self.length_penalty))
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        set_("eos_token_id", _ids("eos_token_id", self.eos_token_id))
        set_("forced_eos_token_id", _ids("forced_eos_token_id", self.forced_eos_token_id))
        if self.pad_token_id is not None:
            _int("pad_token_id", self.pad_token_id, 0)
        if self.forced_bos_token_id is not None:
            _int("forced_bos_token_id", self.forced_bos_token_id, 0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ValueError("num_return_sequences must be 1 for greedy decoding "
                             f"(got {self.num_return_sequences}); use num_beams or do_sample")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= "
                             f"num_beams ({self.num_beams})")

    @property
    def pad(self) -> int:
        """The id written after a row's end."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    def replace(self, **overrides) -> "GenerationOptions":
        """A copy with ``overrides`` applied; an unknown name raises ``TypeError`` naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in overrides:
            if name not in known:
                raise TypeError(f"unexpected decoding option {name!r}; known options: "
                                f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["forced_eos_token_id"] = list(self.forced_eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationOptions":
        return cls().replace(**d)


def _int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _ids(name: str, value) -> Tuple[int, ...]:
    """None, an id or a sequence of ids, as a tuple."""
    if value is None:
        return ()
    ids = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    for token in ids:
        _int(name, token, 0)
    return ids


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _float(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)
