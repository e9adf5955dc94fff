"""Attention block glue, forward+backward: bias + head split + SDPA + head merge.

Input is the output of a bias-free fused Q/K/V GEMM (``[B, L, 3H]``) plus its bias; output is
``[B, L, H]`` ready for the output projection. Variants:

* eager: ``(qkv + bias).view(...).permute(...)`` (free views) + SDPA + ``transpose/reshape``.
* compile: ``torch.compile`` of the eager code.
* fastpatch: ``split_heads`` (bias + split in one kernel, contiguous heads) + ``attention`` +
  ``merge_heads``.
* fastpatch-view: eager's bias add and views + ``attention`` + ``merge_heads``, i.e. without the
  split kernel; comparing it with "fastpatch" tells the layer code whether the kernel pays off.

The padded BERT case adds a key padding mask, so ``attention``'s mask handling (bool mask,
fully-masked-row fix-up) is part of what is timed; eager passes the same mask straight to SDPA.
"""
import torch
import torch.nn.functional as F

from fastpatch.ops import attention, merge_heads, split_heads
from harness import Case, fwd_bwd

# name: (batch, seq, hidden, heads, causal, padded)
SHAPES = {
    "bert-base B32 L128 H768": (32, 128, 768, 12, False, False),
    "bert-base B32 L128 padded": (32, 128, 768, 12, False, True),
    "gpt2 B8 L1024 H768 causal": (8, 1024, 768, 12, True, False),
}


def _views(qkv, bias, heads):
    batch, seq, width = qkv.shape
    x = (qkv + bias).view(batch, seq, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def _eager(heads, causal, pad):
    keep = None if pad is None else pad.logical_not()[:, None, None, :]

    def fn(qkv, bias):
        q, k, v = _views(qkv, bias, heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
        batch, _, seq, _ = out.shape
        return out.transpose(1, 2).reshape(batch, seq, -1)

    return fn


def _fastpatch(heads, causal, pad):
    def fn(qkv, bias):
        q, k, v = split_heads(qkv, bias, heads)
        return merge_heads(attention(q, k, v, key_padding_mask=pad, causal=causal))

    return fn


def _fastpatch_view(heads, causal, pad):
    def fn(qkv, bias):
        q, k, v = _views(qkv, bias, heads)
        return merge_heads(attention(q, k, v, key_padding_mask=pad, causal=causal))

    return fn


def cases():
    out = []
    for name, (batch, seq, hidden, heads, causal, padded) in SHAPES.items():
        pad = None
        if padded:  # right padding, lengths spread over [L/4, L]
            lengths = torch.randint(seq // 4, seq + 1, (batch,), device="cuda")
            pad = torch.arange(seq, device="cuda")[None, :] >= lengths[:, None]
        for dtype in (torch.float16, torch.bfloat16):
            qkv = torch.randn(batch, seq, 3 * hidden, device="cuda", dtype=dtype, requires_grad=True)
            bias = torch.randn(3 * hidden, device="cuda", dtype=dtype, requires_grad=True)
            eager = _eager(heads, causal, pad)
            out.append(Case("attention glue fwd+bwd", name, str(dtype).split(".")[-1], {
                "eager": fwd_bwd(eager, qkv, bias),
                "compile": fwd_bwd(torch.compile(eager), qkv, bias),
                "fastpatch": fwd_bwd(_fastpatch(heads, causal, pad), qkv, bias),
                "fastpatch-view": fwd_bwd(_fastpatch_view(heads, causal, pad), qkv, bias),
            }))
    return out
