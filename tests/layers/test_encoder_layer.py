"""TransformerEncoderLayer against fairseq's, HF BERT's and HF GPT-2's layers (plain PyTorch,
tests/layers/plain_layers.py) with the same weights, copied through the weight maps."""
import copy

import pytest
import torch

from fastpatch.layers import (LayerConfig, TransformerEncoderLayer, fairseq_layer_map,
                              hf_bert_layer_map, hf_gpt2_block_map)
from numerics import assert_close_relative, assert_within_factor_of_torch
from plain_layers import (BertLayer, FairseqEncoderLayer, GPT2Block, bert_extended_mask,
                          padding_mask, randomize_)

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]
TOL = 1e-5


def fused_from(plain, config, weight_map):
    fused = TransformerEncoderLayer(config)
    return weight_map.load_into(fused, plain)


def compare(fused, plain, fused_args, plain_args, x, valid=None, tol=TOL):
    """Forward, and the gradients of every parameter (matched through the weight map's source
    names) and of the input, from the same upstream gradient on the ``valid`` positions."""
    xf = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    out_f = fused(xf, *fused_args)
    out_p = plain(xp, *plain_args)
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
    assert_close_relative(out_f[valid], out_p[valid], tol, "forward")
    g = torch.randn_like(out_p) * valid[..., None]
    out_f.backward(g)
    out_p.backward(g)
    assert_close_relative(xf.grad, xp.grad, tol, "input gradient")
    source_grads = {n: p.grad for n, p in plain.named_parameters()}
    fused_grads = {n: p.grad for n, p in fused.named_parameters()}
    for name, grad in fused.weight_map.to_fused(source_grads).items():
        assert_close_relative(fused_grads[name], grad, tol, f"grad {name}")


def fairseq_pair(pre_ln, activation, hidden=32, heads=4, ffn=64, eps=1e-5, causal=False):
    plain = randomize_(FairseqEncoderLayer(hidden, heads, ffn, normalize_before=pre_ln,
                                           activation=activation, eps=eps, causal=causal))
    config = LayerConfig(hidden, heads, ffn, pre_layer_norm=pre_ln, activation=activation,
                         layer_norm_eps=eps, causal=causal)
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(fused_from(plain, config, wmap))
    return fused, plain


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pre_ln", [False, True])
def test_matches_fairseq_encoder_layer(pre_ln, activation, padding):
    fused, plain = fairseq_pair(pre_ln, activation)
    x = torch.randn(3, 7, 32)
    mask = None if padding is None else padding_mask([7, 4, 1], 7, padding)
    compare(fused, plain, (mask,), (mask,), x)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_matches_hf_bert_layer(activation, padding):
    plain = randomize_(BertLayer(32, 4, 64, eps=1e-12, activation=activation))
    config = LayerConfig(32, 4, 64, activation=activation, layer_norm_eps=1e-12)
    wmap = hf_bert_layer_map(config)
    fused = wmap.attach(fused_from(plain, config, wmap))
    x = torch.randn(3, 6, 32)
    mask = None if padding is None else padding_mask([6, 3, 2], 6, padding)
    hf_mask = None if mask is None else bert_extended_mask(mask)
    compare(fused, plain, (mask,), (hf_mask,), x)


@pytest.mark.parametrize("padding", [None, "left"])
def test_matches_hf_gpt2_block_with_conv1d_transposes(padding):
    scale = 0.125 / 3  # scale_attn_by_inverse_layer_idx at layer index 2
    plain = randomize_(GPT2Block(32, 4, 128, scale=scale))
    config = LayerConfig(32, 4, 128, pre_layer_norm=True, activation="gelu_new", causal=True,
                         attention_scale=scale)
    assert config.activation == "gelu_tanh"
    wmap = hf_gpt2_block_map(config)
    fused = wmap.attach(fused_from(plain, config, wmap))
    x = torch.randn(2, 9, 32)
    mask = None if padding is None else padding_mask([9, 5], 9, padding)
    # with left padding under a causal mask the pad rows see no real key: their values are
    # meaningless in both layers (HF's too), so only real positions are compared
    valid = torch.ones(2, 9, dtype=torch.bool) if mask is None else ~mask
    compare(fused, plain, (mask,), (mask,), x, valid=valid)


@pytest.mark.parametrize("length, batch", [(1, 4), (2, 3), (1024, 1)])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_lengths_from_1_to_1024(length, batch, pre_ln):
    fused, plain = fairseq_pair(pre_ln, "gelu")
    x = torch.randn(batch, length, 32)
    compare(fused, plain, (None,), (None,), x)


def test_odd_hidden_size_and_no_biases():
    plain = randomize_(FairseqEncoderLayer(36, 4, 52, activation="silu", bias=False))
    config = LayerConfig(36, 4, 52, activation="silu", qkv_bias=False, attn_out_bias=False,
                         fc1_bias=False, fc2_bias=False)
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(fused_from(plain, config, wmap))
    assert fused.qkv_bias is None and fused.fc2_bias is None
    x = torch.randn(2, 5, 36)
    mask = padding_mask([5, 2], 5, "right")
    compare(fused, plain, (mask,), (mask,), x)


def test_causal_encoder_and_additive_attn_mask():
    fused, plain = fairseq_pair(True, "relu", causal=True)
    x = torch.randn(2, 6, 32)
    bias = torch.randn(6, 6)  # e.g. a relative-position bias, additive
    compare(fused, plain, (None, bias), (None, bias), x)


def test_bool_attn_mask_matches_additive():
    fused, _ = fairseq_pair(False, "gelu")
    x = torch.randn(2, 5, 32)
    allowed = torch.rand(5, 5) > 0.3
    allowed.fill_diagonal_(True)
    additive = torch.zeros(5, 5).masked_fill(~allowed, float("-inf"))
    assert_close_relative(fused(x, None, allowed), fused(x, None, additive), 1e-6)


def test_eval_mode_and_no_grad_run_without_dropout():
    config = LayerConfig(32, 4, 64, attention_dropout=0.5, hidden_dropout=0.5,
                         activation_dropout=0.5)
    layer = TransformerEncoderLayer(config).eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("bad, error, name", [
    (dict(hidden_states=torch.randn(2, 3, 16)), ValueError, "hidden_states"),
    (dict(hidden_states=torch.randn(6, 32)), ValueError, "hidden_states"),
    (dict(hidden_states=[1.0]), TypeError, "hidden_states"),
    (dict(key_padding_mask=torch.zeros(2, 3)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
])
def test_bad_input_names_the_argument(bad, error, name):
    layer = TransformerEncoderLayer(LayerConfig(32, 4, 64))
    kwargs = dict(hidden_states=torch.randn(2, 3, 32), key_padding_mask=None)
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        layer(**kwargs)


def test_encoder_layer_refuses_cross_attention():
    with pytest.raises(ValueError, match="cross_attention"):
        TransformerEncoderLayer(LayerConfig(32, 4, 64, cross_attention=True))


def test_torch_compile_fullgraph_of_a_stack():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[randomize_(TransformerEncoderLayer(
        LayerConfig(32, 4, 64, pre_layer_norm=pre, activation="gelu"))) for pre in (False, True)])
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layers, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close_relative(out, layers(x), 1e-6, "compiled forward")
    out.sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    layers(x).sum().backward()
    assert_close_relative(grad_compiled, x.grad, 1e-6, "compiled input gradient")


# ----------------------------------------------------------------------------------------- GPU
def _gpu_triple(pre_ln, dtype, hidden=256, heads=4, ffn=1024):
    plain32 = randomize_(FairseqEncoderLayer(hidden, heads, ffn, normalize_before=pre_ln,
                                             activation="gelu"), scale=0.05).cuda()
    config = LayerConfig(hidden, heads, ffn, pre_layer_norm=pre_ln, activation="gelu")
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(wmap.load_into(TransformerEncoderLayer(config), plain32)).cuda().to(dtype)
    plain = copy.deepcopy(plain32).to(dtype)
    return fused, plain, plain32


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("batch, length", [(1, 1), (64, 128), (1, 8192), (3, 777)])
def test_cuda_half_precision_within_rule(dtype, pre_ln, batch, length):
    fused, plain, ref = _gpu_triple(pre_ln, dtype)
    x32 = torch.randn(batch, length, 256, device="cuda")
    mask = padding_mask([length] + [max(1, length // 2)] * (batch - 1), length, "left").cuda()
    outs = {}
    for name, layer, x in (("fused", fused, x32.to(dtype)), ("plain", plain, x32.to(dtype)),
                           ("ref", ref, x32.clone())):
        x = x.requires_grad_(True)
        out = layer(x, mask)
        out.backward(torch.ones_like(out) * 0.01)
        outs[name] = (out, x.grad, dict(layer.named_parameters()))
    assert_within_factor_of_torch(outs["fused"][0], outs["plain"][0], outs["ref"][0], "forward")
    assert_within_factor_of_torch(outs["fused"][1], outs["plain"][1], outs["ref"][1], "grad x")
    wmap = fused.weight_map
    plain_grads = wmap.to_fused({n: p.grad for n, p in outs["plain"][2].items()})
    ref_grads = wmap.to_fused({n: p.grad for n, p in outs["ref"][2].items()})
    for name, p in outs["fused"][2].items():
        assert_within_factor_of_torch(p.grad, plain_grads[name], ref_grads[name], f"grad {name}")


@pytest.mark.cuda
def test_cuda_torch_compile_of_a_stack():
    layers = torch.nn.Sequential(*[TransformerEncoderLayer(LayerConfig(
        768, 12, 3072, activation="gelu")) for _ in range(2)]).cuda().half()
    x = torch.randn(8, 128, 768, device="cuda", dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(layers, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, layers(x), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pre_ln", [False, True])
def test_autocast_bf16_within_rule_of_plain_layer_under_autocast(pre_ln):
    fused, plain = fairseq_pair(pre_ln, "gelu", hidden=64, ffn=128)
    x = torch.randn(2, 16, 64)
    mask = padding_mask([16, 9], 16, "right")
    ref = plain(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fused = fused(x, mask)
        out_plain = plain(x, mask)
    assert out_fused.dtype == out_plain.dtype == torch.float32  # fp32 residual stream, as eager
    assert_within_factor_of_torch(out_fused, out_plain, ref, "autocast forward")
