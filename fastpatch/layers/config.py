"""The one dataclass that describes a fused transformer layer (and the one for the embedding).

Every knob a model family uses lives here, so an adapter's job is to fill it in from the
framework's own config and refuse (with the field's name) what it cannot express. Nothing here
caps batch size or sequence length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.activations import ACTIVATION_CODES, canonical_activation

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_dropout(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_dtype(name: str, value) -> None:
    if value is not None and value not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be None or one of {', '.join(map(str, _FLOAT_DTYPES))}; "
                         f"got {value!r}")


@dataclass(frozen=True)
class LayerConfig:
    """A pre- or post-LN transformer layer (encoder, decoder, or decoder-only block).

    Attributes:
        hidden_size: model width H.
        num_heads: attention heads; must divide ``hidden_size``.
        ffn_size: inner width of the feed-forward block.
        pre_layer_norm: LayerNorm before each sub-block (fairseq ``normalize_before``, GPT-2) instead
            of after the residual add (BERT, BART, original Transformer).
        activation: ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``; framework
            aliases (``"gelu_new"``, ``"swish"``, ...) are normalised, anything else is refused.
        layer_norm_eps: eps of every LayerNorm in the layer.
        attention_dropout: dropout on the attention probabilities.
        activation_dropout: dropout after the FFN activation (fairseq's ``activation_dropout``).
        hidden_dropout: dropout on each sub-block's output before the residual add.
        causal: causal self-attention (decoders, GPT-2).
        cross_attention: the layer also attends to an encoder output (encoder-decoder decoders).
        encoder_hidden_size: width of that encoder output (None = ``hidden_size``).
        qkv_bias / attn_out_bias / fc1_bias / fc2_bias: whether each projection has a bias; the
            two attention flags apply to the cross-attention projections as well.
        attention_scale: factor on ``q @ k^T`` (None = ``head_dim ** -0.5``); GPT-2's
            ``scale_attn_by_inverse_layer_idx`` and unscaled attention are expressed through it.
        dtype: dtype the parameters are created in (None = PyTorch's default).
    """

    hidden_size: int
    num_heads: int
    ffn_size: int
    pre_layer_norm: bool = False
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    hidden_dropout: float = 0.0
    causal: bool = False
    cross_attention: bool = False
    encoder_hidden_size: Optional[int] = None
    qkv_bias: bool = True
    attn_out_bias: bool = True
    fc1_bias: bool = True
    fc2_bias: bool = True
    attention_scale: Optional[float] = None
    dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_heads", self.num_heads, 1)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        _check_int("ffn_size", self.ffn_size, 1)
        for name in ("pre_layer_norm", "causal", "cross_attention", "qkv_bias", "attn_out_bias",
                     "fc1_bias", "fc2_bias"):
            _check_bool(name, getattr(self, name))
        activation = canonical_activation(self.activation)
        if activation is None:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_CODES)} (or a known "
                             f"alias such as 'gelu_new', 'swish'); got {self.activation!r}")
        object.__setattr__(self, "activation", activation)  # frozen: normalise the alias once
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)
        for name in ("attention_dropout", "activation_dropout", "hidden_dropout"):
            _check_dropout(name, getattr(self, name))
        if self.encoder_hidden_size is not None:
            _check_int("encoder_hidden_size", self.encoder_hidden_size, 1)
            if not self.cross_attention:
                raise ValueError("encoder_hidden_size is set but cross_attention is False")
        if self.attention_scale is not None:
            _check_positive_float("attention_scale", self.attention_scale)
        _check_dtype("dtype", self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_input_size(self) -> int:
        """Width of the tensor the cross-attention keys and values are projected from."""
        return self.encoder_hidden_size or self.hidden_size

    def replace(self, **changes) -> "LayerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_POSITION_KINDS = ("learned", "sinusoidal", "none")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Token + position (+ token type) embedding, scale, optional LayerNorm, dropout.

    Attributes:
        vocab_size / hidden_size: token table shape ``[vocab_size, hidden_size]``.
        padding_idx: the padding token. With ``fairseq_positions`` it also numbers positions the
            fairseq way (pads get position ``padding_idx``, real tokens ``padding_idx + 1, ...``);
            the token table's row ``padding_idx`` gets no gradient, as ``nn.Embedding``'s.
        positions: ``"learned"`` (a table of ``max_positions`` rows), ``"sinusoidal"`` (fairseq's
            formula, computed on the fly: no length cap) or ``"none"``.
        max_positions: rows of the learned position table (for fairseq-style positions include
            the ``padding_idx + 1`` offset, as fairseq's table does). Ignored for sinusoidal.
        fairseq_positions: padding-aware positions as fairseq and RoBERTa compute them; otherwise
            positions are ``0, 1, ...`` (offset by the decoding step), as BERT and GPT-2 use.
        type_vocab_size: rows of the token-type table (0 = no token types).
        scale: factor on the token embedding (fairseq: ``sqrt(hidden_size)``; HF: 1).
        layer_norm: apply a LayerNorm after the sum (BERT, fairseq ``layernorm_embedding``).
        layer_norm_eps, dropout, dtype: as in :class:`LayerConfig`.
    """

    vocab_size: int
    hidden_size: int
    padding_idx: Optional[int] = None
    positions: str = "sinusoidal"
    max_positions: int = 0
    fairseq_positions: bool = False
    type_vocab_size: int = 0
    scale: float = 1.0
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        if self.padding_idx is not None:
            _check_int("padding_idx", self.padding_idx, 0)
            if self.padding_idx >= self.vocab_size:
                raise ValueError(f"padding_idx ({self.padding_idx}) must be < vocab_size "
                                 f"({self.vocab_size})")
        if self.positions not in _POSITION_KINDS:
            raise ValueError(f"positions must be one of {', '.join(_POSITION_KINDS)}; "
                             f"got {self.positions!r}")
        _check_int("max_positions", self.max_positions, 0)
        if self.positions == "learned" and self.max_positions < 1:
            raise ValueError("max_positions must be >= 1 for learned positions")
        _check_bool("fairseq_positions", self.fairseq_positions)
        if self.fairseq_positions and self.padding_idx is None:
            raise ValueError("fairseq_positions needs padding_idx")
        if self.fairseq_positions and self.positions == "none":
            raise ValueError("fairseq_positions is set but positions is 'none'")
        _check_int("type_vocab_size", self.type_vocab_size, 0)
        _check_positive_float("scale", self.scale)
        _check_bool("layer_norm", self.layer_norm)
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)
        _check_dropout("dropout", self.dropout)
        _check_dtype("dtype", self.dtype)

    def replace(self, **changes) -> "EmbeddingConfig":
        return dataclasses.replace(self, **changes)
