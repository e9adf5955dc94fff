"""What the fused encoder and decoder layers share: parameters, sub-blocks, residual wiring.

A layer is a list of sub-blocks (self-attention, optional cross-attention, FFN). Each sub-block
returns its output *before* its final bias, so the bias add, dropout, residual add and the
LayerNorm run as one fused op:

* post-LN: ``x = LN_i(x + dropout(block_i(x) + b_i))``  (``bias_dropout_residual_layernorm``)
* pre-LN: ``h = LN_0(x)``; then ``x, h = x + dropout(block_i(h) + b_i), LN_{i+1}(...)`` per block
  (``bias_dropout_residual_prenorm``, which also yields the next block's normalised input), and
  the last block's residual add is left to PyTorch (there is no next LayerNorm to fuse with).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .config import LayerConfig
from .functional import LayerNormWeights, layer_norm, promote


def _cast(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """``t`` in ``like``'s dtype, for a bias that eager code adds inside ``nn.Linear`` (where
    autocast casts it to the GEMM's half precision)."""
    if t is None or t.dtype == like.dtype:
        return t
    return t.to(like.dtype)


def check_hidden(name: str, x, hidden_size: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name} must have shape [batch, seq, {hidden_size}], "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_padding_mask(name: str, mask, batch: int, length: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = padding), got {got}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [{batch}, {length}], got {tuple(mask.shape)}")


class FusedSublayers(nn.Module):
    """Base of the fused layers: owns the self-attention and FFN parameters (and the
    cross-attention ones when ``config.cross_attention``) as ordinary named parameters.

    Parameter layout (``H`` = hidden, ``F`` = FFN, ``E`` = encoder width):

    ========================  ============  ====================================================
    name                      shape         role
    ========================  ============  ====================================================
    qkv_weight / qkv_bias     [3H, H] [3H]  self-attention q, k, v projections, stacked
    attn_out_weight / _bias   [H, H] [H]    self-attention output projection
    attn_norm_weight / _bias  [H] [H]       LayerNorm of the self-attention sub-block
    cross_q_weight / _bias    [H, H] [H]    cross-attention query projection
    cross_kv_weight / _bias   [2H, E] [2H]  cross-attention k, v projections, stacked
    cross_out_weight / _bias  [H, H] [H]    cross-attention output projection
    cross_norm_weight / _bias [H] [H]       LayerNorm of the cross-attention sub-block
    fc1_weight / fc1_bias     [F, H] [F]    FFN in
    fc2_weight / fc2_bias     [H, F] [H]    FFN out
    ffn_norm_weight / _bias   [H] [H]       LayerNorm of the FFN sub-block
    ========================  ============  ====================================================

    Biases switched off in the config are absent (``None``), not zero.
    """

    def __init__(self, config: LayerConfig):
        super().__init__()
        if not isinstance(config, LayerConfig):
            raise TypeError(f"config must be a LayerConfig, got {type(config).__name__}")
        self.config = config
        #: head split through the ``split_heads`` kernel instead of views (see project_heads)
        self.split_heads_kernel = False
        h, f = config.hidden_size, config.ffn_size
        self.qkv_weight = self._param(3 * h, h)
        self.qkv_bias = self._param(3 * h) if config.qkv_bias else None
        self.attn_out_weight = self._param(h, h)
        self.attn_out_bias = self._param(h) if config.attn_out_bias else None
        self.attn_norm_weight, self.attn_norm_bias = self._param(h), self._param(h)
        if config.cross_attention:
            e = config.kv_input_size
            self.cross_q_weight = self._param(h, h)
            self.cross_q_bias = self._param(h) if config.qkv_bias else None
            self.cross_kv_weight = self._param(2 * h, e)
            self.cross_kv_bias = self._param(2 * h) if config.qkv_bias else None
            self.cross_out_weight = self._param(h, h)
            self.cross_out_bias = self._param(h) if config.attn_out_bias else None
            self.cross_norm_weight, self.cross_norm_bias = self._param(h), self._param(h)
        self.fc1_weight = self._param(f, h)
        self.fc1_bias = self._param(f) if config.fc1_bias else None
        self.fc2_weight = self._param(h, f)
        self.fc2_bias = self._param(h) if config.fc2_bias else None
        self.ffn_norm_weight, self.ffn_norm_bias = self._param(h), self._param(h)
        self.reset_parameters()

    def _param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=self.config.dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform projections (q/k/v with gain 1/sqrt(2), as fairseq's attention when they
        share a width), zero biases, unit LayerNorms. Adapters overwrite all of it anyway."""
        h = self.config.hidden_size
        for chunk in self.qkv_weight.view(3, h, h):
            nn.init.xavier_uniform_(chunk, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.attn_out_weight)
        weights = [self.fc1_weight, self.fc2_weight]
        if self.config.cross_attention:
            nn.init.xavier_uniform_(self.cross_q_weight, gain=1 / math.sqrt(2))
            for chunk in self.cross_kv_weight.view(2, h, -1):
                nn.init.xavier_uniform_(chunk, gain=1 / math.sqrt(2))
            weights.append(self.cross_out_weight)
        for w in weights:
            nn.init.xavier_uniform_(w)
        for name, p in self.named_parameters():
            if name.endswith("norm_weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, heads={c.num_heads}, ffn={c.ffn_size}, "
                f"{'pre' if c.pre_layer_norm else 'post'}-LN, {c.activation}, "
                f"eps={c.layer_norm_eps}, causal={c.causal}, cross_attention={c.cross_attention}")

    # ------------------------------------------------------------------------- sub-blocks
    def _dropout_p(self, p: float) -> float:
        return p if self.training else 0.0

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, *,
                key_padding_mask: Optional[Tensor], causal: bool,
                attn_mask: Optional[Tensor]) -> Tensor:
        """SDPA over ``[B, h, L, d]`` heads, heads merged, output projection without its bias."""
        c = self.config
        context = ops.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                attn_mask=attn_mask, dropout_p=self._dropout_p(c.attention_dropout),
                                training=self.training, scale=c.attention_scale)
        return F.linear(ops.merge_heads(context), out_weight)

    def project_heads(self, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      chunks: int) -> Tuple[Tensor, ...]:
        """``chunks`` head tensors ``[B, heads, L, head_dim]`` of the projection ``x @ weight^T``.

        By default the bias rides in the GEMM (cuBLAS adds it in its epilogue) and the heads are
        free strided views, which SDPA and the caches read as they are. With
        ``split_heads_kernel`` set, the GEMM runs without bias and ``ops.split_heads`` adds it
        while writing contiguous heads; ``benchmarks/bench_layers.py`` times both.
        """
        if self.split_heads_kernel:
            y = F.linear(x, weight)
            return ops.split_heads(y, _cast(bias, y), self.config.num_heads, chunks)
        y = F.linear(x, weight, bias)
        batch, length, _ = y.shape
        heads = y.view(batch, length, chunks, self.config.num_heads, self.config.head_dim)
        return heads.permute(2, 0, 3, 1, 4).unbind(0)

    def _ffn(self, h: Tensor, with_bias: bool) -> Tensor:
        """fc2(dropout(act(fc1(h)))), with fc2's bias only if ``with_bias`` (else the caller
        fuses it into the residual op)."""
        c = self.config
        inner = F.linear(h, self.fc1_weight)
        inner = ops.bias_activation_dropout(inner, _cast(self.fc1_bias, inner), c.activation,
                                            p=self._dropout_p(c.activation_dropout),
                                            training=self.training)
        return F.linear(inner, self.fc2_weight, self.fc2_bias if with_bias else None)

    # ---------------------------------------------------------------------- residual wiring
    # The residual ops promote their inputs to the widest dtype, as eager PyTorch would: under
    # autocast a half-precision GEMM output meets an fp32 residual stream and fp32 LayerNorm.
    def _input_norm(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return layer_norm(x, LayerNormWeights(weight, bias, self.config.layer_norm_eps))

    def _post_ln(self, y: Tensor, bias: Optional[Tensor], residual: Tensor,
                 norm_weight: Tensor, norm_bias: Tensor) -> Tensor:
        c = self.config
        y, bias, residual, norm_weight, norm_bias = promote(y, bias, residual, norm_weight,
                                                            norm_bias)
        return ops.bias_dropout_residual_layernorm(
            y, bias, residual, norm_weight, norm_bias, eps=c.layer_norm_eps,
            p=self._dropout_p(c.hidden_dropout), training=self.training)

    def _pre_ln(self, y: Tensor, bias: Optional[Tensor], residual: Tensor,
                next_norm_weight: Tensor, next_norm_bias: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns the new residual stream and its LayerNorm under the next block's norm."""
        c = self.config
        y, bias, residual, weight, ln_bias = promote(y, bias, residual, next_norm_weight,
                                                     next_norm_bias)
        return ops.bias_dropout_residual_prenorm(
            y, bias, residual, weight, ln_bias, eps=c.layer_norm_eps,
            p=self._dropout_p(c.hidden_dropout), training=self.training)

    def _last_pre_ln_residual(self, y_with_bias: Tensor, residual: Tensor) -> Tensor:
        p = self._dropout_p(self.config.hidden_dropout)
        return residual + F.dropout(y_with_bias, p, self.training)

    def _norms(self) -> List[Tuple[Tensor, Tensor]]:
        norms = [(self.attn_norm_weight, self.attn_norm_bias)]
        if self.config.cross_attention:
            norms.append((self.cross_norm_weight, self.cross_norm_bias))
        return norms + [(self.ffn_norm_weight, self.ffn_norm_bias)]

    def _run_blocks(self, x: Tensor, attention_blocks) -> Tensor:
        """Runs ``attention_blocks`` (callables ``h -> (y, bias)``) then the FFN, wired pre- or
        post-LN. The LayerNorm of block ``i`` is ``self._norms()[i]``."""
        norms = self._norms()
        if not self.config.pre_layer_norm:
            for block, (w, b) in zip(attention_blocks, norms):
                y, bias = block(x)
                x = self._post_ln(y, bias, x, w, b)
            y = self._ffn(x, with_bias=False)
            return self._post_ln(y, self.fc2_bias, x, *norms[-1])
        h = self._input_norm(x, *norms[0])
        for i, block in enumerate(attention_blocks):
            y, bias = block(h)
            x, h = self._pre_ln(y, bias, x, *norms[i + 1])
        return self._last_pre_ln_residual(self._ffn(h, with_bias=True), x)
