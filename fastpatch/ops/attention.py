"""Attention glue around PyTorch's SDPA: head split/merge, masks, and a static KV cache.

The softmax itself is always ``torch.nn.functional.scaled_dot_product_attention``, which picks
the flash / cuDNN / memory-efficient backend for the GPU at hand; fastpatch never ships its own.
What lives here are the pieces around it:

* :func:`split_heads` - ``[B, L, C*H]`` projection output (+ bias) to ``C`` contiguous
  ``[B, heads, L, head_dim]`` tensors, one kernel each way.
* :func:`merge_heads` - ``[B, heads, L, head_dim]`` back to ``[B, L, heads*head_dim]``.
* :func:`attention` - SDPA with fairseq/HF padding masks, bottom-right causal masking for
  incremental decoding, additive or boolean 4D masks, and finite output on fully masked rows.
* :func:`kv_cache_append_` - in-place write of new keys/values into a preallocated cache at
  per-row positions held on the device (CUDA-graph capturable decoding).

Split and merge are each other's backward, so two kernels serve four directions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._autograd_utils import accumulation_dtype, sum_to_bias
from ._checks import check_index_tensor, check_like, check_probability, check_positive, check_tensor
from ._dispatch import kernel_for


# ------------------------------------------------------------------------------ split / merge
# Both ops take and return single tensors, with the chunks stacked in front ([C, B, h, L, d]):
# list-valued custom ops pay pytree (un)flattening on every call and in autograd, which
# measured about as much CPU time as the rest of the op's dispatch.
def _reference_split(qkv: Tensor, bias: Optional[Tensor], num_heads: int, num_chunks: int) -> Tensor:
    batch, seq, width = qkv.shape
    x = qkv
    if bias is not None:
        x = (qkv.to(accumulation_dtype(qkv.dtype)) + bias.to(accumulation_dtype(qkv.dtype))).to(qkv.dtype)
    heads = x.view(batch, seq, num_chunks, num_heads, width // (num_chunks * num_heads))
    # clone, not contiguous(): a custom op's output may not alias its input
    return heads.permute(2, 0, 3, 1, 4).clone(memory_format=torch.contiguous_format)


def _reference_merge(x: Tensor) -> Tensor:
    chunks, batch, heads, seq, head_dim = x.shape
    merged = x.permute(1, 3, 0, 2, 4).clone(memory_format=torch.contiguous_format)
    return merged.view(batch, seq, chunks * heads * head_dim)


@torch.library.custom_op("fastpatch::split_heads", mutates_args=())
def split_heads_op(qkv: Tensor, bias: Optional[Tensor], num_heads: int, num_chunks: int) -> Tensor:
    """``[B, L, C*H]`` (+ ``[C*H]`` bias) -> contiguous ``[C, B, heads, L, H/heads]``."""
    kernel = kernel_for("attn_split_heads", qkv, bias)
    if kernel is not None:
        return kernel(qkv.contiguous(), None if bias is None else bias.contiguous(), num_heads, num_chunks)
    return _reference_split(qkv, bias, num_heads, num_chunks)


@split_heads_op.register_fake
def _(qkv, bias, num_heads, num_chunks):
    batch, seq, width = qkv.shape
    return qkv.new_empty(num_chunks, batch, num_heads, seq, width // (num_chunks * num_heads))


@torch.library.custom_op("fastpatch::merge_heads", mutates_args=())
def merge_heads_op(x: Tensor) -> Tensor:
    """``[C, B, heads, L, d]`` (any strides) -> contiguous ``[B, L, C*heads*d]``, chunk-major."""
    kernel = kernel_for("attn_merge_heads", x)
    if kernel is not None:
        # the kernel reads any chunk/batch/head/sequence strides; only the last dim must be dense
        return kernel(x if x.stride(-1) == 1 else x.contiguous())
    return _reference_merge(x)


@merge_heads_op.register_fake
def _(x):
    chunks, batch, heads, seq, head_dim = x.shape
    return x.new_empty(batch, seq, chunks * heads * head_dim)


def _split_setup_context(ctx, inputs, output):
    _, bias, _, _ = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _split_backward(ctx, grad):
    grad_qkv = merge_heads_op(grad)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = sum_to_bias(grad_qkv, ctx.bias_dtype)
    return grad_qkv, grad_bias, None, None


split_heads_op.register_autograd(_split_backward, setup_context=_split_setup_context)


def _merge_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.num_chunks, ctx.num_heads = x.shape[0], x.shape[2]


def _merge_backward(ctx, grad_out):
    return split_heads_op(grad_out, None, ctx.num_heads, ctx.num_chunks)


merge_heads_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def split_heads(qkv: Tensor, bias: Optional[Tensor], num_heads: int,
                num_chunks: int = 3) -> Tuple[Tensor, ...]:
    """Add the projection bias and split a fused projection output into attention heads.

    ``qkv[b, l, c*H + h*d + j] (+ bias[c*H + h*d + j])`` goes to ``out[c][b, h, l, j]``, in one
    kernel that writes every chunk contiguous; backward merges the head gradients back in one
    kernel (and reduces the bias gradient).

    When to use it: eager PyTorch already expresses the split as a free view
    (``qkv.view(B, L, C, heads, d).permute(2, 0, 3, 1, 4)``), ``nn.Linear`` adds the bias inside
    the matmul, and SDPA accepts such strided views. This op pays for itself only where the bias
    is *not* folded into the matmul (a bias-free GEMM followed by this op) or where the consumer
    wants contiguous ``[B, heads, L, d]`` tensors (SDPA backends that copy strided inputs, a KV
    cache write); the layer code picks whichever ``benchmarks/bench_attention.py`` shows faster.

    Args:
        qkv: ``[B, L, num_chunks * H]``, fp32/fp16/bf16 (fp64 runs the reference, for gradcheck).
        bias: ``[num_chunks * H]`` with ``qkv``'s dtype and device, or None.
        num_heads: heads per chunk; must divide ``H``.
        num_chunks: 3 for a fused Q/K/V projection, 2 for fused K/V (cross-attention), 1 for a
            lone projection.

    Returns:
        A tuple of ``num_chunks`` contiguous tensors ``[B, num_heads, L, H // num_heads]``. They
        are views of one buffer (``unbind``), so autograd forbids modifying them in place; use
        out-of-place ops (``q = q * s``) on them.
    """
    check_tensor("qkv", qkv, ndim=3)
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
        raise TypeError(f"num_chunks must be an int, got {type(num_chunks).__name__}")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if qkv.shape[-1] % num_chunks != 0:
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} is not divisible by num_chunks={num_chunks}")
    _check_heads(num_heads, qkv.shape[-1] // num_chunks)
    check_like("bias", bias, "qkv", qkv, shape=(qkv.shape[-1],))
    return split_heads_op(qkv, bias, num_heads, num_chunks).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, heads, L, d] -> [B, L, heads * d]``, the inverse of a one-chunk :func:`split_heads`.

    Flash and memory-efficient SDPA return their output as a transposed view of a
    ``[B, L, heads, d]`` buffer; for such an input (any ``x`` whose ``transpose(1, 2)`` is
    contiguous) the merge is a free view, as with ``reshape``, and no kernel runs. Any other
    layout is gathered by one kernel (strided reads, no intermediate ``contiguous()`` copy).

    Args:
        x: ``[B, heads, L, d]``, fp32/fp16/bf16/fp64, any strides.

    Returns:
        Contiguous ``[B, L, heads * d]`` (possibly a view of ``x``, like ``reshape``).
    """
    check_tensor("x", x, ndim=4)
    batch, heads, seq, head_dim = x.shape
    transposed = x.transpose(1, 2)
    if transposed.is_contiguous():
        return transposed.reshape(batch, seq, heads * head_dim)
    return merge_heads_op(x.unsqueeze(0))


def _check_heads(num_heads, hidden: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0 or hidden % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be positive and divide the hidden size {hidden}")


# ---------------------------------------------------------------------------------- attention
def _lower_right_causal(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``[Lq, S]`` bool, True where query ``i`` may attend key ``j``: ``j <= S - Lq + i``."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def _check_key_padding_mask(key_padding_mask, q: Tensor, shape: Tuple[int, int]) -> None:
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if tuple(key_padding_mask.shape) != tuple(shape):
        raise ValueError(f"key_padding_mask must have shape [B, S] = {list(shape)}, "
                         f"got {tuple(key_padding_mask.shape)}")


def _check_attn_mask(attn_mask: Tensor, q: Tensor, shape: Tuple[int, int, int, int]) -> None:
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    ok = attn_mask.dim() <= 4 and all(
        m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(shape)))
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"[B, heads, Lq, S] = {list(shape)}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
              causal: bool = False, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              training: bool = True, scale: Optional[float] = None) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` through ``F.scaled_dot_product_attention``.

    Masks (all optional, combined by intersection):

    * ``key_padding_mask`` ``[B, S]`` bool, **True = padding** (fairseq / LightSeq convention):
      those keys are ignored, for left- and right-padded batches alike.
    * ``causal``: query ``i`` attends keys ``j <= S - Lq + i`` (bottom-right aligned, so a
      chunk of ``Lq`` new queries against a cache of ``S`` keys is causal in absolute
      positions; for ``Lq == S`` it is the usual lower triangle).
    * ``attn_mask`` broadcastable to ``[B, heads, Lq, S]``: bool (**True = attend**, SDPA / HF
      4D convention) or floating (added to the scores; ``-inf`` masks).

    A query row whose keys are all masked (e.g. a left-padding query under causal + padding)
    returns zeros and passes zero gradient, instead of SDPA's NaN. With ``causal`` only and
    ``Lq == S`` the ``is_causal`` fast path runs (no mask tensor, flash-eligible); with causal
    only and ``Lq < S`` eager calls use ``causal_lower_right`` (no materialised mask), and
    ``torch.compile`` traces an explicit mask (dynamo cannot build that tensor subclass).

    Args:
        q: ``[B, heads, Lq, d]``, fp32/fp16/bf16/fp64.
        k: ``[B, kv_heads, S, d]``; ``kv_heads`` divides ``heads`` (grouped-query attention).
        v: ``[B, kv_heads, S, dv]``.
        dropout_p: attention-probability dropout, applied only when ``training``.
        scale: score scale, default ``1 / sqrt(d)``.

    Returns:
        ``[B, heads, Lq, dv]`` with ``q``'s dtype.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k of shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v of shape {tuple(v.shape)} does not match k {tuple(k.shape)} in [B, kv_heads, S]")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k has {kv_heads} heads, which must divide q's {heads} heads")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    if scale is not None:
        scale = check_positive("scale", scale)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q, (batch, kv_len))
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q, (batch, heads, q_len, kv_len))
    sdpa = dict(dropout_p=dropout_p, scale=scale, enable_gqa=kv_heads != heads)

    # Decoding one token: bottom-right causal lets it see every key, so causality is a no-op.
    causal = causal and q_len > 1
    if key_padding_mask is None and attn_mask is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, **sdpa)
        if q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
        if q_len < kv_len and not torch.compiler.is_compiling():
            # every row keeps key 0, so no row is fully masked and no fix-up is needed
            from torch.nn.attention.bias import causal_lower_right
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, kv_len), **sdpa)

    keep: Optional[Tensor] = None  # bool, True = attend, broadcastable to [B, heads, Lq, S]
    if key_padding_mask is not None:
        keep = key_padding_mask.logical_not()[:, None, None, :]
    if causal:
        lower = _lower_right_causal(q_len, kv_len, q.device)
        keep = lower if keep is None else keep & lower
    if attn_mask is None:
        mask = keep
    elif attn_mask.dtype == torch.bool:
        mask = attn_mask if keep is None else attn_mask & keep
    else:
        mask = attn_mask.to(q.dtype)
        if keep is not None:
            mask = mask.masked_fill(keep.logical_not(), float("-inf"))

    # SDPA gives NaN (or backend-dependent values) where a row has no key left. Such rows are
    # opened to all keys, which keeps every backend's forward and backward finite, and their
    # output is then zeroed, which also zeroes the gradient flowing through them.
    if mask.dtype == torch.bool:
        dead = mask.any(dim=-1, keepdim=True).logical_not()
        mask = mask | dead
    else:
        dead = (mask == float("-inf")).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(dead, 0.0)
    out = _masked_sdpa(q, k, v, mask, sdpa)
    return out.masked_fill(dead, 0.0)


# cuDNN's SDPA backward (torch 2.11, cuDNN 9.19, H100) returns wrong key/value gradients for
# some masked calls: BART-shaped cross-attention with its [B, 1, Lq, S] mask got dK/dV at a
# relative error of ~1.4 against fp64 while the memory-efficient and math backends agreed to
# 1e-2 (tests/integrations/huggingface/test_bart.py, cuda tests). Masked calls that will be
# differentiated therefore leave cuDNN out; masks never reach flash, so they run
# memory-efficient. Inference keeps every backend.
_MASKED_BACKWARD_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                             SDPBackend.MATH]


def _without_cudnn_sdp(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with SDPA's cuDNN backend off, restored after.

    The eager twin of ``sdpa_kernel(_MASKED_BACKWARD_BACKENDS)``: that context manager costs the
    host ~23 us a call (measured on the CPU, 2026-12-08), more than the op it guards, and a
    training update makes one such call per attention sublayer; reading and flipping the one
    flag costs ~1.5 us. It leaves the other backends as the user set them (``sdpa_kernel``
    would switch them on). Like ``sdpa_kernel``, it sets process-wide flags for the call."""
    cudnn_was_on = torch.backends.cuda.cudnn_sdp_enabled()
    if cudnn_was_on:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return fn(*args, **kwargs)
    finally:
        if cudnn_was_on:
            torch.backends.cuda.enable_cudnn_sdp(True)


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sdpa: dict) -> Tensor:
    differentiated = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                  or v.requires_grad)
    if differentiated and q.is_cuda:
        if torch.compiler.is_compiling():
            # dynamo traces sdpa_kernel, so compiled graphs make the same choice
            with sdpa_kernel(_MASKED_BACKWARD_BACKENDS):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)
        return _without_cudnn_sdp(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, **sdpa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)


# ----------------------------------------------------------------------------------- KV cache
def _reference_kv_cache_append(cache_k: Tensor, cache_v: Tensor, k: Tensor, v: Tensor,
                               positions: Tensor) -> None:
    batch, _, new, _ = k.shape
    max_len = cache_k.shape[2]
    slots = positions.expand(batch)[:, None] + torch.arange(new, device=k.device)  # [B, n]
    valid = (slots >= 0) & (slots < max_len)
    rows = torch.arange(batch, device=k.device)[:, None].expand(batch, new)
    for cache, src in ((cache_k, k), (cache_v, v)):
        # [B, S_max, h, d] views of the cache: indexing (row, slot) writes through to it
        cache.transpose(1, 2)[rows[valid], slots[valid]] = src.transpose(1, 2)[valid]


@torch.library.custom_op("fastpatch::kv_cache_append", mutates_args=("cache_k", "cache_v"))
def kv_cache_append_op(cache_k: Tensor, cache_v: Tensor, k: Tensor, v: Tensor,
                       positions: Tensor) -> None:
    """``cache[b, :, positions[b] + t] = new[b, :, t]`` for keys and values, in place."""
    kernel = kernel_for("attn_kv_cache_append", cache_k, cache_v, k, v, positions)
    if kernel is not None:
        # any batch/head/token strides are read directly; only the last dim must be dense
        kernel(cache_k, cache_v, k if k.stride(-1) == 1 else k.contiguous(),
               v if v.stride(-1) == 1 else v.contiguous(), positions)
        return
    _reference_kv_cache_append(cache_k, cache_v, k, v, positions)


@kv_cache_append_op.register_fake
def _(cache_k, cache_v, k, v, positions):
    return None


def kv_cache_append_(cache_k: Tensor, cache_v: Tensor, k: Tensor, v: Tensor,
                     positions: Tensor) -> None:
    """Write ``n`` new keys/values per row into a preallocated cache, at per-row positions.

    ``cache_k[b, :, positions[b] + t, :] = k[b, :, t, :]`` for ``t < n`` (same for values).
    ``positions`` lives on the device, so a decoding step (append, then attention over the
    cache) can be captured once in a CUDA graph and replayed with advancing positions; per-row
    positions serve left-padded and ragged batches. Slots outside ``[0, S_max)`` are skipped
    rather than checked, because checking would need a host sync, which graphs forbid.
    Not differentiable: the cache is state, so ``k`` and ``v`` are written detached.
    Graph capture needs the CUDA kernel: the PyTorch reference (CPU, or a GPU without the
    built extension) selects the in-range slots with a data-dependent boolean index.

    Args:
        cache_k: ``[B, kv_heads, S_max, d]`` (any strides with a dense last dim), mutated.
        cache_v: ``[B, kv_heads, S_max, dv]``, mutated.
        k: ``[B, kv_heads, n, d]`` with ``cache_k``'s dtype and device.
        v: ``[B, kv_heads, n, dv]`` with ``cache_v``'s dtype and device.
        positions: int64 (or int32) ``[B]``, or ``[1]`` for one position shared by all rows.
    """
    check_tensor("cache_k", cache_k, ndim=4)
    check_tensor("cache_v", cache_v, ndim=4)
    check_like("cache_v", cache_v, "cache_k", cache_k, same_dtype=False)
    if tuple(cache_v.shape[:3]) != tuple(cache_k.shape[:3]):
        raise ValueError(f"cache_v of shape {tuple(cache_v.shape)} does not match cache_k "
                         f"{tuple(cache_k.shape)} in [B, kv_heads, S_max]")
    for name, cache in (("cache_k", cache_k), ("cache_v", cache_v)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be dense in its last dim (stride 1), got strides {cache.stride()}")
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_like("k", k, "cache_k", cache_k)
    check_like("v", v, "cache_v", cache_v)
    batch, kv_heads, _, head_dim = cache_k.shape
    if k.shape[0] != batch or k.shape[1] != kv_heads or k.shape[3] != head_dim:
        raise ValueError(f"k of shape {tuple(k.shape)} does not match cache_k {tuple(cache_k.shape)}")
    if tuple(v.shape) != (batch, kv_heads, k.shape[2], cache_v.shape[3]):
        raise ValueError(f"v of shape {tuple(v.shape)} does not match k {tuple(k.shape)} and cache_v "
                         f"{tuple(cache_v.shape)}")
    check_index_tensor("positions", positions, "cache_k", cache_k)
    if positions.dim() != 1 or positions.shape[0] not in (1, batch):
        raise ValueError(f"positions must have shape [B] = [{batch}] or [1], got {tuple(positions.shape)}")
    kv_cache_append_op(cache_k, cache_v, k.detach(), v.detach(), positions.to(torch.int64))
