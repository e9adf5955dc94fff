"""``get_config`` with LightSeq's argument names, and its translation to fastpatch configs.

LightSeq users write ``LSTransformerEncoderLayer.get_config(model="bert-base", max_batch_tokens=
4096, max_seq_len=512, fp16=True, local_rank=0)``; the same call works here. Differences, all
in the direction of fewer surprises:

* ``max_batch_tokens`` / ``max_seq_len`` are hints: nothing is sized by them and larger batches
  and longer sequences run.
* ``fp16`` and ``local_rank`` are hints too: modules compute in their parameters' dtype (call
  ``.half()`` or use ``torch.autocast``, as for any module) and on their parameters' device; no
  process-wide ``torch.cuda.set_device`` happens at construction.
* ``activation_fn="gelu"`` is the exact (erf) GELU; ``"gelu_tanh"`` is the approximation
  LightSeq's kernels ran under the name ``"gelu"``.
* ``layer_norm_eps`` (default 1e-5, PyTorch's and fairseq's) is configurable.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional

from ..layers.config import EmbeddingConfig, LayerConfig

# LightSeq's presets (lightseq/training/ops/pytorch/util.py); unset fields fall back to
# LightSeq's base architecture.
_BASE = dict(hidden_size=512, intermediate_size=2048, nhead=8, attn_prob_dropout_ratio=0.0,
             activation_dropout_ratio=0.0, hidden_dropout_ratio=0.1, pre_layer_norm=True,
             activation_fn="relu")
MODEL_ARCH = {
    "transformer-base": dict(_BASE),
    "transformer-big": dict(_BASE, hidden_size=1024, intermediate_size=4096, nhead=16,
                            attn_prob_dropout_ratio=0.1, activation_dropout_ratio=0.1),
    "bert-base": dict(_BASE, hidden_size=768, intermediate_size=3072, nhead=12,
                      attn_prob_dropout_ratio=0.1, activation_dropout_ratio=0.1,
                      pre_layer_norm=False, activation_fn="gelu"),
    "bert-big": dict(_BASE, hidden_size=1024, intermediate_size=4096, nhead=16,
                     attn_prob_dropout_ratio=0.1, activation_dropout_ratio=0.1,
                     pre_layer_norm=False, activation_fn="gelu"),
}


@dataclass
class LSConfig:
    """The union of LightSeq's per-module config fields (each module reads the ones it needs
    and names any that is missing). Mutable, as LightSeq's configs are."""

    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    nhead: Optional[int] = None
    attn_prob_dropout_ratio: float = _BASE["attn_prob_dropout_ratio"]
    activation_dropout_ratio: float = _BASE["activation_dropout_ratio"]
    hidden_dropout_ratio: float = _BASE["hidden_dropout_ratio"]
    pre_layer_norm: bool = _BASE["pre_layer_norm"]
    activation_fn: str = _BASE["activation_fn"]
    layer_norm_eps: float = 1e-5
    # embedding / model / loss
    vocab_size: Optional[int] = None
    embedding_dim: Optional[int] = None
    padding_idx: Optional[int] = None
    dropout: Optional[float] = None  # embedding dropout; None = hidden_dropout_ratio
    epsilon: float = 0.0  # label smoothing of LSCrossEntropyLayer
    num_encoder_layer: Optional[int] = None
    num_decoder_layer: Optional[int] = None
    nlayer: Optional[int] = None  # LightSeq's decoder-layer count (its shared cross-attn K/V)
    # hints, accepted for compatibility; nothing is capped or sized by them
    max_batch_tokens: Optional[int] = None
    max_seq_len: Optional[int] = None
    fp16: bool = False
    local_rank: int = -1


# LayerConfig / EmbeddingConfig field -> the LightSeq argument it comes from, so that errors
# name what the user wrote.
_LS_NAMES = {
    "hidden_size": "hidden_size", "num_heads": "nhead", "ffn_size": "intermediate_size",
    "pre_layer_norm": "pre_layer_norm", "activation": "activation_fn",
    "layer_norm_eps": "layer_norm_eps", "attention_dropout": "attn_prob_dropout_ratio",
    "activation_dropout": "activation_dropout_ratio", "hidden_dropout": "hidden_dropout_ratio",
    "vocab_size": "vocab_size", "padding_idx": "padding_idx", "dropout": "dropout",
}
_FIELD = re.compile(r"\b(" + "|".join(sorted(_LS_NAMES, key=len, reverse=True)) + r")\b")


def _in_ls_terms(err: ValueError, **renames: str) -> ValueError:
    names = {**_LS_NAMES, **renames}
    return ValueError(_FIELD.sub(lambda m: names[m.group(1)], str(err)))


def _require(config: LSConfig, *names: str) -> None:
    missing = [n for n in names if getattr(config, n) is None]
    if missing:
        raise ValueError(f"config is missing {', '.join(missing)} (pass it to get_config or use "
                         f"model={'|'.join(MODEL_ARCH)})")


def _check_hint(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int (a hint; it caps nothing), got {value!r}")


def get_config(**kwargs) -> LSConfig:
    """A config from LightSeq's argument names; ``model=`` fills in a preset
    (``"transformer-base"``, ``"transformer-big"``, ``"bert-base"``, ``"bert-big"``) whose
    fields explicit arguments override. Raises ``ValueError`` naming a bad or unknown field."""
    model = kwargs.pop("model", None)
    if model is not None:
        if model not in MODEL_ARCH:
            raise ValueError(f"model must be one of {', '.join(MODEL_ARCH)}; got {model!r}")
        kwargs = {**MODEL_ARCH[model], **kwargs}
    fields = {f.name for f in dataclasses.fields(LSConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(fields)}")
    config = LSConfig(**kwargs)
    _check_hint("max_batch_tokens", config.max_batch_tokens)
    _check_hint("max_seq_len", config.max_seq_len)
    for name in ("num_encoder_layer", "num_decoder_layer", "nlayer"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(config.epsilon, (int, float)) or isinstance(config.epsilon, bool) \
            or not 0 <= config.epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {config.epsilon!r}")
    if config.embedding_dim is not None and config.hidden_size is not None \
            and config.embedding_dim != config.hidden_size:
        raise ValueError(f"embedding_dim ({config.embedding_dim}) must equal hidden_size "
                         f"({config.hidden_size})")
    if None not in (config.hidden_size, config.intermediate_size, config.nhead):
        layer_config(config)  # validate the layer fields now, not at the first forward
    if config.vocab_size is not None:
        embedding_config(config)
    return config


def layer_config(config: LSConfig, *, decoder: bool = False) -> LayerConfig:
    """The :class:`LayerConfig` of an encoder (or, with ``decoder``, a decoder) layer."""
    if not isinstance(config, LSConfig):
        raise TypeError(f"config must come from get_config, got {type(config).__name__}")
    _require(config, "hidden_size", "intermediate_size", "nhead")
    try:
        return LayerConfig(
            hidden_size=config.hidden_size, num_heads=config.nhead,
            ffn_size=config.intermediate_size, pre_layer_norm=config.pre_layer_norm,
            activation=config.activation_fn, layer_norm_eps=config.layer_norm_eps,
            attention_dropout=config.attn_prob_dropout_ratio,
            activation_dropout=config.activation_dropout_ratio,
            hidden_dropout=config.hidden_dropout_ratio, causal=decoder, cross_attention=decoder)
    except ValueError as err:
        raise _in_ls_terms(err) from err


def embedding_config(config: LSConfig) -> EmbeddingConfig:
    """LightSeq's embedding: ``sqrt(dim)``-scaled tokens + sinusoidal positions + dropout."""
    if not isinstance(config, LSConfig):
        raise TypeError(f"config must come from get_config, got {type(config).__name__}")
    dim = config.embedding_dim if config.embedding_dim is not None else config.hidden_size
    if dim is None:
        raise ValueError("config is missing embedding_dim (or hidden_size)")
    _require(config, "vocab_size", "padding_idx")
    dropout = config.hidden_dropout_ratio if config.dropout is None else config.dropout
    try:
        return EmbeddingConfig(vocab_size=config.vocab_size, hidden_size=dim,
                               padding_idx=config.padding_idx, positions="sinusoidal",
                               scale=math.sqrt(dim), dropout=dropout)
    except ValueError as err:
        raise _in_ls_terms(err, hidden_size="embedding_dim") from err
