"""Plain-PyTorch transformer layers written from fairseq's and Hugging Face's definitions.

They are the references the fused layers are tested against, so they use nothing from
fastpatch: ``nn.Linear``/``nn.LayerNorm`` modules with the frameworks' own parameter names, an
explicit softmax attention in fp32 (as fairseq's ``utils.softmax``), and masks filled with the
dtype's most negative value (as HF does), which keeps fully masked rows (left padding under a
causal mask) finite instead of NaN.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def softmax_attention(q, k, v, *, scale, key_padding_mask=None, causal=False, attn_mask=None,
                      dropout_p=0.0, training=False):
    """q ``[B, h, L, d]``, k/v ``[B, h, S, d]``; key_padding_mask bool ``[B, S]`` (True = pad);
    causal aligned bottom-right; attn_mask additive float broadcastable to ``[B, h, L, S]``."""
    scores = (q * scale) @ k.transpose(-1, -2)
    scores = scores.float()
    neg = torch.finfo(scores.dtype).min
    if attn_mask is not None:
        scores = scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], neg)
    if causal:
        length, keys = scores.shape[-2:]
        future = torch.ones(length, keys, dtype=torch.bool, device=q.device).triu(keys - length + 1)
        scores = scores.masked_fill(future, neg)
    probs = scores.softmax(-1).to(q.dtype)
    probs = F.dropout(probs, dropout_p, training)
    return probs @ v


def split(x, heads):
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def merge(x):
    b, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * d)


class FairseqMultiheadAttention(nn.Module):
    """fairseq's ``MultiheadAttention`` (batch-first here): q scaled after its bias."""

    def __init__(self, embed_dim, heads, kdim=None, bias=True, out_bias=True, dropout=0.0,
                 scaling=None):
        super().__init__()
        kdim = kdim or embed_dim
        self.heads = heads
        self.dropout = dropout
        self.scaling = scaling if scaling is not None else (embed_dim // heads) ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_bias)

    def forward(self, query, key, value, key_padding_mask=None, causal=False, attn_mask=None):
        q = split(self.q_proj(query), self.heads)
        k = split(self.k_proj(key), self.heads)
        v = split(self.v_proj(value), self.heads)
        ctx = softmax_attention(q, k, v, scale=self.scaling, key_padding_mask=key_padding_mask,
                                causal=causal, attn_mask=attn_mask, dropout_p=self.dropout,
                                training=self.training)
        return self.out_proj(merge(ctx))


class FairseqEncoderLayer(nn.Module):
    """fairseq's ``TransformerEncoderLayer`` (``normalize_before`` = pre-LN)."""

    def __init__(self, embed_dim, heads, ffn_dim, normalize_before=False, activation="relu",
                 eps=1e-5, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 causal=False, bias=True, scaling=None):
        super().__init__()
        self.self_attn = FairseqMultiheadAttention(embed_dim, heads, bias=bias, out_bias=bias,
                                                   dropout=attention_dropout, scaling=scaling)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.normalize_before = normalize_before
        self.activation_fn = ACTIVATIONS[activation]
        self.dropout, self.activation_dropout = dropout, activation_dropout
        self.causal = causal

    def _ffn(self, x):
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.activation_fn(self.fc1(x))
        x = F.dropout(x, self.activation_dropout, self.training)
        x = F.dropout(self.fc2(x), self.dropout, self.training)
        x = residual + x
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x

    def forward(self, x, encoder_padding_mask=None, attn_mask=None):
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, x, x, key_padding_mask=encoder_padding_mask, causal=self.causal,
                           attn_mask=attn_mask)
        x = residual + F.dropout(x, self.dropout, self.training)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        return self._ffn(x)


class FairseqDecoderLayer(FairseqEncoderLayer):
    """fairseq's ``TransformerDecoderLayer``: causal self-attention, ``encoder_attn``, FFN."""

    def __init__(self, embed_dim, heads, ffn_dim, encoder_dim=None, **kwargs):
        kwargs.setdefault("causal", True)
        super().__init__(embed_dim, heads, ffn_dim, **kwargs)
        bias = self.fc1.bias is not None
        self.encoder_attn = FairseqMultiheadAttention(
            embed_dim, heads, kdim=encoder_dim, bias=bias, out_bias=bias,
            dropout=self.self_attn.dropout, scaling=self.self_attn.scaling)
        self.encoder_attn_layer_norm = nn.LayerNorm(embed_dim,
                                                    eps=self.self_attn_layer_norm.eps)

    def forward(self, x, encoder_out=None, encoder_padding_mask=None,
                self_attn_padding_mask=None):
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, x, x, key_padding_mask=self_attn_padding_mask, causal=self.causal)
        x = residual + F.dropout(x, self.dropout, self.training)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.normalize_before:
            x = self.encoder_attn_layer_norm(x)
        x = self.encoder_attn(x, encoder_out, encoder_out, key_padding_mask=encoder_padding_mask)
        x = residual + F.dropout(x, self.dropout, self.training)
        if not self.normalize_before:
            x = self.encoder_attn_layer_norm(x)
        return self._ffn(x)


class _Holder(nn.Module):
    """An empty module, to reproduce HF's nesting (``attention.self.query``...)."""


class BertLayer(nn.Module):
    """Hugging Face ``BertLayer``: post-LN, exact GELU, no activation dropout, LN eps 1e-12,
    attention mask given as an additive ``[B, 1, 1, L]`` tensor."""

    def __init__(self, hidden, heads, intermediate, eps=1e-12, activation="gelu",
                 hidden_dropout=0.0, attention_dropout=0.0):
        super().__init__()
        self.heads = heads
        self.attention = _Holder()
        self.attention.add_module("self", _Holder())
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = _Holder()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = _Holder()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = _Holder()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.act = ACTIVATIONS[activation]
        self.hidden_dropout, self.attention_dropout = hidden_dropout, attention_dropout

    def forward(self, hidden_states, attention_mask=None):
        s = self.attention.self
        q, k, v = (split(m(hidden_states), self.heads) for m in (s.query, s.key, s.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = F.dropout(scores.softmax(-1), self.attention_dropout, self.training)
        ctx = merge(probs @ v)
        o = self.attention.output
        attn = o.LayerNorm(F.dropout(o.dense(ctx), self.hidden_dropout, self.training)
                           + hidden_states)
        inter = self.act(self.intermediate.dense(attn))
        out = F.dropout(self.output.dense(inter), self.hidden_dropout, self.training)
        return self.output.LayerNorm(out + attn)


def bert_extended_mask(padding_mask, dtype=torch.float32):
    """HF's ``get_extended_attention_mask``: ``[B, L]`` (True = pad) -> additive ``[B,1,1,L]``."""
    return padding_mask[:, None, None, :].to(dtype) * torch.finfo(dtype).min


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` stored ``[in, out]``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Block(nn.Module):
    """Hugging Face ``GPT2Block``: pre-LN, causal, tanh GELU, Conv1D projections."""

    def __init__(self, hidden, heads, inner, eps=1e-5, scale=None):
        super().__init__()
        self.heads = heads
        self.scale = scale if scale is not None else (hidden // heads) ** -0.5
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = _Holder()
        self.attn.c_attn = Conv1D(3 * hidden, hidden)
        self.attn.c_proj = Conv1D(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = _Holder()
        self.mlp.c_fc = Conv1D(inner, hidden)
        self.mlp.c_proj = Conv1D(hidden, inner)

    def forward(self, x, padding_mask=None):
        h = self.ln_1(x)
        q, k, v = (split(t, self.heads) for t in self.attn.c_attn(h).chunk(3, dim=-1))
        ctx = softmax_attention(q, k, v, scale=self.scale, key_padding_mask=padding_mask,
                                causal=True)
        x = x + self.attn.c_proj(merge(ctx))
        h = self.ln_2(x)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(h), approximate="tanh"))


# ------------------------------------------------------------------------------ test helpers
def randomize_(module, scale=0.3):
    """Random weights everywhere (LayerNorms around 1), so no term hides behind a zero init."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm = "norm" in name.lower() or name.startswith("ln_")
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return module


def padding_mask(lengths, total, side):
    """bool [B, total], True = padding, on the ``side`` ("left"/"right") of each row."""
    idx = torch.arange(total)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    if side == "right":
        return idx >= lengths
    return idx < total - lengths
