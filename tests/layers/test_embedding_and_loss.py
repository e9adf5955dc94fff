"""TransformerEmbedding against fairseq's and HF BERT's embeddings written here, and the loss
modules against fairseq's ``label_smoothed_nll_loss`` written here."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpatch.layers import (EmbeddingConfig, LabelSmoothedCrossEntropy, LinearCrossEntropy,
                              TransformerEmbedding)
from numerics import assert_close_relative

TOL = 1e-5


def fairseq_sinusoid_table(num, dim, padding_idx):
    """fairseq's ``SinusoidalPositionalEmbedding.get_embedding``."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    angles = torch.arange(num, dtype=torch.float)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx] = 0
    return table


def make_positions(tokens, padding_idx):
    mask = tokens.ne(padding_idx).long()
    return torch.cumsum(mask, dim=1) * mask + padding_idx


class FairseqEmbedding(nn.Module):
    """fairseq's encoder embedding: ``dropout(LN?(sqrt(H) * embed_tokens(x) + positions))``."""

    def __init__(self, vocab, dim, padding_idx, learned=False, max_positions=64, layernorm=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.padding_idx, self.dim, self.learned = padding_idx, dim, learned
        if learned:
            self.embed_positions = nn.Embedding(max_positions + padding_idx + 1, dim,
                                                padding_idx=padding_idx)
        self.layernorm_embedding = nn.LayerNorm(dim) if layernorm else None

    def forward(self, tokens):
        x = math.sqrt(self.dim) * self.embed_tokens(tokens)
        positions = make_positions(tokens, self.padding_idx)
        if self.learned:
            x = x + self.embed_positions(positions)
        else:
            table = fairseq_sinusoid_table(int(positions.max()) + 1, self.dim, self.padding_idx)
            x = x + table[positions]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x


def randomize_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def tokens_with_padding(batch, length, vocab, pad, side):
    tokens = torch.randint(0, vocab, (batch, length))
    tokens[tokens == pad] = (pad + 1) % vocab
    for row in range(1, batch):
        n = min(length - 1, 2 * row)
        if side == "right":
            tokens[row, length - n:] = pad
        else:
            tokens[row, :n] = pad
    return tokens


def compare_grads(fused, names, plain_params, tol=TOL):
    for fused_name, plain_param in zip(names, plain_params):
        assert_close_relative(getattr(fused, fused_name).grad, plain_param.grad, tol, fused_name)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("layernorm", [False, True])
def test_matches_fairseq_embedding(learned, layernorm, side):
    pad = 1
    plain = randomize_(FairseqEmbedding(50, 36, pad, learned=learned, layernorm=layernorm))
    with torch.no_grad():
        plain.embed_tokens.weight[pad].zero_()
    config = EmbeddingConfig(50, 36, padding_idx=pad,
                             positions="learned" if learned else "sinusoidal",
                             max_positions=64 + pad + 1, fairseq_positions=True,
                             scale=math.sqrt(36), layer_norm=layernorm)
    fused = TransformerEmbedding(config)
    with torch.no_grad():
        fused.token_weight.copy_(plain.embed_tokens.weight)
        if learned:
            fused.position_weight.copy_(plain.embed_positions.weight)
        if layernorm:
            fused.norm_weight.copy_(plain.layernorm_embedding.weight)
            fused.norm_bias.copy_(plain.layernorm_embedding.bias)
    tokens = tokens_with_padding(4, 9, 50, pad, side)
    out, ref = fused(tokens), plain(tokens)
    assert_close_relative(out, ref, TOL, "forward")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    names, params = ["token_weight"], [plain.embed_tokens.weight]
    if learned:
        names.append("position_weight")
        params.append(plain.embed_positions.weight)
    if layernorm:
        names += ["norm_weight", "norm_bias"]
        params += [plain.layernorm_embedding.weight, plain.layernorm_embedding.bias]
    compare_grads(fused, names, params)
    assert fused.token_weight.grad[pad].abs().sum() == 0  # nn.Embedding(padding_idx) semantics


class BertEmbeddings(nn.Module):
    """Hugging Face ``BertEmbeddings`` (absolute positions)."""

    def __init__(self, vocab, dim, max_positions, type_vocab, pad, eps=1e-12):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=pad)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, input_ids, token_type_ids=None, past_length=0):
        positions = torch.arange(past_length, past_length + input_ids.shape[1])[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions))
        return self.LayerNorm(x)


@pytest.mark.parametrize("with_types", [False, True])
def test_matches_hf_bert_embeddings(with_types):
    plain = randomize_(BertEmbeddings(40, 32, 20, 2, pad=0))
    config = EmbeddingConfig(40, 32, padding_idx=0, positions="learned", max_positions=20,
                             type_vocab_size=2, layer_norm=True, layer_norm_eps=1e-12)
    fused = TransformerEmbedding(config)
    with torch.no_grad():
        for name, source in (("token_weight", plain.word_embeddings), ("position_weight",
                             plain.position_embeddings), ("token_type_weight",
                             plain.token_type_embeddings)):
            getattr(fused, name).copy_(source.weight)
        fused.norm_weight.copy_(plain.LayerNorm.weight)
        fused.norm_bias.copy_(plain.LayerNorm.bias)
    ids = tokens_with_padding(3, 11, 40, 0, "right")
    types = (torch.arange(11)[None, :] >= 5).long().expand(3, 11) if with_types else None
    out, ref = fused(ids, token_type_ids=types), plain(ids, types)
    assert_close_relative(out, ref, TOL, "forward")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    compare_grads(fused, ["token_weight", "position_weight", "token_type_weight", "norm_weight",
                          "norm_bias"],
                  [plain.word_embeddings.weight, plain.position_embeddings.weight,
                   plain.token_type_embeddings.weight, plain.LayerNorm.weight,
                   plain.LayerNorm.bias])
    # decoding continues the absolute positions
    assert_close_relative(fused(ids[:, 4:6], start=4), plain(ids[:, 4:6], past_length=4), TOL)


@pytest.mark.parametrize("fairseq_positions", [False, True])
def test_incremental_embedding_equals_a_slice_of_the_full_one(fairseq_positions):
    config = EmbeddingConfig(30, 16, padding_idx=2, positions="sinusoidal",
                             fairseq_positions=fairseq_positions, scale=4.0)
    emb = TransformerEmbedding(config)
    ids = torch.randint(3, 30, (2, 7))
    full = emb(ids)
    steps = torch.cat([emb(ids[:, t:t + 1], start=t) for t in range(7)], dim=1)
    assert_close_relative(steps, full, TOL)


def test_sinusoidal_positions_have_no_length_cap():
    emb = TransformerEmbedding(EmbeddingConfig(10, 8, positions="sinusoidal"))
    ids = torch.randint(0, 10, (1, 3))
    out = emb(ids, start=100_000)
    expected = emb.token_weight.detach()[ids] + fairseq_sinusoid_table(100_003, 8, None)[100_000:]
    assert_close_relative(out, expected, 1e-4)


def test_dropout_reproducible_and_off_in_eval():
    emb = TransformerEmbedding(EmbeddingConfig(20, 16, dropout=0.5))
    ids = torch.randint(0, 20, (2, 5))
    torch.manual_seed(3)
    a = emb(ids)
    torch.manual_seed(3)
    assert torch.equal(a, emb(ids))
    assert not torch.equal(a, emb(ids))
    emb.eval()
    assert torch.equal(emb(ids), emb(ids))


@pytest.mark.parametrize("call, error, name", [
    (lambda e: e(torch.zeros(3, dtype=torch.long)), ValueError, "input_ids"),
    (lambda e: e(torch.zeros(1, 3, dtype=torch.long), start=-1), ValueError, "start"),
    (lambda e: e(torch.full((1, 3), 99)), ValueError, "input_ids"),
    (lambda e: e(torch.zeros(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3,
                 dtype=torch.long)), ValueError, "token_type"),
])
def test_bad_input_names_the_argument(call, error, name):
    emb = TransformerEmbedding(EmbeddingConfig(20, 16))
    with pytest.raises(error, match=name):
        call(emb)


# ----------------------------------------------------------------------------------------- loss
def fairseq_label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index):
    """fairseq 0.12's ``label_smoothed_nll_loss`` (reduce=True)."""
    target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(ignore_index)
    nll_loss.masked_fill_(pad_mask, 0.0)
    smooth_loss.masked_fill_(pad_mask, 0.0)
    nll_loss, smooth_loss = nll_loss.sum(), smooth_loss.sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss, nll_loss


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_label_smoothed_cross_entropy_matches_fairseq(epsilon):
    logits = torch.randn(3, 5, 17, requires_grad=True)
    target = torch.randint(0, 17, (3, 5))
    target[1, 3:] = 1  # padding
    loss, nll = LabelSmoothedCrossEntropy(epsilon, ignore_index=1)(logits, target)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_loss, ref_nll = fairseq_label_smoothed_nll_loss(
        F.log_softmax(ref_logits, -1).view(-1, 17), target.view(-1), epsilon, 1)
    assert_close_relative(loss, ref_loss, TOL)
    assert_close_relative(nll, ref_nll, TOL)
    loss.backward()
    ref_loss.backward()
    assert_close_relative(logits.grad, ref_logits.grad, TOL)


def test_linear_cross_entropy_matches_projection_then_loss():
    hidden = torch.randn(4, 6, 8, requires_grad=True)
    weight = torch.randn(23, 8, requires_grad=True)
    target = torch.randint(0, 23, (4, 6))
    loss, nll = LinearCrossEntropy(0.1, ignore_index=0)(hidden, weight, target)
    h2 = hidden.detach().clone().requires_grad_(True)
    w2 = weight.detach().clone().requires_grad_(True)
    ref_loss, ref_nll = fairseq_label_smoothed_nll_loss(
        F.log_softmax(h2 @ w2.t(), -1).view(-1, 23), target.view(-1), 0.1, 0)
    assert_close_relative(loss, ref_loss, TOL)
    assert_close_relative(nll, ref_nll, TOL)
    (loss + nll).backward()
    (ref_loss + ref_nll).backward()
    assert_close_relative(hidden.grad, h2.grad, TOL)
    assert_close_relative(weight.grad, w2.grad, TOL)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(epsilon=1.0), ValueError, "epsilon"),
    (dict(epsilon="0.1"), ValueError, "epsilon"),
    (dict(ignore_index=1.5), ValueError, "ignore_index"),
    (dict(reduction="max"), ValueError, "reduction"),
])
def test_loss_bad_arguments_name_the_field(kwargs, error, name):
    with pytest.raises(error, match=name):
        LabelSmoothedCrossEntropy(**kwargs)
