"""Fused transformer embedding: token gather, scale, positions, token types, LayerNorm, dropout.

    out = dropout(LayerNorm?(scale * token_weight[input_ids] + pos + token_type_weight[token_type_ids]))

covers BERT/RoBERTa (learned positions and token types, LayerNorm) and fairseq's transformer
(``sqrt(H)`` scale, sinusoidal positions, no LayerNorm) in one kernel each way. Eager PyTorch runs
up to eight kernels and keeps the pre-norm sum for LayerNorm's backward. The fused forward keeps
8 bytes a row (LayerNorm mean and rstd) and the dropout mask; backward gathers the rows again to
rebuild the pre-norm sum in fp32, which costs less than storing it.

Sinusoidal positions are fairseq's ``SinusoidalPositionalEmbedding``, computed from the position
ids on the fly (no table, hence no maximum length). Table gradients accumulate in fp32 (repeated
ids add up) and are cast to the weight dtype at the end.

Out-of-range ids raise ``ValueError`` naming the argument on the CPU. On CUDA the kernel traps
with a device-side assert instead, as ``nn.Embedding`` does there: a host-side check would
synchronise on every call and break CUDA-graph capture.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd_utils import accumulation_dtype, contiguous_or_none
from ._checks import check_index_tensor, check_like, check_positive, check_probability, check_tensor
from ._dispatch import FusedOp, kernel_for

_EMPTY = (0,)


def _sinusoid(position_ids: Tensor, dim: int, padding_idx: Optional[int]) -> Tensor:
    """fairseq's sinusoidal embedding of ``position_ids`` (``[...]`` ints) -> ``[..., dim]`` fp32.

    fp32 like fairseq's table: ``freq_k = exp(-k * log(10000) / (dim // 2 - 1))``, row =
    ``cat(sin(pos * freq), cos(pos * freq))`` (+ a zero column if ``dim`` is odd), and the rows
    where ``position_ids == padding_idx`` are zero.
    """
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=position_ids.device) * -step)
    angle = position_ids.to(torch.float32).unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    if padding_idx is not None:
        emb = emb.masked_fill((position_ids == padding_idx).unsqueeze(-1), 0.0)
    return emb


def sinusoidal_table(num_positions: int, dim: int, padding_idx: Optional[int] = None) -> Tensor:
    """fairseq's ``SinusoidalPositionalEmbedding.get_embedding``: ``[num_positions, dim]`` fp32.

    The fused op never builds it; it is here for adapters (and tests) that want fairseq's table.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ValueError(f"dim must be an int >= 4 (fairseq divides by dim // 2 - 1), got {dim!r}")
    if isinstance(num_positions, bool) or not isinstance(num_positions, int) or num_positions < 0:
        raise ValueError(f"num_positions must be an int >= 0, got {num_positions!r}")
    _check_index_value("padding_idx", padding_idx)
    return _sinusoid(torch.arange(num_positions), dim, padding_idx)


def fairseq_positions(input_ids: Tensor, padding_idx: int) -> Tensor:
    """fairseq/RoBERTa ``make_positions``: ``[B, L]`` ids -> ``[B, L]`` int64 positions.

    Non-padding tokens are numbered ``padding_idx + 1, padding_idx + 2, ...`` in order along each
    row and padding tokens get ``padding_idx``, so left and right padding both work.
    """
    check_index_tensor("input_ids", input_ids, "input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    _check_index_value("padding_idx", padding_idx, required=True)
    mask = input_ids.ne(padding_idx)
    return torch.cumsum(mask, dim=1, dtype=torch.int64) * mask + padding_idx


# ------------------------------------------------------------------------------ reference path
def _pre_norm(input_ids, token_weight, position_ids, position_weight, token_type_ids,
              token_type_weight, sinusoidal, padding_idx, scale) -> Tensor:
    """``scale * tok + pos + type`` in the accumulation dtype, ``[B, L, H]``."""
    compute = accumulation_dtype(token_weight.dtype)
    x = F.embedding(input_ids, token_weight).to(compute) * scale
    if position_weight is not None:
        x = x + F.embedding(position_ids, position_weight).to(compute)
    elif sinusoidal:
        x = x + _sinusoid(position_ids, token_weight.shape[1], padding_idx).to(compute)
    if token_type_weight is not None:
        x = x + F.embedding(token_type_ids, token_type_weight).to(compute)
    return x


def _reference_forward(input_ids, token_weight, position_ids, position_weight, token_type_ids,
                       token_type_weight, ln_weight, ln_bias, sinusoidal, padding_idx, scale, eps,
                       p):
    x = _pre_norm(input_ids, token_weight, position_ids, position_weight, token_type_ids,
                  token_type_weight, sinusoidal, padding_idx, scale)
    stats = x.new_empty(_EMPTY)
    if ln_weight is not None:
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + eps)
        x = (x - mean) * rstd * ln_weight.to(x.dtype)
        if ln_bias is not None:
            x = x + ln_bias.to(x.dtype)
        stats = torch.cat([mean, rstd], dim=-1)
    if p > 0.0:
        mask = (torch.rand(x.shape, device=x.device) >= p).to(torch.uint8)
        x = x * mask.to(x.dtype) * (1.0 / (1.0 - p))
    else:
        mask = x.new_empty(_EMPTY, dtype=torch.uint8)
    return x.to(token_weight.dtype), mask, stats


def _table_grad(grad_rows: Tensor, ids: Tensor, weight: Tensor, skip: Optional[int]) -> Tensor:
    """Sum of ``grad_rows`` ([B, L, H], accumulation dtype) into a table shaped like ``weight``."""
    acc = grad_rows.new_zeros(weight.shape)
    acc.index_add_(0, ids.reshape(-1), grad_rows.reshape(-1, weight.shape[1]))
    if skip is not None:
        acc[skip] = 0.0
    return acc.to(weight.dtype)


def _reference_backward(grad_out, mask, stats, input_ids, token_weight, position_ids,
                        position_weight, token_type_ids, token_type_weight, ln_weight, ln_bias,
                        sinusoidal, padding_idx, token_padding_idx, scale, p, need_token,
                        need_position, need_type, need_ln):
    compute = accumulation_dtype(token_weight.dtype)
    hidden = token_weight.shape[1]
    g = grad_out.to(compute)
    if p > 0.0:
        g = g * mask.to(compute) * (1.0 / (1.0 - p))
    grad_ln_w = grad_ln_b = None
    if ln_weight is not None:
        x = _pre_norm(input_ids, token_weight, position_ids, position_weight, token_type_ids,
                      token_type_weight, sinusoidal, padding_idx, scale)
        mean, rstd = stats[..., :1], stats[..., 1:]
        xhat = (x - mean) * rstd
        if need_ln:
            grad_ln_w = (g * xhat).reshape(-1, hidden).sum(0).to(ln_weight.dtype)
            if ln_bias is not None:
                grad_ln_b = g.reshape(-1, hidden).sum(0).to(ln_bias.dtype)
        d = g * ln_weight.to(compute)
        g = rstd * (d - d.mean(-1, keepdim=True) - xhat * (d * xhat).mean(-1, keepdim=True))
    grad_tok = _table_grad(g * scale, input_ids, token_weight, token_padding_idx) if need_token else None
    grad_pos = (_table_grad(g, position_ids, position_weight, padding_idx)
                if need_position and position_weight is not None else None)
    grad_type = (_table_grad(g, token_type_ids, token_type_weight, None)
                 if need_type and token_type_weight is not None else None)
    # a fresh empty tensor per absent gradient: custom-op outputs must not alias each other
    return tuple(token_weight.new_empty(_EMPTY) if grad is None else grad
                 for grad in (grad_tok, grad_pos, grad_type, grad_ln_w, grad_ln_b))


# -------------------------------------------------------------------------------- custom ops
def _forward(input_ids: Tensor, token_weight: Tensor,
                             position_ids: Optional[Tensor], position_weight: Optional[Tensor],
                             token_type_ids: Optional[Tensor],
                             token_type_weight: Optional[Tensor], ln_weight: Optional[Tensor],
                             ln_bias: Optional[Tensor], sinusoidal: bool,
                             padding_idx: Optional[int], token_padding_idx: Optional[int],
                             scale: float, eps: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out [B, L, H], keep_mask, stats)``.

    ``keep_mask`` is uint8 ``[B, L, H]`` (empty when p == 0); ``stats`` is ``[B, L, 2]`` LayerNorm
    (mean, rstd) in fp32 (fp64 for fp64 weights; empty without LayerNorm). Index tensors are
    ``[B, L]`` (position/type ids may be expanded views). ``token_padding_idx`` only matters to
    backward; it is an input so that autograd sees it.
    """
    kernel = kernel_for("embedding_fwd", input_ids, token_weight, position_ids, position_weight,
                        token_type_ids, token_type_weight, ln_weight, ln_bias)
    if kernel is not None:
        return kernel(input_ids, token_weight.contiguous(), position_ids,
                      contiguous_or_none(position_weight), token_type_ids, contiguous_or_none(token_type_weight),
                      contiguous_or_none(ln_weight), contiguous_or_none(ln_bias), sinusoidal, padding_idx, scale,
                      eps, p)
    return _reference_forward(input_ids, token_weight, position_ids, position_weight,
                              token_type_ids, token_type_weight, ln_weight, ln_bias, sinusoidal,
                              padding_idx, scale, eps, p)


def _forward_fake(input_ids, token_weight, position_ids, position_weight, token_type_ids, token_type_weight,
      ln_weight, ln_bias, sinusoidal, padding_idx, token_padding_idx, scale, eps, p):
    shape = (*input_ids.shape, token_weight.shape[1])
    out = token_weight.new_empty(shape)
    mask = token_weight.new_empty(shape if p > 0.0 else _EMPTY, dtype=torch.uint8)
    stats = token_weight.new_empty((*input_ids.shape, 2) if ln_weight is not None else _EMPTY,
                                   dtype=accumulation_dtype(token_weight.dtype))
    return out, mask, stats


def _backward(
        grad_out: Tensor, mask: Tensor, stats: Tensor, input_ids: Tensor, token_weight: Tensor,
        position_ids: Optional[Tensor], position_weight: Optional[Tensor],
        token_type_ids: Optional[Tensor], token_type_weight: Optional[Tensor],
        ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], sinusoidal: bool,
        padding_idx: Optional[int], token_padding_idx: Optional[int], scale: float, p: float,
        need_token: bool, need_position: bool, need_type: bool,
        need_ln: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (token_weight, position_weight, token_type_weight, ln_weight, ln_bias); each
    one not asked for (``need_*``) or absent is an empty tensor."""
    kernel = kernel_for("embedding_bwd", grad_out, input_ids, token_weight, position_ids,
                        position_weight, token_type_ids, token_type_weight, ln_weight, ln_bias)
    if kernel is not None:
        return kernel(grad_out.contiguous(), mask, stats, input_ids, token_weight.contiguous(),
                      position_ids, contiguous_or_none(position_weight), token_type_ids,
                      contiguous_or_none(token_type_weight), contiguous_or_none(ln_weight), contiguous_or_none(ln_bias),
                      sinusoidal, padding_idx, token_padding_idx, scale, p, need_token,
                      need_position, need_type, need_ln)
    return _reference_backward(grad_out, mask, stats, input_ids, token_weight, position_ids,
                               position_weight, token_type_ids, token_type_weight, ln_weight,
                               ln_bias, sinusoidal, padding_idx, token_padding_idx, scale, p,
                               need_token, need_position, need_type, need_ln)


def _backward_fake(grad_out, mask, stats, input_ids, token_weight, position_ids, position_weight,
      token_type_ids, token_type_weight, ln_weight, ln_bias, sinusoidal, padding_idx,
      token_padding_idx, scale, p, need_token, need_position, need_type, need_ln):
    def grad_of(weight, needed):
        if needed and weight is not None:
            return torch.empty_like(weight, memory_format=torch.contiguous_format)
        return token_weight.new_empty(_EMPTY)

    return (grad_of(token_weight, need_token), grad_of(position_weight, need_position),
            grad_of(token_type_weight, need_type), grad_of(ln_weight, need_ln),
            grad_of(ln_bias, need_ln))


# Positions of the differentiable inputs of transformer_embedding_op.
_TOKEN, _POSITION, _TYPE, _LN_W, _LN_B = 1, 3, 5, 6, 7
_NUM_INPUTS = 14


def _setup_context(ctx, inputs, output):
    (input_ids, token_weight, position_ids, position_weight, token_type_ids, token_type_weight,
     ln_weight, ln_bias, sinusoidal, padding_idx, token_padding_idx, scale, _eps, p) = inputs
    _, mask, stats = output
    ctx.save_for_backward(input_ids, token_weight, position_ids, position_weight, token_type_ids,
                          token_type_weight, ln_weight, ln_bias, mask, stats)
    ctx.sinusoidal, ctx.padding_idx, ctx.token_padding_idx = sinusoidal, padding_idx, token_padding_idx
    ctx.scale, ctx.p = scale, p


def _backward_formula(ctx, backward, grad_out, _grad_mask, _grad_stats):
    (input_ids, token_weight, position_ids, position_weight, token_type_ids, token_type_weight,
     ln_weight, ln_bias, mask, stats) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_ln = needs[_LN_W] or needs[_LN_B]
    grads = backward(
        grad_out, mask, stats, input_ids, token_weight, position_ids, position_weight,
        token_type_ids, token_type_weight, ln_weight, ln_bias, ctx.sinusoidal, ctx.padding_idx,
        ctx.token_padding_idx, ctx.scale, ctx.p, needs[_TOKEN], needs[_POSITION], needs[_TYPE],
        need_ln)
    result = [None] * _NUM_INPUTS
    for index, grad in zip((_TOKEN, _POSITION, _TYPE, _LN_W, _LN_B), grads):
        if needs[index]:
            result[index] = grad
    return tuple(result)


transformer_embedding_op = FusedOp("transformer_embedding", _forward, _forward_fake, _backward,
                                  _backward_fake, _setup_context, _backward_formula)


# ------------------------------------------------------------------------------- public API
def _check_index_value(name: str, value, required: bool = False) -> None:
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{'' if required else ' or None'}, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_ids(name: str, ids, input_ids: Tensor, table_name: str, table: Optional[Tensor]) -> Tensor:
    """Validates ``ids`` against ``input_ids`` ([B, L]; [1, L] or [B, 1] broadcast too) and
    returns it expanded to ``input_ids``' shape (a view)."""
    check_index_tensor(name, ids, "input_ids", input_ids)
    if ids.dim() != 2 or any(n not in (1, m) for n, m in zip(ids.shape, input_ids.shape)):
        raise ValueError(f"{name} must have shape {tuple(input_ids.shape)} or broadcast to it, "
                         f"got {tuple(ids.shape)}")
    if table is not None:
        _check_range(name, ids, table_name, table.shape[0])
    return ids.expand(input_ids.shape)


def _check_range(name: str, ids: Tensor, table_name: str, rows: int) -> None:
    # Only on the CPU, where reading the values costs no device synchronisation; under
    # torch.compile the values are unknown at trace time (F.embedding still raises at run time).
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        raise ValueError(f"{name} must be in [0, {rows}) ({table_name} has {rows} rows), "
                         f"got values in [{low}, {high}]")


def _check_table(name: str, weight, token_weight: Tensor) -> None:
    if weight is None:
        return
    check_tensor(name, weight, ndim=2)
    check_like(name, weight, "token_weight", token_weight)
    if weight.shape[1] != token_weight.shape[1]:
        raise ValueError(f"{name} must have token_weight's hidden size {token_weight.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")


def transformer_embedding(input_ids: Tensor, token_weight: Tensor, *,
                          position_ids: Optional[Tensor] = None,
                          position_weight: Optional[Tensor] = None, sinusoidal: bool = False,
                          padding_idx: Optional[int] = None,
                          token_type_ids: Optional[Tensor] = None,
                          token_type_weight: Optional[Tensor] = None, scale: float = 1.0,
                          ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                          eps: float = 1e-5, p: float = 0.0, training: bool = True,
                          token_padding_idx: Optional[int] = None) -> Tensor:
    """``dropout(LayerNorm?(scale * token_weight[input_ids] + pos + token_type_weight[token_type_ids]))``.

    Args:
        input_ids: ``[B, L]`` int64/int32 token ids in ``[0, V)``.
        token_weight: ``[V, H]`` fp32/fp16/bf16 (fp64 runs the reference path, for gradcheck);
            the other tables and LayerNorm parameters share its dtype and device.
        position_ids: ``[B, L]`` (or ``[1, L]``, broadcast) positions; None for no positions.
            :func:`fairseq_positions` gives fairseq/RoBERTa's padding-aware positions.
        position_weight: ``[P, H]`` learned position table (BERT, RoBERTa). Its ``padding_idx``
            row gets no gradient, as with fairseq's/HF RoBERTa's ``nn.Embedding(padding_idx=...)``.
        sinusoidal: fairseq's sinusoidal positions, computed from ``position_ids`` (any value,
            no table); rows where ``position_ids == padding_idx`` are zero. Needs ``H >= 4``.
        padding_idx: the padding position (fairseq's ``padding_idx``), or None.
        token_type_ids: ``[B, L]`` (or ``[1, L]``) segment ids, with ``token_type_weight`` ``[T, H]``.
        scale: multiplies the token embedding only (fairseq's ``embed_scale``, ``sqrt(H)``).
        ln_weight, ln_bias: ``[H]`` LayerNorm affine parameters; LayerNorm runs iff ``ln_weight``
            is given (``ln_bias`` optional). Statistics in fp32, biased variance, ``eps``.
        p: dropout probability in [0, 1); ignored unless ``training``.
        token_padding_idx: row of ``token_weight`` that gets no gradient, as
            ``nn.Embedding(padding_idx=...)``; negative counts from the end. The forward still
            reads that row.

    Returns:
        ``[B, L, H]`` with ``token_weight``'s dtype.
    """
    check_tensor("token_weight", token_weight, ndim=2)
    vocab, hidden = token_weight.shape
    if hidden == 0:
        raise ValueError("token_weight must have a hidden size >= 1, got shape "
                         f"{tuple(token_weight.shape)}")
    check_index_tensor("input_ids", input_ids, "token_weight", token_weight)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    _check_range("input_ids", input_ids, "token_weight", vocab)
    if not isinstance(sinusoidal, bool):
        raise TypeError(f"sinusoidal must be a bool, got {type(sinusoidal).__name__}")
    _check_table("position_weight", position_weight, token_weight)
    _check_table("token_type_weight", token_type_weight, token_weight)
    _check_index_value("padding_idx", padding_idx)
    if position_weight is not None and sinusoidal:
        raise ValueError("position_weight and sinusoidal=True are exclusive: pick learned or "
                         "sinusoidal positions")
    if sinusoidal and hidden < 4:
        raise ValueError(f"sinusoidal positions need a hidden size >= 4 (fairseq divides by "
                         f"H // 2 - 1); token_weight has {hidden}")
    if position_ids is None:
        if position_weight is not None or sinusoidal:
            raise ValueError("position_ids is required with position_weight or sinusoidal=True")
    else:
        if position_weight is None and not sinusoidal:
            raise ValueError("position_ids was given without position_weight or sinusoidal=True")
        position_ids = _check_ids("position_ids", position_ids, input_ids, "position_weight",
                                  position_weight)
    if (token_type_ids is None) != (token_type_weight is None):
        raise ValueError("token_type_ids and token_type_weight must be given together "
                         f"(got token_type_ids={'None' if token_type_ids is None else 'a tensor'}, "
                         f"token_type_weight={'None' if token_type_weight is None else 'a tensor'})")
    if token_type_ids is not None:
        token_type_ids = _check_ids("token_type_ids", token_type_ids, input_ids,
                                    "token_type_weight", token_type_weight)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias was given without ln_weight (LayerNorm runs iff ln_weight is given)")
    check_like("ln_weight", ln_weight, "token_weight", token_weight, shape=(hidden,))
    check_like("ln_bias", ln_bias, "token_weight", token_weight, shape=(hidden,))
    eps = check_positive("eps", eps)
    p = check_probability("p", p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if token_padding_idx is not None:
        if isinstance(token_padding_idx, bool) or not isinstance(token_padding_idx, int):
            raise TypeError(f"token_padding_idx must be an int or None, got "
                            f"{type(token_padding_idx).__name__}")
        if not -vocab <= token_padding_idx < vocab:
            raise ValueError(f"token_padding_idx must be in [{-vocab}, {vocab}), got {token_padding_idx}")
        token_padding_idx %= vocab
    if not training:
        p = 0.0
    out, _, _ = transformer_embedding_op(input_ids, token_weight, position_ids, position_weight,
                                         token_type_ids, token_type_weight, ln_weight, ln_bias,
                                         sinusoidal, padding_idx, token_padding_idx, float(scale),
                                         eps, p)
    return out
