"""The LightSeq-compatible modules: get_config, constructors and forward conventions."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastpatch.training import (MODEL_ARCH, LSAdam, LSCrossEntropyLayer, LSTransformer,
                                LSTransformerDecoderLayer, LSTransformerEmbeddingLayer,
                                LSTransformerEncoderLayer, get_config)
from layers.plain_layers import (BertLayer, FairseqDecoderLayer, bert_extended_mask, padding_mask,
                                 randomize_)
from numerics import assert_close_relative

TOL = 1e-5


def layer_kwargs(**changes):
    kwargs = dict(max_batch_tokens=4, max_seq_len=2, hidden_size=32, intermediate_size=64,
                  nhead=4, attn_prob_dropout_ratio=0.0, activation_dropout_ratio=0.0,
                  hidden_dropout_ratio=0.0, pre_layer_norm=False, activation_fn="gelu",
                  fp16=False, local_rank=-1)
    kwargs.update(changes)
    return kwargs


# ---------------------------------------------------------------------------------- get_config
def test_model_presets_are_lightseqs():
    base = get_config(model="transformer-base")
    assert (base.hidden_size, base.intermediate_size, base.nhead) == (512, 2048, 8)
    assert base.pre_layer_norm and base.activation_fn == "relu" and base.hidden_dropout_ratio == 0.1
    big = get_config(model="transformer-big")
    assert (big.hidden_size, big.intermediate_size, big.nhead) == (1024, 4096, 16)
    assert big.attn_prob_dropout_ratio == 0.1 and big.activation_dropout_ratio == 0.1
    bert = get_config(model="bert-base", max_batch_tokens=4096, max_seq_len=512, fp16=True,
                      local_rank=0)
    assert (bert.hidden_size, bert.nhead, bert.pre_layer_norm, bert.activation_fn) == \
        (768, 12, False, "gelu")
    assert get_config(model="bert-big").hidden_size == 1024
    assert get_config(model="bert-base", nhead=16).nhead == 16  # explicit arguments win
    assert set(MODEL_ARCH) == {"transformer-base", "transformer-big", "bert-base", "bert-big"}


@pytest.mark.parametrize("changes, field", [
    (dict(model="gpt-9"), "model"),
    (dict(nhead=5), "nhead"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(intermediate_size=-1), "intermediate_size"),
    (dict(activation_fn="tanh"), "activation_fn"),
    (dict(attn_prob_dropout_ratio=1.0), "attn_prob_dropout_ratio"),
    (dict(activation_dropout_ratio=-0.5), "activation_dropout_ratio"),
    (dict(hidden_dropout_ratio=2), "hidden_dropout_ratio"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
    (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(max_seq_len="512"), "max_seq_len"),
    (dict(num_encoder_layer=-1), "num_encoder_layer"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(vocab_size=10, padding_idx=10), "padding_idx"),
    (dict(vocab_size=10, padding_idx=0, embedding_dim=16), "embedding_dim"),
    (dict(hidden_szie=32), "hidden_szie"),
])
def test_bad_config_names_the_lightseq_field(changes, field):
    with pytest.raises(ValueError, match=field):
        get_config(**layer_kwargs(**changes))


def test_missing_fields_are_named_at_construction():
    with pytest.raises(ValueError, match="intermediate_size"):
        LSTransformerEncoderLayer(get_config(hidden_size=32, nhead=4))
    with pytest.raises(ValueError, match="vocab_size"):
        LSTransformerEmbeddingLayer(get_config(embedding_dim=16, padding_idx=0))
    with pytest.raises(ValueError, match="padding_idx"):
        LSCrossEntropyLayer(get_config(epsilon=0.1))
    with pytest.raises(ValueError, match="num_encoder_layer"):
        LSTransformer(get_config(**layer_kwargs(vocab_size=10, padding_idx=0)))
    with pytest.raises(TypeError, match="get_config"):
        LSTransformerEncoderLayer(dict(hidden_size=32))


# ------------------------------------------------------------------------------ encoder layer
def test_encoder_layer_from_hf_bert_weights_lightseq_style():
    """LightSeq's HF example: weights in its list order, HF's additive mask divided by -10000."""
    bert = randomize_(BertLayer(32, 4, 64, eps=1e-5))
    s, o = bert.attention.self, bert.attention.output
    modules = [s.query, s.key, s.value, o.dense, o.LayerNorm, bert.intermediate.dense,
               bert.output.dense, bert.output.LayerNorm]
    layer = LSTransformerEncoderLayer(get_config(**layer_kwargs()),
                                      initial_weights=[m.weight for m in modules],
                                      initial_biases=[m.bias for m in modules])
    x = torch.randn(3, 5, 32)  # batch 3 x 5 tokens > max_batch_tokens=4, 5 > max_seq_len=2
    mask = padding_mask([5, 3, 1], 5, "right")
    hf_mask = bert_extended_mask(mask)
    expected = bert(x, hf_mask)
    for ls_mask in (mask, mask.float(), mask.long(), (hf_mask / -10000.0).squeeze(1).squeeze(1)):
        assert_close_relative(layer(x, ls_mask), expected, TOL)
    assert all(isinstance(p, torch.nn.Parameter) for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} >= {"qkv_weight", "fc1_weight"}


def test_initial_weights_must_be_complete():
    with pytest.raises(ValueError, match="initial_weights"):
        LSTransformerEncoderLayer(get_config(**layer_kwargs()), initial_weights=[torch.ones(1)])
    with pytest.raises(ValueError, match="8 tensors"):
        LSTransformerEncoderLayer(get_config(**layer_kwargs()), initial_weights=[torch.ones(1)],
                                  initial_biases=[torch.ones(1)])


# ------------------------------------------------------------------------------ decoder layer
def fairseq_decoder_lists(plain):
    a, c = plain.self_attn, plain.encoder_attn
    modules = [a.q_proj, a.k_proj, a.v_proj, a.out_proj, plain.self_attn_layer_norm, c.q_proj,
               c.out_proj, plain.encoder_attn_layer_norm, plain.fc1, plain.fc2,
               plain.final_layer_norm, c.k_proj, c.v_proj]
    return [m.weight for m in modules], [m.bias for m in modules]


@pytest.mark.parametrize("pre_ln", [False, True])
def test_decoder_layer_lightseq_conventions(pre_ln):
    plain = randomize_(FairseqDecoderLayer(32, 4, 64, normalize_before=pre_ln, activation="relu"))
    weights, biases = fairseq_decoder_lists(plain)
    layer = LSTransformerDecoderLayer(
        get_config(**layer_kwargs(pre_layer_norm=pre_ln, activation_fn="relu", nlayer=6)),
        initial_weights=weights, initial_biases=biases)
    x, enc = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    mask = padding_mask([4, 2], 4, "left").float()
    expected = plain(x, enc, mask.bool())
    encoder_out = enc.transpose(0, 1)  # LightSeq passes [src_len, batch, hidden]
    assert_close_relative(layer(x, encoder_out, mask, None), expected, TOL, "training forward")
    layer.eval()
    cache = {}
    with torch.no_grad():
        steps = [layer(x[:, t:t + 1], encoder_out, mask, cache) for t in range(6)]
    assert_close_relative(torch.cat(steps, 1), expected, TOL, "cached decoding")
    assert cache["dec_self_k"].shape == (2, 4, 6, 8) and cache["encdec_k"].shape == (2, 4, 4, 8)
    with pytest.raises(TypeError, match="cache"):
        layer(x, encoder_out, mask, cache=[])


# ---------------------------------------------------------------------------------- embedding
def lightseq_embedding(table, tokens, pad, step=0):
    """LightSeq's embedding written out: sqrt(d) * table[token] + sinusoid of (non-pad tokens
    before it + step), with LightSeq's sinusoid table (sin half, then cos half)."""
    dim = table.shape[1]
    real = tokens.ne(pad).long()
    positions = (torch.cumsum(real, 1) - real + step).float()
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = positions[..., None] * freq
    return math.sqrt(dim) * table[tokens] + torch.cat([angles.sin(), angles.cos()], -1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_embedding_layer_lightseq_positions(side):
    config = get_config(vocab_size=30, embedding_dim=16, max_batch_tokens=8, max_seq_len=4,
                        padding_idx=0, dropout=0.0, fp16=False, local_rank=-1)
    table = torch.randn(30, 16)
    emb = LSTransformerEmbeddingLayer(config, initial_embeddings=table)
    assert emb.embeddings is emb.token_weight and emb.embeddings.shape == (30, 16)
    tokens = torch.randint(1, 30, (3, 7))
    tokens[padding_mask([7, 4, 2], 7, side)] = 0
    assert_close_relative(emb(tokens), lightseq_embedding(table, tokens, 0), TOL)
    step_tokens = torch.randint(1, 30, (3, 1))
    assert_close_relative(emb(step_tokens, 9), lightseq_embedding(table, step_tokens, 0, 9), TOL)
    with pytest.raises(ValueError, match="step"):
        emb(step_tokens, -1)
    with pytest.raises(ValueError, match="initial_embeddings"):
        LSTransformerEmbeddingLayer(config, initial_embeddings=torch.zeros(3, 16))


# ------------------------------------------------------------------------------- loss, Adam
def test_cross_entropy_layer_returns_summed_fairseq_losses():
    config = get_config(max_batch_tokens=8, padding_idx=1, epsilon=0.1, fp16=False, local_rank=0)
    logits = torch.randn(3, 4, 11, requires_grad=True)
    target = torch.randint(2, 11, (3, 4))
    target[2, 2:] = 1
    loss, nll = LSCrossEntropyLayer(config)(logits, target)
    lprobs = F.log_softmax(logits, -1)
    keep = target.ne(1)
    ref_nll = -lprobs.gather(-1, target[..., None]).squeeze(-1)[keep].sum()
    smooth = -lprobs.sum(-1)[keep].sum()
    ref_loss = (1 - 0.1 - 0.01) * ref_nll + 0.01 * smooth
    assert_close_relative(loss, ref_loss, TOL)
    assert_close_relative(nll, ref_nll, TOL)


def test_ls_adam_matches_adamw_and_refuses_what_it_does_not_implement():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a = LSAdam(a.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6,
                              weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close_relative(pa, pb, 1e-6)
    for kwargs, name in ((dict(bias_correction=False), "bias_correction"),
                         (dict(eps_inside_sqrt=True), "eps_inside_sqrt"),
                         (dict(max_grad_norm=1.0), "max_grad_norm"),
                         (dict(amsgrad=True), "amsgrad")):
        with pytest.raises(ValueError, match=name):
            LSAdam(a.parameters(), **kwargs)


def test_transformer_has_no_length_caps_and_plain_parameters():
    config = get_config(model="transformer-base", max_batch_tokens=16, max_seq_len=4,
                        hidden_size=32, intermediate_size=64, nhead=4, vocab_size=40,
                        padding_idx=0, num_encoder_layer=1, num_decoder_layer=1, fp16=True,
                        local_rank=0, hidden_dropout_ratio=0.0)
    model = LSTransformer(config)
    src, trg = torch.randint(1, 40, (4, 9)), torch.randint(1, 40, (4, 11))
    assert model(src, trg).shape == (4, 11, 40)  # 44 tokens > 16, lengths > 4
    names = dict(model.named_parameters())
    assert {"decoder.layers.0.cross_kv_weight", "encoder.embed_tokens.token_weight"} <= set(names)
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.embeddings
    assert all(p.dtype == torch.float16 for p in model.half().parameters())
