"""Fused transformer encoder layer: self-attention + FFN, pre- or post-LayerNorm."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._sublayers import FusedSublayers, check_hidden, check_padding_mask
from .config import LayerConfig


class TransformerEncoderLayer(FusedSublayers):
    """One encoder layer (BERT, RoBERTa, fairseq/BART encoders; GPT-2 blocks in training when
    ``config.causal``), built from the fused ops.

    Post-LN (``config.pre_layer_norm=False``)::

        x = LN_attn(x + dropout(SelfAttn(x)))
        x = LN_ffn(x + dropout(FFN(x)))

    Pre-LN::

        x = x + dropout(SelfAttn(LN_attn(x)))
        x = x + dropout(FFN(LN_ffn(x)))

    with ``FFN(x) = fc2(dropout_act(act(fc1(x))))`` and attention dropout on the probabilities.
    Parameters are listed in :class:`~fastpatch.layers._sublayers.FusedSublayers`.
    """

    def __init__(self, config: LayerConfig):
        if isinstance(config, LayerConfig) and config.cross_attention:
            raise ValueError("cross_attention: an encoder layer has no cross-attention; "
                             "use TransformerDecoderLayer")
        super().__init__(config)

    def forward(self, hidden_states: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            hidden_states: ``[B, L, H]``.
            key_padding_mask: bool ``[B, L]``, True marks padding (left or right padding).
            attn_mask: optional extra mask broadcastable to ``[B, heads, L, L]``: bool (True =
                may attend) or additive float.

        Returns:
            ``[B, L, H]``. Padded positions carry values that no real position depends on.
        """
        check_hidden("hidden_states", hidden_states, self.config.hidden_size)
        batch, length, _ = hidden_states.shape
        check_padding_mask("key_padding_mask", key_padding_mask, batch, length)

        def self_attention(h: Tensor):
            q, k, v = self.project_heads(h, self.qkv_weight, self.qkv_bias, 3)
            y = self._attend(q, k, v, self.attn_out_weight, key_padding_mask=key_padding_mask,
                             causal=self.config.causal, attn_mask=attn_mask)
            return y, self.attn_out_bias

        return self._run_blocks(hidden_states, [self_attention])

