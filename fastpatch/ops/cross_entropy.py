"""Cross-entropy losses over a vocabulary: fairseq's label-smoothed loss, torch's
``cross_entropy``, and a fused linear + cross-entropy that never holds the full ``[N, V]`` logits.

Every variant is, per row with logits ``x``, target ``t`` and coefficients ``(a, b)``::

    lse = logsumexp(x);  nll = lse - x[t];  smooth = V * lse - sum(x)  (= -sum(log_softmax(x)))
    loss = a * nll + b * smooth

fairseq (``label_smoothed_nll_loss``, 0.12): ``eps_i = eps / (V - 1)``, ``a = 1 - eps - eps_i``,
``b = eps_i``. torch (``F.cross_entropy(label_smoothing=ls)``): ``a = 1 - ls``, ``b = ls / V``.
Rows whose target is ``ignore_index`` contribute 0 to both ``loss`` and ``nll``.

Eager PyTorch materialises ``log_softmax`` (in fp32, for fairseq) and, in backward, a one-hot
gradient, the softmax gradient and the logits gradient: several passes over ``[N, V]`` and up to
four such buffers alive. The CUDA kernel reads the logits once forward (online softmax, fp32
statistics, per-row ``lse`` saved) and once backward (recomputing the softmax from ``lse``) while
writing the gradient: three passes and one ``[N, V]`` buffer.

Targets outside ``[0, V)`` that are not ``ignore_index``: the CPU path raises ``ValueError``; the
CUDA kernels cannot report without a host sync, so that row's ``loss``/``nll`` and its gradient
row are NaN (the reduced loss turns NaN, which fairseq's and AMP's overflow checks see).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._autograd_utils import accumulation_dtype
from ._checks import check_choice, check_index_tensor, check_like, check_probability, check_tensor
from ._dispatch import FusedOp, kernel_for

REDUCTIONS = ("sum", "mean", "none")

# Fused linear + CE: rows per chunk are chosen so one chunk's logits take at most this many bytes
# (8192 x 50257 bf16 -> 4 chunks of 2048 rows, 206 MB each, vs 823 MB for all logits). Larger
# chunks mean fewer passes over the fp32 grad_weight accumulator and better-shaped matmuls.
_CHUNK_LOGITS_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------ coefficients
def _fairseq_coefficients(epsilon: float, vocab: int) -> tuple[float, float]:
    eps_i = epsilon / (vocab - 1) if epsilon > 0.0 else 0.0
    return 1.0 - epsilon - eps_i, eps_i


def _torch_coefficients(label_smoothing: float, vocab: int) -> tuple[float, float]:
    return 1.0 - label_smoothing, label_smoothing / vocab


# ----------------------------------------------------------------------- PyTorch reference
def _target_masks(target: Tensor, vocab: int, ignore_index: int, on_cpu: bool):
    """(valid = not ignored, usable = valid and in range, index safe to gather with)."""
    valid = target != ignore_index
    usable = valid & (target >= 0) & (target < vocab)
    if on_cpu and not bool(torch.equal(valid, usable)):
        bad = target[valid & ~usable]
        raise ValueError(f"target has values outside [0, {vocab}) that are not ignore_index="
                         f"{ignore_index}: {bad[:5].tolist()}")
    return valid, usable, torch.where(usable, target, torch.zeros_like(target))


def _reference_forward(logits: Tensor, target: Tensor, a: float, b: float, ignore_index: int):
    """``logits`` [N, V], ``target`` [N] -> (loss, nll, lse), each [N] in the accumulation dtype."""
    x = logits.to(accumulation_dtype(logits.dtype))
    vocab = x.shape[-1]
    valid, usable, safe = _target_masks(target, vocab, ignore_index, not logits.is_cuda)
    lse = torch.logsumexp(x, dim=-1)
    x_t = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(usable, lse - x_t, torch.full_like(lse, math.nan))
    loss = a * nll + b * (vocab * lse - x.sum(-1))
    zero = torch.zeros_like(lse)
    return torch.where(valid, loss, zero), torch.where(valid, nll, zero), torch.where(valid, lse, zero)


def _reference_backward(grad_loss: Optional[Tensor], grad_nll: Optional[Tensor], logits: Tensor,
                        target: Tensor, lse: Tensor, a: float, b: float, ignore_index: int) -> Tensor:
    """d(sum(grad_loss * loss) + sum(grad_nll * nll)) / d logits, ``[N, V]`` in logits' dtype."""
    x = logits.to(accumulation_dtype(logits.dtype))
    vocab = x.shape[-1]
    valid, usable, safe = _target_masks(target, vocab, ignore_index, not logits.is_cuda)
    zero = torch.zeros_like(lse, dtype=x.dtype)
    gl = zero if grad_loss is None else grad_loss.to(x.dtype)
    gn = zero if grad_nll is None else grad_nll.to(x.dtype)
    nan = torch.full_like(zero, math.nan)
    c1 = torch.where(usable, gl * a + gn, nan)
    c2 = torch.where(usable, gl * b, nan)
    p = torch.exp(x - lse.to(x.dtype).unsqueeze(-1))
    grad = p * (c1 + vocab * c2).unsqueeze(-1) - c2.unsqueeze(-1)
    grad = grad.scatter_add(-1, safe.unsqueeze(-1), -c1.unsqueeze(-1))
    return torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad)).to(logits.dtype)


def _row_grad(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None else g.float().contiguous()


def _dense_rows(logits: Tensor) -> Tensor:
    """``logits`` as the kernels take it: unit column stride, row stride >= V (padded rows are
    read in place; anything else is copied)."""
    if logits.stride(-1) == 1 and (logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1]):
        return logits
    return logits.contiguous()


# ------------------------------------------------------------------- cross-entropy custom ops
def _ce_forward(logits: Tensor, target: Tensor, a: float, b: float,
                     ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``logits`` [N, V], ``target`` [N] int64 -> per-row ``(loss, nll, lse)``, each [N] fp32
    (fp64 for fp64 logits); ignored rows are 0."""
    kernel = kernel_for("cross_entropy_fwd", logits, target)
    if kernel is not None:
        return kernel(_dense_rows(logits), target.contiguous(), a, b, ignore_index)
    return _reference_forward(logits, target, a, b, ignore_index)


def _ce_forward_fake(logits, target, a, b, ignore_index):
    rows = logits.new_empty((logits.shape[0],), dtype=accumulation_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


def _ce_backward(grad_loss: Optional[Tensor], grad_nll: Optional[Tensor], logits: Tensor,
                              target: Tensor, lse: Tensor, a: float, b: float,
                              ignore_index: int) -> Tensor:
    """Gradient of the logits for per-row upstream gradients ``grad_loss``/``grad_nll`` ([N] or
    None = 0), recomputing the softmax from the saved ``lse``."""
    kernel = kernel_for("cross_entropy_bwd", logits, target)
    if kernel is not None:
        return kernel(_row_grad(grad_loss), _row_grad(grad_nll), _dense_rows(logits),
                      target.contiguous(), lse.float().contiguous(), a, b, ignore_index)
    return _reference_backward(grad_loss, grad_nll, logits, target, lse, a, b, ignore_index)


def _ce_backward_fake(grad_loss, grad_nll, logits, target, lse, a, b, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    logits, target, a, b, ignore_index = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # nll is usually only logged: its gradient stays None
    ctx.save_for_backward(logits, target, output[2])
    ctx.a, ctx.b, ctx.ignore_index = a, b, ignore_index


def _ce_backward_formula(ctx, backward, grad_loss, grad_nll, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and (grad_loss is not None or grad_nll is not None):
        grad = backward(grad_loss, grad_nll, logits, target, lse, ctx.a, ctx.b, ctx.ignore_index)
    return grad, None, None, None, None


cross_entropy_op = FusedOp("cross_entropy", _ce_forward, _ce_forward_fake, _ce_backward,
                           _ce_backward_fake, _ce_setup_context, _ce_backward_formula)


# ---------------------------------------------------------- fused linear + cross-entropy pieces
def _chunks(rows: int, vocab: int, itemsize: int) -> list[tuple[int, int]]:
    """Row ranges of about equal size whose logits fit in ``_CHUNK_LOGITS_BYTES``."""
    if rows == 0:
        return []
    per_chunk = max(1, _CHUNK_LOGITS_BYTES // (vocab * itemsize))
    count = -(-rows // per_chunk)
    size = -(-rows // count)
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``hidden @ weight.T + bias`` as ``[C, V]`` rows padded to a multiple of 64 elements.

    With an odd V (50257) as leading dimension cuBLAS gets no aligned leading dims for this
    matmul and both gradient matmuls; an unpadded first version ran 16.8 ms against 6.0 ms for
    torch.compile (which pads such strides) on an H200 at 8192 x 768 -> 50257. The padded rows
    also start 16-byte aligned for the CE kernel."""
    vocab = weight.shape[0]
    padded = -(-vocab // 64) * 64
    logits = hidden.new_empty((hidden.shape[0], padded))[:, :vocab]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=logits)
    return torch.addmm(bias, hidden, weight.t(), out=logits)


def _chunk_forward(logits: Tensor, target: Tensor, a: float, b: float, ignore_index: int,
                   with_grad: bool):
    """(loss, nll, lse, grad) of one chunk; ``grad`` is d sum(loss) / d logits or None. On the
    kernel path the gradient overwrites ``logits`` (a scratch chunk) and is returned as it."""
    if with_grad:
        kernel = kernel_for("cross_entropy_fwd_grad_", logits, target)
        if kernel is not None:
            loss, nll, lse = kernel(logits, target, a, b, ignore_index)
            return loss, nll, lse, logits
        loss, nll, lse = _reference_forward(logits, target, a, b, ignore_index)
        grad = _reference_backward(torch.ones_like(loss), None, logits, target, lse, a, b, ignore_index)
        return loss, nll, lse, grad
    kernel = kernel_for("cross_entropy_fwd", logits, target)
    if kernel is not None:
        return (*kernel(logits, target, a, b, ignore_index), None)
    return (*_reference_forward(logits, target, a, b, ignore_index), None)


def _chunk_backward(grad_loss: Optional[Tensor], grad_nll: Optional[Tensor], logits: Tensor,
                    target: Tensor, lse: Tensor, a: float, b: float, ignore_index: int) -> Tensor:
    """d logits of one chunk; on the kernel path written over ``logits`` and returned as it."""
    kernel = kernel_for("cross_entropy_bwd_", logits, target)
    if kernel is not None:
        kernel(_row_grad(grad_loss), _row_grad(grad_nll), logits, target, lse.float().contiguous(),
               a, b, ignore_index)
        return logits
    return _reference_backward(grad_loss, grad_nll, logits, target, lse, a, b, ignore_index)


def _mm(m1: Tensor, m2: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``m1 @ m2`` accumulated and returned in ``out_dtype`` (fp32 for half inputs, one rounding)."""
    if m1.dtype == out_dtype:
        return m1 @ m2
    if m1.is_cuda:
        return torch.mm(m1, m2, out_dtype=out_dtype)
    return m1.to(out_dtype) @ m2.to(out_dtype)


def _addmm_(acc: Tensor, m1: Tensor, m2: Tensor) -> None:
    """``acc += m1 @ m2`` with ``acc`` in the accumulation dtype (fp32 for half inputs)."""
    if m1.dtype == acc.dtype:
        acc.addmm_(m1, m2)
    elif m1.is_cuda:
        torch.addmm(acc, m1, m2, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(m1.to(acc.dtype), m2.to(acc.dtype))


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


# -------------------------------------------- fused linear + CE, "sum" (gradients in forward)
@torch.library.custom_op("fastpatch::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  target: Tensor, a: float, b: float, ignore_index: int,
                                  need_hidden_grad: bool, need_weight_grad: bool,
                                  need_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Summed loss of ``hidden @ weight.T + bias`` chunk by chunk, with the gradients of that sum.

    ``hidden`` [N, H], ``weight`` [V, H], ``bias`` [V] or None, ``target`` [N] int64. Returns
    ``(loss_sum, nll_sum, grad_hidden [N, H], grad_weight [V, H], grad_bias [V])``, sums and
    gradients in the accumulation dtype (fp32 for half inputs); a gradient not asked for is
    empty. Each chunk's logits buffer is overwritten by its gradient, then multiplied out:
    ``grad_hidden[chunk] = grad_logits @ weight``, ``grad_weight += grad_logits.T @ hidden[chunk]``.
    """
    acc = accumulation_dtype(hidden.dtype)
    rows, width = hidden.shape
    vocab = weight.shape[0]
    with_grad = need_hidden_grad or need_weight_grad or need_bias_grad
    grad_hidden = hidden.new_empty((rows, width), dtype=acc) if need_hidden_grad else _empty(hidden, acc)
    grad_weight = hidden.new_zeros((vocab, width), dtype=acc) if need_weight_grad else _empty(hidden, acc)
    grad_bias = hidden.new_zeros((vocab,), dtype=acc) if need_bias_grad else _empty(hidden, acc)
    loss_sum = hidden.new_zeros((), dtype=acc)
    nll_sum = hidden.new_zeros((), dtype=acc)
    for start, end in _chunks(rows, vocab, hidden.element_size()):
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        loss, nll, _, grad = _chunk_forward(logits, target[start:end], a, b, ignore_index, with_grad)
        loss_sum += loss.sum()
        nll_sum += nll.sum()
        if need_hidden_grad:
            grad_hidden[start:end] = _mm(grad, weight, acc)
        if need_weight_grad:
            _addmm_(grad_weight, grad.t(), h)
        if need_bias_grad:
            grad_bias += grad.sum(0, dtype=acc)
    return loss_sum, nll_sum, grad_hidden, grad_weight, grad_bias


@fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, a, b, ignore_index, need_hidden_grad, need_weight_grad,
      need_bias_grad):
    acc = accumulation_dtype(hidden.dtype)
    vocab, width = weight.shape
    scalar = hidden.new_empty((), dtype=acc)
    return (scalar, torch.empty_like(scalar),
            hidden.new_empty(hidden.shape if need_hidden_grad else (0,), dtype=acc),
            hidden.new_empty((vocab, width) if need_weight_grad else (0,), dtype=acc),
            hidden.new_empty((vocab,) if need_bias_grad else (0,), dtype=acc))


def _flce_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, a, b, ignore_index = inputs[:7]
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, target, *output[2:])
    ctx.a, ctx.b, ctx.ignore_index = a, b, ignore_index


def _flce_backward(ctx, grad_loss, grad_nll, *_unused):
    """Scale the gradients computed in forward by the (scalar) upstream gradients.

    They are those of ``sum(loss)``: G = a * (p - onehot) + b * (V p - 1) per row. The gradient
    of ``sum(nll)`` is (p - onehot) = (G - b * (V onehot - 1)) / k with k = a + V b (1 for both
    smoothing conventions), so ``nll_loss``'s gradient costs no second pass over the vocabulary:
    the correction is a gather/scatter of rows of ``weight``/``hidden`` by target.
    """
    hidden, weight, target, gh, gw, gb = ctx.saved_tensors
    needs = ctx.needs_input_grad
    none = (None,) * 7
    if grad_loss is None and grad_nll is None:
        return (None, None, None) + none
    vocab = weight.shape[0]
    k = ctx.a + vocab * ctx.b
    alpha = grad_loss if grad_loss is not None else torch.zeros_like(grad_nll)
    beta = None
    if grad_nll is not None:
        alpha = alpha + grad_nll / k
        if ctx.b != 0.0:
            beta = grad_nll * (ctx.b / k)
            usable = (target != ctx.ignore_index) & (target >= 0) & (target < vocab)
            safe = torch.where(usable, target, torch.zeros_like(target))
            row_weight = usable.to(accumulation_dtype(hidden.dtype))
    grad_hidden = grad_weight = grad_bias = None
    if needs[0]:
        g = gh * alpha
        if beta is not None:
            w = weight.to(g.dtype)
            g = g - (beta * row_weight).unsqueeze(-1) * (vocab * w[safe] - w.sum(0))
        grad_hidden = g.to(hidden.dtype)
    if needs[1]:
        g = gw * alpha
        if beta is not None:
            h = hidden.to(g.dtype) * row_weight.unsqueeze(-1)
            g = g.index_add(0, safe, h * (-vocab * beta)) + beta * h.sum(0)
        grad_weight = g.to(weight.dtype)
    if needs[2]:
        g = gb * alpha
        if beta is not None:
            counts = torch.zeros_like(g).index_add(0, safe, row_weight)
            g = g - beta * (vocab * counts - row_weight.sum())
        grad_bias = g.to(weight.dtype)
    return (grad_hidden, grad_weight, grad_bias) + none


fused_linear_cross_entropy_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


# ------------------------------------ fused linear + CE, per-row losses (recompute in backward)
@torch.library.custom_op("fastpatch::fused_linear_cross_entropy_rows", mutates_args=())
def fused_linear_cross_entropy_rows_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                       target: Tensor, a: float, b: float,
                                       ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, nll, lse)`` [N] of ``hidden @ weight.T + bias``, chunk by chunk.

    Used for ``reduction="none"``: per-row upstream gradients cannot scale a ``grad_weight``
    summed over rows in forward, so backward recomputes each chunk's logits instead (one more
    matmul per chunk than the ``sum`` path)."""
    vocab = weight.shape[0]
    parts = [_chunk_forward(_chunk_logits(hidden[s:e], weight, bias), target[s:e], a, b,
                            ignore_index, False)[:3]
             for s, e in _chunks(hidden.shape[0], vocab, hidden.element_size())]
    if not parts:
        empty = hidden.new_empty((0,), dtype=accumulation_dtype(hidden.dtype))
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(column) for column in zip(*parts))


@fused_linear_cross_entropy_rows_op.register_fake
def _(hidden, weight, bias, target, a, b, ignore_index):
    rows = hidden.new_empty((hidden.shape[0],), dtype=accumulation_dtype(hidden.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op("fastpatch::fused_linear_cross_entropy_rows_backward", mutates_args=())
def fused_linear_cross_entropy_rows_backward_op(
        grad_loss: Optional[Tensor], grad_nll: Optional[Tensor], hidden: Tensor, weight: Tensor,
        bias: Optional[Tensor], target: Tensor, lse: Tensor, a: float, b: float, ignore_index: int,
        need_hidden_grad: bool, need_weight_grad: bool,
        need_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` in the inputs' dtypes (empty
    when not asked for), recomputing each chunk's logits and overwriting them with the gradient."""
    acc = accumulation_dtype(hidden.dtype)
    rows, width = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else _empty(hidden, hidden.dtype)
    grad_weight = hidden.new_zeros((vocab, width), dtype=acc) if need_weight_grad else _empty(hidden, acc)
    grad_bias = hidden.new_zeros((vocab,), dtype=acc) if need_bias_grad else _empty(hidden, acc)
    for s, e in _chunks(rows, vocab, hidden.element_size()):
        h = hidden[s:e]
        grad = _chunk_backward(None if grad_loss is None else grad_loss[s:e],
                               None if grad_nll is None else grad_nll[s:e],
                               _chunk_logits(h, weight, bias), target[s:e], lse[s:e], a, b,
                               ignore_index)
        if need_hidden_grad:
            grad_hidden[s:e] = grad @ weight
        if need_weight_grad:
            _addmm_(grad_weight, grad.t(), h)
        if need_bias_grad:
            grad_bias += grad.sum(0, dtype=acc)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@fused_linear_cross_entropy_rows_backward_op.register_fake
def _(grad_loss, grad_nll, hidden, weight, bias, target, lse, a, b, ignore_index,
      need_hidden_grad, need_weight_grad, need_bias_grad):
    return (torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],) if need_bias_grad else (0,)))


def _flce_rows_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, a, b, ignore_index = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, target, output[2])
    ctx.a, ctx.b, ctx.ignore_index = a, b, ignore_index


def _flce_rows_backward(ctx, grad_loss, grad_nll, _grad_lse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    none = (None,) * 4
    if (grad_loss is None and grad_nll is None) or not any(needs[:3]):
        return (None, None, None) + none
    gh, gw, gb = fused_linear_cross_entropy_rows_backward_op(
        grad_loss, grad_nll, hidden, weight, bias, target, lse, ctx.a, ctx.b, ctx.ignore_index,
        needs[0], needs[1], bias is not None and needs[2])
    return (gh if needs[0] else None, gw if needs[1] else None,
            gb if bias is not None and needs[2] else None) + none


fused_linear_cross_entropy_rows_op.register_autograd(_flce_rows_backward,
                                                     setup_context=_flce_rows_setup_context)


# ------------------------------------------------------------------------------ public API
def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_target(target, ref_name: str, ref: Tensor, shape) -> Tensor:
    check_index_tensor("target", target, ref_name, ref, shape=tuple(shape))
    return target.long()


def _check_smoothing(epsilon, vocab: int, ref_name: str) -> float:
    epsilon = check_probability("epsilon", epsilon)
    if epsilon > 0.0 and vocab < 2:
        raise ValueError(f"{ref_name} must have at least 2 classes for label smoothing "
                         f"(eps / (V - 1)), got V={vocab}")
    return epsilon


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows.reshape(target.shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    # torch's and fairseq's "mean": over non-ignored rows (NaN when every row is ignored).
    return total / (target != ignore_index).sum().to(total.dtype)


def _loss_rows(logits: Tensor, target: Tensor, a: float, b: float, ignore_index: int):
    vocab = logits.shape[-1]
    loss, nll, _ = cross_entropy_op(logits.reshape(-1, vocab), target.reshape(-1), a, b, ignore_index)
    return loss, nll


def _check_logits(logits) -> int:
    check_tensor("logits", logits, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    return logits.shape[-1]


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, epsilon: float = 0.0,
                                 ignore_index: int = -100,
                                 reduction: str = "sum") -> tuple[Tensor, Tensor]:
    """fairseq's ``label_smoothed_nll_loss`` (0.12) on logits, without materialising log-probs.

    Args:
        logits: ``[..., V]``, fp32/fp16/bf16 (fp64 runs the reference path, for gradcheck).
        target: ``[...]`` (``logits``' leading shape), int64 (int32 accepted), values in
            ``[0, V)`` or ``ignore_index``.
        epsilon: label smoothing in [0, 1); ``eps_i = epsilon / (V - 1)``,
            ``loss = (1 - epsilon - eps_i) * nll + eps_i * smooth``.
        ignore_index: rows with this target contribute 0 to both outputs (fairseq's
            ``padding_idx``; it may be a valid class index).
        reduction: ``"sum"`` (fairseq's), ``"mean"`` over non-ignored rows, or ``"none"``.

    Returns:
        ``(loss, nll_loss)``: scalars, or ``[...]`` for ``"none"``; fp32 (fp64 for fp64 logits),
        as fairseq computes log-probs in fp32. Both are differentiable, and gradients into both
        combine.
    """
    vocab = _check_logits(logits)
    target = _check_target(target, "logits", logits, logits.shape[:-1])
    epsilon = _check_smoothing(epsilon, vocab, "logits")
    ignore_index = _check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    a, b = _fairseq_coefficients(epsilon, vocab)
    loss, nll = _loss_rows(logits, target, a, b, ignore_index)
    return (_reduce(loss, target, ignore_index, reduction),
            _reduce(nll, target, ignore_index, reduction))


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """``torch.nn.functional.cross_entropy`` with class-index targets, classes on the LAST dim.

    Args:
        logits: ``[..., V]`` (unlike torch's ``[N, V, d1, ...]``, the class dim is last),
            fp32/fp16/bf16 (fp64: reference path).
        target: ``[...]`` int64 (int32 accepted) class indices or ``ignore_index``.
        ignore_index: rows with this target contribute 0 and are not counted by ``"mean"``.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1]; torch's convention: ``ls / V`` on every class, target included.

    Returns:
        Scalar, or ``[...]`` for ``"none"``, in ``logits``' dtype (reduced in fp32 first).
    """
    vocab = _check_logits(logits)
    target = _check_target(target, "logits", logits, logits.shape[:-1])
    ignore_index = _check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = _check_unit_interval("label_smoothing", label_smoothing)
    a, b = _torch_coefficients(label_smoothing, vocab)
    loss, _ = _loss_rows(logits, target, a, b, ignore_index)
    return _reduce(loss, target, ignore_index, reduction).to(logits.dtype)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                               bias: Optional[Tensor] = None, epsilon: float = 0.0,
                               ignore_index: int = -100,
                               reduction: str = "sum") -> tuple[Tensor, Tensor]:
    """``label_smoothed_cross_entropy(hidden @ weight.T + bias, target, ...)`` without ever
    holding the ``[N, V]`` logits: rows are processed in chunks whose logits stay under
    ``_CHUNK_LOGITS_BYTES``.

    For ``"sum"``/``"mean"`` the gradients of ``hidden``, ``weight`` and ``bias`` are computed
    during forward (each chunk's logits overwritten by their gradient and multiplied out, with
    ``grad_weight`` accumulated in fp32) and only scaled by the upstream gradient in backward.
    ``nll_loss`` is differentiable too: its gradient is derived from the stored ones with a
    gather/scatter by target (no second vocabulary pass), and combines with ``loss``'s. For
    ``"none"``, backward recomputes each chunk's logits (one more matmul per chunk).

    Args:
        hidden: ``[..., H]``, fp32/fp16/bf16 (fp64: reference path).
        weight: ``[V, H]`` (e.g. the tied output embedding), ``hidden``'s dtype and device;
            under autocast both are cast to the autocast dtype first, as ``F.linear`` does.
        target: ``[...]`` (``hidden``'s leading shape), int64 (int32 accepted).
        bias: ``[V]`` or None.
        epsilon, ignore_index, reduction: as :func:`label_smoothed_cross_entropy`.

    Returns:
        ``(loss, nll_loss)`` as :func:`label_smoothed_cross_entropy`.
    """
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if torch.is_autocast_enabled(hidden.device.type):
        # As F.linear under autocast: AMP keeps fp32 master weights next to half activations.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_like("weight", weight, "hidden", hidden)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] with V > 0 (hidden is "
                         f"{tuple(hidden.shape)}), got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    check_like("bias", bias, "hidden", hidden, shape=(vocab,))
    target = _check_target(target, "hidden", hidden, hidden.shape[:-1])
    epsilon = _check_smoothing(epsilon, vocab, "weight")
    ignore_index = _check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    a, b = _fairseq_coefficients(epsilon, vocab)
    flat_hidden, flat_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if reduction == "none":
        loss, nll, _ = fused_linear_cross_entropy_rows_op(flat_hidden, weight, bias, flat_target,
                                                          a, b, ignore_index)
        return loss.reshape(target.shape), nll.reshape(target.shape)
    grad_on = torch.is_grad_enabled()
    loss, nll, *_ = fused_linear_cross_entropy_op(
        flat_hidden, weight, bias, flat_target, a, b, ignore_index,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad)
    if reduction == "mean":
        count = (flat_target != ignore_index).sum().to(loss.dtype)
        return loss / count, nll / count
    return loss, nll
