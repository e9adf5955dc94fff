"""Transformer embedding, forward+backward: eager vs torch.compile vs fastpatch.

BERT-base (learned positions, token types, LayerNorm eps 1e-12, dropout 0.1) and the fairseq
transformer (sqrt(H) scale, sinusoidal positions from make_positions, dropout 0.1). Each eager
variant is the code those models run; fairseq's sinusoid table is built once outside the timing,
as fairseq caches it.
"""
import math

import torch
import torch.nn.functional as F

from fastpatch.ops import fairseq_positions, transformer_embedding
from harness import Case, fwd_bwd

BERT = dict(vocab=30522, hidden=768, max_positions=512, eps=1e-12, pad=0)
# 32x128 and 8x512 (4096 tokens) take ~0.1-0.3 ms of GPU time, so their wall-clock times mostly
# measure per-call host overhead (Python, dispatch, autograd) of each variant; 64x512 (32768
# tokens) is GPU-bound and shows the kernels' difference.
BERT_BATCHES = [(32, 128), (8, 512), (64, 512)]
FAIRSEQ = dict(vocab=40000, pad=1)
FAIRSEQ_BATCHES = [(512, 16, 256), (1024, 16, 256)]  # (hidden, batch, seq): 4096 tokens
P = 0.1


def bert_eager(ids, pos_ids, type_ids, w, pw, tw, lw, lb):
    """transformers' BertEmbeddings.forward."""
    x = F.embedding(ids, w, padding_idx=BERT["pad"]) + F.embedding(type_ids, tw)
    x = x + F.embedding(pos_ids, pw)
    x = F.layer_norm(x, (w.shape[1],), lw, lb, BERT["eps"])
    return F.dropout(x, P, training=True)


def bert_fused(ids, pos_ids, type_ids, w, pw, tw, lw, lb):
    return transformer_embedding(ids, w, position_ids=pos_ids, position_weight=pw,
                                 token_type_ids=type_ids, token_type_weight=tw, ln_weight=lw,
                                 ln_bias=lb, eps=BERT["eps"], p=P, token_padding_idx=BERT["pad"])


def fairseq_eager(ids, table, w):
    """fairseq's TransformerEncoder.forward_embedding with SinusoidalPositionalEmbedding."""
    pad = FAIRSEQ["pad"]
    mask = ids.ne(pad).int()
    positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad
    pos = table.index_select(0, positions.view(-1)).view(*ids.shape, -1).detach()
    x = math.sqrt(w.shape[1]) * F.embedding(ids, w, padding_idx=pad) + pos
    return F.dropout(x, P, training=True)


def fairseq_fused(ids, table, w):
    pad = FAIRSEQ["pad"]
    return transformer_embedding(ids, w, position_ids=fairseq_positions(ids, pad), sinusoidal=True,
                                 padding_idx=pad, scale=math.sqrt(w.shape[1]), p=P,
                                 token_padding_idx=pad)


def _padded_ids(batch, seq, vocab, pad):
    """Random ids, right-padded to lengths spread over [seq / 2, seq]."""
    ids = torch.randint(pad + 1, vocab, (batch, seq), device="cuda")
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), device="cuda")
    return ids.masked_fill(torch.arange(seq, device="cuda") >= lengths, pad)


def _sinusoid_table(num, dim, pad):
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(num, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    table[pad] = 0
    return table


def cases():
    bert_compiled, fairseq_compiled = torch.compile(bert_eager), torch.compile(fairseq_eager)
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        for batch, seq in BERT_BATCHES:
            v, h = BERT["vocab"], BERT["hidden"]
            ids = _padded_ids(batch, seq, v, BERT["pad"])
            pos_ids = torch.arange(seq, device="cuda").unsqueeze(0)
            type_ids = torch.randint(0, 2, (batch, seq), device="cuda")

            def param(*shape, base=0.0):
                return (base + 0.02 * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_(True)

            inputs = (ids, pos_ids, type_ids, param(v, h), param(BERT["max_positions"], h),
                      param(2, h), param(h, base=1.0), param(h))
            out.append(Case("embedding bert fwd+bwd", f"bert-base {batch}x{seq} H{h}", name, {
                "eager": fwd_bwd(bert_eager, *inputs),
                "compile": fwd_bwd(bert_compiled, *inputs),
                "fastpatch": fwd_bwd(bert_fused, *inputs),
            }))
        for h, batch, seq in FAIRSEQ_BATCHES:
            v, pad = FAIRSEQ["vocab"], FAIRSEQ["pad"]
            ids = _padded_ids(batch, seq, v, pad)
            table = _sinusoid_table(seq + pad + 1, h, pad).to("cuda", dtype)
            w = (torch.randn(v, h, device="cuda") * h ** -0.5).to(dtype).requires_grad_(True)
            out.append(Case("embedding fairseq fwd+bwd", f"fairseq {batch}x{seq} H{h}", name, {
                "eager": fwd_bwd(fairseq_eager, ids, table, w),
                "compile": fwd_bwd(fairseq_compiled, ids, table, w),
                "fastpatch": fwd_bwd(fairseq_fused, ids, table, w),
            }))
    return out
