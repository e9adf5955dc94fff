"""fastpatch.ops.attention (split/merge heads, SDPA wrapper, KV cache) against formulas written here."""
import math

import pytest
import torch

from fastpatch.ops import attention, kv_cache_append_, merge_heads, split_heads
from numerics import assert_close_relative, assert_within_factor_of_torch


# ------------------------------------------------------------------------ naive formulas
def naive_split(qkv, bias, num_heads, num_chunks):
    """Index by index: out[c][b, h, l, j] = qkv[b, l, c*H + h*d + j] + bias[...]."""
    x = qkv if bias is None else qkv + bias
    hidden = qkv.shape[-1] // num_chunks
    d = hidden // num_heads
    outs = []
    for c in range(num_chunks):
        heads = [x[:, :, c * hidden + h * d: c * hidden + (h + 1) * d] for h in range(num_heads)]
        outs.append(torch.stack(heads, dim=1))  # [B, heads, L, d]
    return outs


def naive_merge(x):
    batch, heads, seq, d = x.shape
    return torch.cat([x[:, h] for h in range(heads)], dim=-1)  # [B, L, heads*d]


def naive_keep(batch, heads, q_len, kv_len, key_padding_mask=None, causal=False):
    """[B, heads, Lq, S] bool on the CPU, True = attend, built element by element."""
    keep = torch.ones(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            for j in range(kv_len):
                if key_padding_mask is not None and key_padding_mask[b, j]:
                    keep[b, :, i, j] = False
                if causal and j > kv_len - q_len + i:
                    keep[b, :, i, j] = False
    return keep


def naive_attention(q, k, v, keep=None, additive=None, scale=None):
    """softmax(q k^T * scale + additive) v with explicit exp/sum; fully masked rows give zeros."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if additive is not None:
        scores = scores + additive
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep.to(scores.device)
    allowed = allowed & (scores != float("-inf"))
    row_ok = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, -1e300)  # finite, so the exp of an empty row is 0/0-free
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values) * allowed
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    return (weights @ v) * row_ok


def qkv_tensors(batch, heads, q_len, kv_len, d, dtype=torch.float64, kv_heads=None, device="cpu"):
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, heads, q_len, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def grads_of(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=False)


def assert_attention_matches(out, expected, inputs, tol=1e-10):
    assert_close_relative(out, expected, tol, "forward")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", grads_of(out, inputs, g), grads_of(expected, inputs, g)):
        assert torch.isfinite(a).all(), f"grad {name}: non-finite"
        assert_close_relative(a, b, tol, f"grad {name}")


# ------------------------------------------------------------------------- split / merge
@pytest.mark.parametrize("batch, seq, hidden, heads, chunks", [
    (2, 5, 12, 3, 3),   # d = 4
    (1, 1, 10, 2, 3),   # one token, odd head_dim 5
    (3, 4, 13, 1, 2),   # odd hidden, fused K/V
    (2, 7, 24, 4, 1),   # lone Q
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_split_heads_forward_backward_match_formula(batch, seq, hidden, heads, chunks, with_bias):
    qkv = torch.randn(batch, seq, chunks * hidden, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(chunks * hidden, dtype=torch.float64, requires_grad=True) if with_bias else None
    outs = split_heads(qkv, bias, heads, chunks)
    expected = naive_split(qkv, bias, heads, chunks)
    assert len(outs) == chunks
    for o, e in zip(outs, expected):
        assert o.is_contiguous() and o.shape == (batch, heads, seq, hidden // heads)
        assert torch.equal(o, e)
    gs = [torch.randn_like(o) for o in outs]
    leaves = [qkv] + ([bias] if with_bias else [])
    for a, b in zip(torch.autograd.grad(outs, leaves, gs), torch.autograd.grad(expected, leaves, gs)):
        assert_close_relative(a, b, 1e-12, "gradient")


def test_split_heads_gradcheck():
    qkv = torch.randn(2, 3, 18, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(18, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: split_heads(a, b, 2, 3), (qkv, bias))
    assert torch.autograd.gradgradcheck(lambda a, b: split_heads(a, b, 2, 3), (qkv, bias))


def test_split_heads_unused_chunk_gets_zero_gradient():
    qkv = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    q, k, v = split_heads(qkv, None, 2)
    (q.sum() + v.sum()).backward()
    assert torch.equal(qkv.grad[..., 4:8], torch.zeros_like(qkv.grad[..., 4:8]))
    assert torch.equal(qkv.grad[..., :4], torch.ones_like(qkv.grad[..., :4]))


@pytest.mark.parametrize("layout", ["contiguous", "blhd", "permuted"])
def test_merge_heads_matches_formula_for_any_layout(layout):
    base = torch.randn(2, 3, 5, 7, dtype=torch.float64)  # [B, h, L, d] values
    if layout == "contiguous":
        x = base.clone()
    elif layout == "blhd":  # how flash SDPA lays out its output: a free view, no kernel
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = base.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    x.requires_grad_(True)
    out = merge_heads(x)
    assert out.is_contiguous() and torch.equal(out, naive_merge(base))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(grad, g.view(2, 5, 3, 7).transpose(1, 2))


def test_merge_heads_gradcheck_and_round_trip():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(merge_heads, (x,))
    assert torch.autograd.gradgradcheck(merge_heads, (x,))
    (back,) = split_heads(merge_heads(x), None, 3, num_chunks=1)
    assert torch.equal(back, x)
    qkv = torch.randn(2, 4, 3 * 15, dtype=torch.float64)
    merged = torch.cat([merge_heads(t) for t in split_heads(qkv, None, 5)], dim=-1)
    assert torch.equal(merged, qkv)


def test_split_heads_half_precision_on_cpu_reference():
    qkv = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    bias = torch.randn(48, dtype=torch.bfloat16)
    for o, e in zip(split_heads(qkv, bias, 4), naive_split(qkv.float(), bias.float(), 4, 3)):
        assert o.dtype == torch.bfloat16
        assert torch.equal(o, e.to(torch.bfloat16))


# ------------------------------------------------------------------------------ attention
def test_attention_no_mask_with_scale_and_gqa():
    q, k, v = qkv_tensors(2, 4, 5, 6, 8, kv_heads=2)
    out = attention(q, k, v, scale=0.3)
    assert_attention_matches(out, naive_attention(q, k, v, scale=0.3), (q, k, v))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_padding(side, causal):
    batch, heads, seq, d = 3, 2, 6, 4
    lengths = [6, 4, 1]
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            pad[b, n:] = True
        else:
            pad[b, :seq - n] = True
    q, k, v = qkv_tensors(batch, heads, seq, seq, d)
    out = attention(q, k, v, key_padding_mask=pad, causal=causal)
    keep = naive_keep(batch, heads, seq, seq, key_padding_mask=pad, causal=causal)
    assert_attention_matches(out, naive_attention(q, k, v, keep=keep), (q, k, v))
    if side == "left" and causal:
        # query rows inside the left padding see no key at all: zeros, finite gradients
        assert torch.equal(out[2, :, :5], torch.zeros_like(out[2, :, :5]))


@pytest.mark.parametrize("q_len, kv_len", [(6, 6), (3, 7), (1, 5), (5, 3)])
def test_attention_causal_is_bottom_right_aligned(q_len, kv_len):
    q, k, v = qkv_tensors(2, 2, q_len, kv_len, 4)
    out = attention(q, k, v, causal=True)
    keep = naive_keep(2, 2, q_len, kv_len, causal=True)
    assert_attention_matches(out, naive_attention(q, k, v, keep=keep), (q, k, v))


def test_incremental_decoding_equals_full_causal_pass():
    batch, heads, seq, d = 2, 3, 9, 8
    q, k, v = (t.detach() for t in qkv_tensors(batch, heads, seq, seq, d))
    full = attention(q, k, v, causal=True)
    for t in range(seq):  # one token at a time against the growing cache
        step = attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True)
        assert_close_relative(step, full[:, :, t:t + 1], 1e-12, f"token {t}")
    chunk = attention(q[:, :, 4:7], k[:, :, :7], v[:, :, :7], causal=True)  # chunked prefill
    assert_close_relative(chunk, full[:, :, 4:7], 1e-12, "chunk")


def test_attention_additive_4d_mask_combined_with_padding_and_causal():
    batch, heads, q_len, kv_len = 2, 3, 4, 6
    additive = torch.randn(batch, 1, q_len, kv_len, dtype=torch.float64)
    additive[0, 0, 1, ::2] = float("-inf")
    additive[1, 0, 0, :] = float("-inf")  # a fully masked row
    pad = torch.zeros(batch, kv_len, dtype=torch.bool)
    pad[1, -1] = True
    q, k, v = qkv_tensors(batch, heads, q_len, kv_len, 5)
    out = attention(q, k, v, attn_mask=additive, key_padding_mask=pad, causal=True)
    keep = naive_keep(batch, heads, q_len, kv_len, key_padding_mask=pad, causal=True)
    expected = naive_attention(q, k, v, keep=keep, additive=additive)
    assert_attention_matches(out, expected, (q, k, v))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))


def test_attention_bool_4d_mask_per_head():
    batch, heads, q_len, kv_len = 2, 3, 5, 5
    mask = torch.rand(batch, heads, q_len, kv_len) > 0.4
    mask[0, 1, 2] = False  # a fully masked row
    q, k, v = qkv_tensors(batch, heads, q_len, kv_len, 4)
    out = attention(q, k, v, attn_mask=mask)
    assert_attention_matches(out, naive_attention(q, k, v, keep=mask), (q, k, v))
    assert torch.equal(out[0, 1, 2], torch.zeros_like(out[0, 1, 2]))


def test_attention_fully_masked_rows_in_half_precision_are_finite():
    q, k, v = qkv_tensors(2, 2, 4, 4, 8, dtype=torch.bfloat16)
    pad = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = attention(q, k, v, key_padding_mask=pad, causal=True)
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(t.grad.float()).all() for t in (q, k, v))
    assert torch.equal(out[0, :, :2].float(), torch.zeros(2, 2, 8))


def test_attention_gradcheck_with_masks():
    q, k, v = qkv_tensors(1, 2, 3, 4, 3)
    pad = torch.tensor([[True, False, False, False]])
    additive = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    fn = lambda a, b, c: attention(a, b, c, key_padding_mask=pad, causal=True, attn_mask=additive)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("cudnn_on", [True, False])
def test_masked_backward_calls_run_without_cudnn_and_restore_the_users_setting(cudnn_on):
    # the eager twin of sdpa_kernel(...) used for differentiated masked calls on CUDA
    from fastpatch.ops.attention import _without_cudnn_sdp

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn_on)
    try:
        seen = _without_cudnn_sdp(torch.backends.cuda.cudnn_sdp_enabled)
        assert seen is False
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn_on

        def fails():
            raise RuntimeError("inside")
        with pytest.raises(RuntimeError, match="inside"):
            _without_cudnn_sdp(fails)
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn_on
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_attention_dropout_statistics_reproducibility_and_eval():
    q = torch.zeros(4, 4, 64, 16)  # uniform attention weights over the keys
    k = torch.zeros(4, 4, 256, 16)
    v = torch.ones(4, 4, 256, 16)
    torch.manual_seed(5)
    a = attention(q, k, v, dropout_p=0.25)
    b = attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(5)
    c = attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert abs(a.mean().item() - 1.0) < 0.01  # 1/(1-p) rescaling keeps the expectation
    assert torch.equal(attention(q, k, v, dropout_p=0.25, training=False), torch.ones(4, 4, 64, 16))


# ------------------------------------------------------------------------------- KV cache
def naive_append(cache, new, positions):
    cache = cache.clone()
    for b in range(new.shape[0]):
        start = int(positions[b if positions.numel() > 1 else 0])
        for t in range(new.shape[2]):
            if 0 <= start + t < cache.shape[2]:
                cache[b, :, start + t] = new[b, :, t]
    return cache


@pytest.mark.parametrize("positions", [[0, 3, 5], [2], [6, -1, 4]], ids=["ragged", "shared", "out-of-range"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kv_cache_append_matches_index_assignment(positions, index_dtype):
    batch, heads, max_len, new = 3, 2, 8, 3
    cache_k = torch.randn(batch, heads, max_len, 4)
    cache_v = torch.randn(batch, heads, max_len, 6)  # values may have their own head_dim
    k, v = torch.randn(batch, heads, new, 4), torch.randn(batch, heads, new, 6)
    pos = torch.tensor(positions, dtype=index_dtype)
    expected_k, expected_v = naive_append(cache_k, k, pos), naive_append(cache_v, v, pos)
    kv_cache_append_(cache_k, cache_v, k, v, pos)
    assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)


def test_kv_cache_append_into_strided_cache_from_strided_source():
    storage_k = torch.randn(2, 10, 3, 4)  # [B, S_max, h, d] storage, used as [B, h, S_max, d]
    storage_v = torch.randn(2, 10, 3, 4)
    cache_k, cache_v = storage_k.transpose(1, 2), storage_v.transpose(1, 2)
    k = torch.randn(2, 2, 3, 4).transpose(1, 2)  # [B, h, n=2, d], non-contiguous
    v = torch.randn(2, 2, 3, 4).transpose(1, 2)
    pos = torch.tensor([1, 7])
    expected_k, expected_v = naive_append(cache_k, k, pos), naive_append(cache_v, v, pos)
    kv_cache_append_(cache_k, cache_v, k, v, pos)
    assert torch.equal(storage_k.transpose(1, 2), expected_k)
    assert torch.equal(storage_v.transpose(1, 2), expected_v)


# ------------------------------------------------------------------------------ bad input
def _split_kwargs():
    return dict(qkv=torch.ones(2, 3, 12), bias=None, num_heads=2, num_chunks=3)


def _attn_kwargs():
    q = torch.ones(2, 4, 3, 8)
    return dict(q=q, k=torch.ones(2, 4, 5, 8), v=torch.ones(2, 4, 5, 8))


def _append_kwargs():
    return dict(cache_k=torch.zeros(2, 3, 8, 4), cache_v=torch.zeros(2, 3, 8, 4),
                k=torch.ones(2, 3, 1, 4), v=torch.ones(2, 3, 1, 4), positions=torch.tensor([0, 1]))


@pytest.mark.parametrize("fn, defaults, bad, error, name", [
    (split_heads, _split_kwargs, dict(qkv=torch.ones(2, 12)), ValueError, "qkv"),
    (split_heads, _split_kwargs, dict(qkv=torch.ones(2, 3, 12, dtype=torch.int32)), TypeError, "qkv"),
    (split_heads, _split_kwargs, dict(qkv=torch.ones(2, 3, 13)), ValueError, "qkv"),
    (split_heads, _split_kwargs, dict(num_heads=3), ValueError, "num_heads"),
    (split_heads, _split_kwargs, dict(num_heads=2.0), TypeError, "num_heads"),
    (split_heads, _split_kwargs, dict(num_chunks=0), ValueError, "num_chunks"),
    (split_heads, _split_kwargs, dict(bias=torch.ones(4)), ValueError, "bias"),
    (split_heads, _split_kwargs, dict(bias=torch.ones(12, dtype=torch.float16)), TypeError, "bias"),
    (merge_heads, lambda: dict(x=torch.ones(2, 3, 4)), {}, ValueError, "x"),
    (attention, _attn_kwargs, dict(q=torch.ones(2, 4, 3)), ValueError, "q"),
    (attention, _attn_kwargs, dict(k=torch.ones(2, 4, 5, 8, dtype=torch.float64)), TypeError, "k"),
    (attention, _attn_kwargs, dict(k=torch.ones(2, 3, 5, 8), v=torch.ones(2, 3, 5, 8)), ValueError, "heads"),
    (attention, _attn_kwargs, dict(v=torch.ones(2, 4, 6, 8)), ValueError, "v"),
    (attention, _attn_kwargs, dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    (attention, _attn_kwargs, dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask"),
    (attention, _attn_kwargs, dict(attn_mask=torch.zeros(2, 4, 3, 4)), ValueError, "attn_mask"),
    (attention, _attn_kwargs, dict(attn_mask=torch.zeros(3, 1, 1, 5)), ValueError, "attn_mask"),
    (attention, _attn_kwargs, dict(attn_mask=torch.zeros(1, 2, 4, 3, 5)), ValueError, "attn_mask"),
    (attention, _attn_kwargs, dict(attn_mask=torch.zeros(3, 5, dtype=torch.int64)), TypeError, "attn_mask"),
    (attention, _attn_kwargs, dict(dropout_p=1.5), ValueError, "dropout_p"),
    (attention, _attn_kwargs, dict(scale=-1.0), ValueError, "scale"),
    (attention, _attn_kwargs, dict(causal=1), TypeError, "causal"),
    (kv_cache_append_, _append_kwargs, dict(positions=torch.tensor([0.0, 1.0])), TypeError, "positions"),
    (kv_cache_append_, _append_kwargs, dict(positions=torch.tensor([0, 1, 2])), ValueError, "positions"),
    (kv_cache_append_, _append_kwargs, dict(k=torch.ones(2, 3, 1, 5)), ValueError, "k"),
    (kv_cache_append_, _append_kwargs, dict(v=torch.ones(2, 3, 1, 4, dtype=torch.float16)), TypeError, "v"),
    (kv_cache_append_, _append_kwargs, dict(cache_v=torch.zeros(2, 3, 9, 4)), ValueError, "cache_v"),
    (kv_cache_append_, _append_kwargs, dict(cache_k=torch.zeros(2, 3, 4, 8).transpose(-1, -2)), ValueError,
     "cache_k"),
])
def test_bad_input_names_the_argument(fn, defaults, bad, error, name):
    kwargs = defaults()
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        fn(**kwargs)


# -------------------------------------------------------------------- library integration
def test_opcheck():
    qkv = torch.randn(2, 3, 12, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpatch.split_heads.default, (qkv, bias, 2, 3))
    x = torch.randn(3, 2, 5, 2, 4).permute(0, 1, 3, 2, 4).requires_grad_(True)  # [C, B, h, L, d], strided
    torch.library.opcheck(torch.ops.fastpatch.merge_heads.default, (x,))
    cache_k, cache_v = torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, 8, 4)
    new = (torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4), torch.tensor([1, 5]))
    torch.library.opcheck(torch.ops.fastpatch.kv_cache_append.default, (cache_k, cache_v) + new)


def test_torch_compile_fullgraph_attention_block():
    batch, seq, heads, hidden = 2, 5, 2, 8
    qkv = torch.randn(batch, seq, 3 * hidden, requires_grad=True)
    bias = torch.randn(3 * hidden, requires_grad=True)
    pad = torch.tensor([[False] * seq, [True, True] + [False] * (seq - 2)])

    def block(x, b):
        q, k, v = split_heads(x, b, heads)
        return merge_heads(attention(q, k, v, key_padding_mask=pad, causal=True))

    out = torch.compile(block, fullgraph=True, backend="aot_eager")(qkv, bias)
    assert_close_relative(out, block(qkv, bias), 1e-6)
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(bias.grad).all()


def test_torch_compile_fullgraph_decode_step_with_lower_right_causal():
    cache_k, cache_v = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    k, v, q = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 2, 4)

    def step(q, k, v, pos):
        kv_cache_append_(cache_k, cache_v, k, v, pos)
        return attention(q, cache_k[:, :, :3], cache_v[:, :, :3], causal=True)  # Lq < S, traced mask

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, torch.tensor([0]))
    assert torch.equal(cache_k[:, :, :3], k)
    keep = naive_keep(2, 2, 2, 3, causal=True)
    assert_close_relative(out, naive_attention(q.double(), k.double(), v.double(), keep=keep), 1e-6)


# ----------------------------------------------------------------------------------- GPU
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _require_kernel(name, t):
    from fastpatch.ops._dispatch import kernel_for
    assert kernel_for(name, t) is not None, "CUDA kernel not loaded"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("batch, seq, hidden, heads, chunks", [
    (1, 1, 64, 1, 3),        # one token
    (32, 128, 768, 12, 3),   # BERT-base
    (1, 8192, 1024, 16, 3),  # 8192 tokens
    (2, 33, 8192, 64, 2),    # hidden 8192, fused K/V
    (3, 17, 100, 4, 3),      # head_dim 25: scalar path
    (4, 9, 72, 3, 1),        # head_dim 24: 16-byte packs for fp16, not a power of two
])
def test_cuda_split_merge_kernels(dtype, batch, seq, hidden, heads, chunks):
    _require_kernel("attn_split_heads", torch.empty(1, device="cuda"))
    qkv32 = torch.randn(batch, seq, chunks * hidden, device="cuda")
    b32 = torch.randn(chunks * hidden, device="cuda")
    qkv, b = qkv32.to(dtype).requires_grad_(True), b32.to(dtype).requires_grad_(True)
    outs = split_heads(qkv, b, heads, chunks)
    plain = naive_split(qkv.detach(), b.detach(), heads, chunks)  # same precision, same rounding
    for o, p in zip(outs, plain):
        assert o.is_contiguous() and torch.equal(o, p)
    gs = [torch.randn_like(o) for o in outs]
    grad_qkv, grad_b = torch.autograd.grad(outs, (qkv, b), gs)
    expected_grad = torch.cat([naive_merge(g) for g in gs], dim=-1)
    assert torch.equal(grad_qkv, expected_grad)
    ref_b = expected_grad.double().sum((0, 1))
    plain_b = expected_grad.sum((0, 1))
    assert_within_factor_of_torch(grad_b, plain_b, ref_b, "grad bias")
    # merge: contiguous and arbitrarily strided inputs run the kernel, [B, L, h, d] storage a view
    base = outs[0].detach()
    for t in (base, base.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),
              base.transpose(1, 2).contiguous().transpose(1, 2)):
        assert torch.equal(merge_heads(t), naive_merge(base))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, q_len, kv_len, d, causal, padded", [
    (32, 12, 128, 128, 64, False, True),   # BERT with right padding
    (8, 12, 1024, 1024, 64, True, False),  # GPT-2, is_causal fast path
    (4, 8, 7, 300, 128, True, True),       # chunked prefill against a cache, padded keys
    (2, 4, 16, 80, 64, True, False),       # chunked prefill, causal only: causal_lower_right path
    (1, 4, 8192, 8192, 64, True, False),   # 8192 tokens
    (2, 3, 1, 33, 80, True, False),        # one decoded token, odd sizes
])
def test_cuda_attention_error_within_rule(dtype, batch, heads, q_len, kv_len, d, causal, padded):
    q32, k32, v32 = (t.detach() for t in qkv_tensors(batch, heads, q_len, kv_len, d, torch.float32, device="cuda"))
    pad = None
    if padded:  # right padding, no row fully masked
        lengths = torch.randint(1, kv_len + 1, (batch,), device="cuda")
        lengths[0] = kv_len
        pad = torch.arange(kv_len, device="cuda")[None, :] >= lengths[:, None]
    keep = None
    if pad is not None or causal:
        keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device="cuda")
        if pad is not None:
            keep &= ~pad[:, None, None, :]
        if causal:
            keep &= torch.ones(q_len, kv_len, dtype=torch.bool, device="cuda").tril(kv_len - q_len)
    fused_in = [t.to(dtype).requires_grad_(True) for t in (q32, k32, v32)]
    plain_in = [t.to(dtype).requires_grad_(True) for t in (q32, k32, v32)]
    ref_in = [t.to(dtype).double().requires_grad_(True) for t in (q32, k32, v32)]
    out = attention(*fused_in, key_padding_mask=pad, causal=causal)
    if pad is None and causal and q_len == kv_len:
        plain = torch.nn.functional.scaled_dot_product_attention(*plain_in, is_causal=True)
    else:
        plain = torch.nn.functional.scaled_dot_product_attention(*plain_in, attn_mask=keep)
    ref = naive_attention(*ref_in, keep=keep)
    assert_within_factor_of_torch(out, plain, ref, "forward")
    g = torch.randn_like(out)
    for name, a, p, r in zip("qkv", torch.autograd.grad(out, fused_in, g), torch.autograd.grad(plain, plain_in, g),
                             torch.autograd.grad(ref, ref_in, g.double())):
        assert_within_factor_of_torch(a, p, r, f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_fully_masked_rows_are_finite(dtype):
    q, k, v = qkv_tensors(4, 4, 64, 64, 64, dtype=dtype, device="cuda")
    pad = torch.zeros(4, 64, dtype=torch.bool, device="cuda")
    pad[1, :10] = True  # left padding: query rows 0..9 of sequence 1 see nothing under causal
    pad[2, :] = True    # an empty sequence
    additive = torch.zeros(4, 1, 64, 64, dtype=dtype, device="cuda")
    additive[3, :, 5] = float("-inf")
    out = attention(q, k, v, key_padding_mask=pad, causal=True, attn_mask=additive)
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(t.grad.float()).all() for t in (q, k, v))
    assert (out[1, :, :10] == 0).all() and (out[2] == 0).all() and (out[3, :, 5] == 0).all()
    keep = naive_keep(4, 4, 64, 64, key_padding_mask=pad.cpu(), causal=True).cuda()
    ref = naive_attention(q.detach().double(), k.detach().double(), v.detach().double(), keep=keep,
                          additive=additive.double())
    assert_close_relative(out, ref, 1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("d, strided", [(64, False), (33, False), (128, True)])
def test_cuda_kv_cache_append_matches_index_assignment(dtype, d, strided):
    _require_kernel("attn_kv_cache_append", torch.empty(1, device="cuda"))
    batch, heads, max_len, new = 5, 4, 64, 3
    if strided:
        cache_k = torch.randn(batch, max_len, heads, d, device="cuda", dtype=dtype).transpose(1, 2)
        cache_v = torch.randn(batch, max_len, heads, d, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        cache_k = torch.randn(batch, heads, max_len, d, device="cuda", dtype=dtype)
        cache_v = torch.randn(batch, heads, max_len, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, heads, new, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, heads, new, d, device="cuda", dtype=dtype)
    for positions in ([0, 10, 62, -2, 61], [7]):
        pos = torch.tensor(positions, device="cuda")
        expected_k, expected_v = naive_append(cache_k, k, pos), naive_append(cache_v, v, pos)
        kv_cache_append_(cache_k, cache_v, k, v, pos)
        assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)


@pytest.mark.cuda
def test_cuda_opcheck():
    _require_kernel("attn_split_heads", torch.empty(1, device="cuda"))
    qkv = torch.randn(2, 3, 48, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(48, device="cuda", dtype=torch.float16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpatch.split_heads.default, (qkv, bias, 2, 3))
    x = torch.randn(3, 2, 5, 2, 8, device="cuda").permute(0, 1, 3, 2, 4).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastpatch.merge_heads.default, (x,))
    cache_k, cache_v = torch.zeros(2, 3, 8, 16, device="cuda"), torch.zeros(2, 3, 8, 16, device="cuda")
    new = (torch.randn(2, 3, 2, 16, device="cuda"), torch.randn(2, 3, 2, 16, device="cuda"),
           torch.tensor([1, 5], device="cuda"))
    torch.library.opcheck(torch.ops.fastpatch.kv_cache_append.default, (cache_k, cache_v) + new)


@pytest.mark.cuda
def test_cuda_compile_fullgraph_attention_block():
    qkv = torch.randn(4, 128, 3 * 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(3 * 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pad = torch.zeros(4, 128, dtype=torch.bool, device="cuda")
    pad[1, 100:] = True

    def block(x, b):
        q, k, v = split_heads(x, b, 4)
        return merge_heads(attention(q, k, v, key_padding_mask=pad))

    out = torch.compile(block, fullgraph=True)(qkv, bias)
    torch.testing.assert_close(out, block(qkv, bias), rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert torch.isfinite(qkv.grad.float()).all() and torch.isfinite(bias.grad.float()).all()


@pytest.mark.cuda
def test_cuda_graph_captures_a_ragged_decode_step():
    """append + attention over a static cache, replayed with advancing device-side positions."""
    batch, heads, max_len, d, dtype = 3, 4, 32, 64, torch.float16
    cache_k = torch.zeros(batch, heads, max_len, d, device="cuda", dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    history_k = torch.randn(batch, heads, max_len, d, device="cuda", dtype=dtype)
    history_v = torch.randn_like(history_k)
    start = torch.tensor([5, 0, 11], device="cuda")  # ragged: rows hold different lengths
    kv_cache_append_(cache_k, cache_v, history_k, history_v, torch.zeros(1, dtype=torch.int64, device="cuda"))
    positions = start.clone()
    static_q = torch.randn(batch, heads, 1, d, device="cuda", dtype=dtype)
    static_k, static_v = torch.randn_like(static_q), torch.randn_like(static_q)
    slots = torch.arange(max_len, device="cuda")

    def step():
        kv_cache_append_(cache_k, cache_v, static_k, static_v, positions)
        padding = slots[None, :] > positions[:, None]  # True = not yet written for this row
        out = attention(static_q, cache_k, cache_v, key_padding_mask=padding)
        positions.add_(1)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside capture (it also advances positions once)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    positions.copy_(start)
    cache_k.copy_(history_k)
    cache_v.copy_(history_v)
    for _ in range(4):
        for t in (static_q, static_k, static_v):
            t.copy_(torch.randn_like(t))
        before = positions.clone()
        graph.replay()
        for b in range(batch):
            n = int(before[b])
            keys = torch.cat([history_k[b:b + 1, :, :n], static_k[b:b + 1]], dim=2)
            values = torch.cat([history_v[b:b + 1, :, :n], static_v[b:b + 1]], dim=2)
            ref = naive_attention(static_q[b:b + 1].double(), keys.double(), values.double())
            assert_close_relative(out[b:b + 1], ref, 2e-3, f"row {b}")
            history_k[b, :, n], history_v[b, :, n] = static_k[b, :, 0], static_v[b, :, 0]
        assert torch.equal(positions, before + 1)
