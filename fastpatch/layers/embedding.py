"""Fused transformer embedding: token + position (+ token type), scale, LayerNorm, dropout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .config import EmbeddingConfig


class TransformerEmbedding(nn.Module):
    """``dropout(LN?(scale * token[ids] + position[pos] + token_type[types]))`` in one kernel.

    Parameters: ``token_weight [V, H]``; ``position_weight [max_positions, H]`` for learned
    positions; ``token_type_weight [T, H]`` with token types; ``norm_weight``/``norm_bias [H]``
    with the LayerNorm. Sinusoidal positions (fairseq's formula) are computed on the fly, so
    they impose no length limit.

    Positions, unless given explicitly: fairseq's padding-aware numbering with
    ``config.fairseq_positions`` (pads get ``padding_idx``, real tokens ``padding_idx + 1 + k``),
    otherwise ``0, 1, ...``; both offset by ``start`` tokens already decoded.
    """

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        if not isinstance(config, EmbeddingConfig):
            raise TypeError(f"config must be an EmbeddingConfig, got {type(config).__name__}")
        self.config = config
        c, dt = config, config.dtype
        self.token_weight = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size, dtype=dt))
        self.position_weight = (nn.Parameter(torch.empty(c.max_positions, c.hidden_size, dtype=dt))
                                if c.positions == "learned" else None)
        self.token_type_weight = (nn.Parameter(torch.empty(c.type_vocab_size, c.hidden_size,
                                                           dtype=dt))
                                  if c.type_vocab_size else None)
        self.norm_weight = self.norm_bias = None
        if c.layer_norm:
            self.norm_weight = nn.Parameter(torch.empty(c.hidden_size, dtype=dt))
            self.norm_bias = nn.Parameter(torch.empty(c.hidden_size, dtype=dt))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq's: tables ``N(0, H^-0.5)`` with the padding rows zeroed; unit LayerNorm."""
        c = self.config
        for table in (self.token_weight, self.position_weight, self.token_type_weight):
            if table is not None:
                nn.init.normal_(table, mean=0.0, std=c.hidden_size ** -0.5)
        if c.padding_idx is not None:
            self.token_weight[c.padding_idx].zero_()
            if self.position_weight is not None and c.fairseq_positions \
                    and c.padding_idx < c.max_positions:
                self.position_weight[c.padding_idx].zero_()
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab={c.vocab_size}, hidden={c.hidden_size}, positions={c.positions}"
                f"{' (fairseq)' if c.fairseq_positions else ''}, scale={c.scale:g}, "
                f"layer_norm={c.layer_norm}, dropout={c.dropout}")

    def make_positions(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """The position ids the embedding uses for ``input_ids [B, L]`` after ``start`` tokens."""
        c = self.config
        if c.fairseq_positions:
            positions = ops.fairseq_positions(input_ids, c.padding_idx)
            return positions if start == 0 else positions + start * input_ids.ne(c.padding_idx)
        length = input_ids.shape[1]
        return torch.arange(start, start + length, device=input_ids.device).unsqueeze(0)

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, start: int = 0) -> Tensor:
        """
        Args:
            input_ids: ``[B, L]`` int64/int32 token ids.
            position_ids: ``[B, L]`` or ``[1, L]`` explicit positions (e.g. HF's, computed from a
                left-padded attention mask); default: see the class docstring.
            token_type_ids: ``[B, L]`` segment ids (default all 0 when the table exists).
            start: tokens already decoded before ``input_ids`` (incremental decoding).

        Returns:
            ``[B, L, H]`` in the parameters' dtype.
        """
        c = self.config
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = (tuple(input_ids.shape) if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {got}")
        if c.positions == "none":
            if position_ids is not None:
                raise ValueError("position_ids was given but the embedding has no positions "
                                 "(config.positions='none')")
        elif position_ids is None:
            position_ids = self.make_positions(input_ids, start)
        if self.token_type_weight is not None and token_type_ids is None:
            token_type_ids = torch.zeros(1, input_ids.shape[1], dtype=torch.int64,
                                         device=input_ids.device)
        return ops.transformer_embedding(
            input_ids, self.token_weight, position_ids=position_ids,
            position_weight=self.position_weight, sinusoidal=c.positions == "sinusoidal",
            padding_idx=c.padding_idx if c.fairseq_positions else None,
            token_type_ids=token_type_ids, token_type_weight=self.token_type_weight,
            scale=c.scale, ln_weight=self.norm_weight, ln_bias=self.norm_bias,
            eps=c.layer_norm_eps, p=c.dropout if self.training else 0.0, training=self.training,
            token_padding_idx=c.padding_idx)
