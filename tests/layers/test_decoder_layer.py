"""TransformerDecoderLayer against fairseq's decoder layer (plain PyTorch, same weights), and
incremental decoding through KVCache / StaticKVCache against full causal decoding."""
import copy

import pytest
import torch

from fastpatch.layers import (KVCache, LayerConfig, StaticKVCache, TransformerDecoderLayer,
                              fairseq_layer_map)
from numerics import assert_close_relative, assert_within_factor_of_torch
from plain_layers import FairseqDecoderLayer, padding_mask, randomize_

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]
TOL = 1e-5
H, HEADS, FFN = 32, 4, 64


def pair(pre_ln=False, activation="relu", encoder_dim=None, cross=True, hidden=H, ffn=FFN):
    plain = randomize_(FairseqDecoderLayer(hidden, HEADS, ffn, encoder_dim=encoder_dim,
                                           normalize_before=pre_ln, activation=activation))
    config = LayerConfig(hidden, HEADS, ffn, pre_layer_norm=pre_ln, activation=activation,
                         causal=True, cross_attention=cross, encoder_hidden_size=encoder_dim)
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(wmap.load_into(TransformerDecoderLayer(config), plain))
    return fused, plain


def compare(fused, plain, x, enc, enc_mask=None, tgt_mask=None, valid=None, tol=TOL):
    xf, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ef, ep = enc.clone().requires_grad_(True), enc.clone().requires_grad_(True)
    out_f = fused(xf, ef, enc_mask, self_attn_padding_mask=tgt_mask)
    out_p = plain(xp, ep, enc_mask, self_attn_padding_mask=tgt_mask)
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
    assert_close_relative(out_f[valid], out_p[valid], tol, "forward")
    g = torch.randn_like(out_p) * valid[..., None]
    out_f.backward(g)
    out_p.backward(g)
    assert_close_relative(xf.grad, xp.grad, tol, "grad hidden_states")
    assert_close_relative(ef.grad, ep.grad, tol, "grad encoder_out")
    expected = fused.weight_map.to_fused({n: p.grad for n, p in plain.named_parameters()})
    for name, p in fused.named_parameters():
        assert_close_relative(p.grad, expected[name], tol, f"grad {name}")


@pytest.mark.parametrize("enc_padding", [None, "left", "right"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pre_ln", [False, True])
def test_matches_fairseq_decoder_layer(pre_ln, activation, enc_padding):
    fused, plain = pair(pre_ln, activation)
    x, enc = torch.randn(3, 6, H), torch.randn(3, 5, H)
    mask = None if enc_padding is None else padding_mask([5, 3, 1], 5, enc_padding)
    compare(fused, plain, x, enc, mask)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_padded_targets(pre_ln, side):
    fused, plain = pair(pre_ln, "gelu")
    x, enc = torch.randn(3, 7, H), torch.randn(3, 4, H)
    tgt_mask = padding_mask([7, 5, 2], 7, side)
    enc_mask = padding_mask([4, 4, 2], 4, side)
    # a left-pad query under the causal mask sees no real key: only real positions are compared
    compare(fused, plain, x, enc, enc_mask, tgt_mask, valid=~tgt_mask)


def test_encoder_width_differs_and_odd_sizes():
    fused, plain = pair(True, "silu", encoder_dim=20, hidden=36, ffn=50)
    compare(fused, plain, torch.randn(2, 5, 36), torch.randn(2, 3, 20))


@pytest.mark.parametrize("tgt_len, src_len, batch", [(1, 1, 3), (1024, 9, 1), (3, 1024, 1)])
def test_lengths_from_1_to_1024(tgt_len, src_len, batch):
    fused, plain = pair(False, "relu")
    compare(fused, plain, torch.randn(batch, tgt_len, H), torch.randn(batch, src_len, H))


def test_split_heads_kernel_path_matches_view_path():
    fused, plain = pair(True, "gelu")
    fused.split_heads_kernel = True
    compare(fused, plain, torch.randn(2, 5, H), torch.randn(2, 4, H),
            padding_mask([4, 2], 4, "right"))


# ------------------------------------------------------------------------ incremental decoding
def decode_in_chunks(layer, x, enc, enc_mask, cache, chunks, tgt_mask=None):
    """Feeds ``x`` through ``layer`` in consecutive chunks of the given sizes."""
    outs, start = [], 0
    for size in chunks:
        step_mask = None
        if tgt_mask is not None:
            step_mask = tgt_mask if isinstance(cache, StaticKVCache) else tgt_mask[:, :start + size]
        outs.append(layer(x[:, start:start + size], enc, enc_mask, cache=cache,
                          self_attn_padding_mask=step_mask))
        start += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("cache_kind", ["growing", "static"])
@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2]])
def test_incremental_decoding_equals_full_causal_decoding(pre_ln, cache_kind, chunks):
    fused, _ = pair(pre_ln, "gelu")
    fused.eval()
    x, enc = torch.randn(3, 6, H), torch.randn(3, 5, H)
    enc_mask = padding_mask([5, 2, 4], 5, "right")
    with torch.no_grad():
        full = fused(x, enc, enc_mask)
        cache = KVCache() if cache_kind == "growing" else StaticKVCache(3, 10, HEADS, H // HEADS)
        stepped = decode_in_chunks(fused, x, enc, enc_mask, cache, chunks)
    assert_close_relative(stepped, full, TOL, "incremental vs full")
    if cache_kind == "static":
        assert cache.positions.item() == 6


@pytest.mark.parametrize("cache_kind", ["growing", "static"])
def test_incremental_decoding_with_left_padded_prompt(cache_kind):
    fused, _ = pair(True, "gelu_tanh", cross=False)  # decoder-only, GPT-2 style
    fused.eval()
    x = torch.randn(2, 7, H)
    prompt_mask = padding_mask([4, 2], 4, "left")  # prompts of 4 and 2 tokens, left-padded
    tgt_mask = torch.cat([prompt_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        full = fused(x, self_attn_padding_mask=tgt_mask)
        if cache_kind == "growing":
            cache, mask = KVCache(), tgt_mask
        else:
            cache = StaticKVCache(2, 12, HEADS, H // HEADS)
            mask = torch.cat([tgt_mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
        stepped = decode_in_chunks(fused, x, None, None, cache, [4, 1, 1, 1], mask)
    valid = ~tgt_mask
    assert_close_relative(stepped[valid], full[valid], TOL, "incremental vs full")


@pytest.mark.parametrize("cache_kind", ["growing", "static"])
def test_cache_reorder_permutes_and_shrinks_the_batch(cache_kind):
    fused, _ = pair(False, "relu")
    fused.eval()
    x, enc = torch.randn(4, 6, H), torch.randn(4, 5, H)
    enc_mask = padding_mask([5, 3, 4, 1], 5, "left")
    index = torch.tensor([2, 0, 2])  # beam search: rows 1 and 3 finished, row 2 split in two
    with torch.no_grad():
        cache = KVCache() if cache_kind == "growing" else StaticKVCache(4, 8, HEADS, H // HEADS)
        first = decode_in_chunks(fused, x[:, :3], enc, enc_mask, cache, [2, 1])
        cache.reorder_(index)
        rest = decode_in_chunks(fused, x[index, 3:], enc[index], enc_mask[index], cache, [1, 2])
        full = fused(x[index], enc[index], enc_mask[index])
    assert_close_relative(first[index], full[:, :3], TOL, "before reorder")
    assert_close_relative(rest, full[:, 3:], TOL, "after reorder")
    assert cache.key.shape[0] == 3 and cache.cross_key.shape[0] == 3


def test_static_cache_reorder_same_size_is_in_place():
    cache = StaticKVCache(3, 4, 2, 8)
    cache.update(torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8))
    cache.set_cross(torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
    pointers = [t.data_ptr() for t in (cache.key, cache.value, cache.cross_key, cache.cross_value)]
    before = cache.key.clone()
    cache.reorder_(torch.tensor([2, 2, 0]))
    assert [t.data_ptr() for t in (cache.key, cache.value, cache.cross_key,
                                   cache.cross_value)] == pointers
    assert torch.equal(cache.key, before[[2, 2, 0]])


def test_cross_attention_keys_are_computed_once():
    fused, _ = pair(False, "relu")
    fused.eval()
    x, enc = torch.randn(2, 3, H), torch.randn(2, 4, H)
    with torch.no_grad():
        cache = KVCache()
        first = fused(x[:, :1], enc, None, cache=cache)
        cross_key = cache.cross_key
        second = fused(x[:, 1:2], None, None, cache=cache)  # encoder_out not needed any more
        full = fused(x[:, :2], enc)
    assert cache.cross_key is cross_key
    assert_close_relative(torch.cat([first, second], 1), full, TOL)


def test_growing_cache_keeps_gradients_in_training():
    fused, plain = pair(True, "gelu")
    x, enc = torch.randn(2, 4, H), torch.randn(2, 3, H)
    cache = KVCache()
    stepped = decode_in_chunks(fused, x, enc, None, cache, [2, 2])
    stepped.sum().backward()
    grads = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad()
    fused(x, enc).sum().backward()
    for n, p in fused.named_parameters():
        assert_close_relative(grads[n], p.grad, TOL, f"grad {n}")


@pytest.mark.parametrize("call, error, name", [
    (lambda l, x, e: l(x), ValueError, "encoder_out"),
    (lambda l, x, e: l(x, e[:, :, :5]), ValueError, "encoder_out"),
    (lambda l, x, e: l(x, e, torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     "encoder_padding_mask"),
    (lambda l, x, e: l(x, e, torch.zeros(2, 3)), TypeError, "encoder_padding_mask"),
    (lambda l, x, e: l(x, e, self_attn_padding_mask=torch.zeros(2, 3, dtype=torch.bool)),
     ValueError, "self_attn_padding_mask"),
    (lambda l, x, e: l(x, e, cache={}), TypeError, "cache"),
    (lambda l, x, e: l(x, e, causal=1), TypeError, "causal"),
    (lambda l, x, e: l(x[..., :8], e), ValueError, "hidden_states"),
])
def test_bad_input_names_the_argument(call, error, name):
    layer = TransformerDecoderLayer(LayerConfig(H, HEADS, FFN, causal=True,
                                                cross_attention=True))
    with pytest.raises(error, match=name):
        call(layer, torch.randn(2, 4, H), torch.randn(2, 3, H))


def test_encoder_out_without_cross_attention_is_refused():
    layer = TransformerDecoderLayer(LayerConfig(H, HEADS, FFN, causal=True))
    with pytest.raises(ValueError, match="encoder_out"):
        layer(torch.randn(1, 2, H), torch.randn(1, 2, H))


def test_reorder_index_is_checked():
    cache = KVCache()
    cache.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    with pytest.raises(TypeError, match="index"):
        cache.reorder_(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index"):
        cache.reorder_(torch.tensor([[0]]))
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(1, 0, 1, 4)


def test_torch_compile_fullgraph_decoder_stack():
    layers = [pair(pre, "gelu")[0] for pre in (False, True)]
    x, enc = torch.randn(2, 5, H, requires_grad=True), torch.randn(2, 3, H)
    mask = padding_mask([3, 2], 3, "right")

    def stack(x, enc):
        for layer in layers:
            x = layer(x, enc, mask)
        return x

    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    out = compiled(x, enc)
    assert_close_relative(out, stack(x, enc), 1e-6, "compiled forward")
    (gx,) = torch.autograd.grad(out.sum(), x)
    (ref,) = torch.autograd.grad(stack(x, enc).sum(), x)
    assert_close_relative(gx, ref, 1e-6, "compiled input gradient")


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("batch, tgt_len, src_len", [(1, 1, 1), (64, 128, 128), (1, 8192, 512),
                                                      (2, 300, 8192)])
def test_cuda_half_precision_within_rule(dtype, pre_ln, batch, tgt_len, src_len):
    plain32 = randomize_(FairseqDecoderLayer(256, 4, 1024, normalize_before=pre_ln,
                                             activation="relu"), scale=0.05).cuda()
    config = LayerConfig(256, 4, 1024, pre_layer_norm=pre_ln, activation="relu", causal=True,
                         cross_attention=True)
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(wmap.load_into(TransformerDecoderLayer(config), plain32)).cuda().to(dtype)
    plain = copy.deepcopy(plain32).to(dtype)
    x32 = torch.randn(batch, tgt_len, 256, device="cuda")
    e32 = torch.randn(batch, src_len, 256, device="cuda")
    enc_mask = padding_mask([src_len] + [max(1, src_len // 3)] * (batch - 1), src_len,
                            "right").cuda()
    results = {}
    for name, layer, dt in (("fused", fused, dtype), ("plain", plain, dtype),
                            ("ref", plain32, torch.float32)):
        x = x32.to(dt).requires_grad_(True)
        e = e32.to(dt).requires_grad_(True)
        out = layer(x, e, enc_mask)
        out.backward(torch.full_like(out, 0.01))
        results[name] = (out, x.grad, e.grad, {n: p.grad for n, p in layer.named_parameters()})
    f, p, r = results["fused"], results["plain"], results["ref"]
    for i, what in ((0, "forward"), (1, "grad x"), (2, "grad encoder_out")):
        assert_within_factor_of_torch(f[i], p[i], r[i], what)
    plain_grads, ref_grads = wmap.to_fused(p[3]), wmap.to_fused(r[3])
    for name, grad in f[3].items():
        assert_within_factor_of_torch(grad, plain_grads[name], ref_grads[name], f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_of_a_decoder_step_with_static_cache(dtype):
    torch.manual_seed(0)
    config = LayerConfig(256, 4, 1024, pre_layer_norm=True, activation="gelu", causal=True,
                         cross_attention=True)
    layer = randomize_(TransformerDecoderLayer(config), scale=0.05).cuda().to(dtype).eval()
    batch, steps, src = 4, 12, 9
    x = torch.randn(batch, steps, 256, device="cuda", dtype=dtype)
    enc = torch.randn(batch, src, 256, device="cuda", dtype=dtype)
    enc_mask = padding_mask([9, 5, 7, 2], src, "right").cuda()
    with torch.no_grad():
        full = layer(x, enc, enc_mask)
        cache = StaticKVCache(batch, 16, 4, 64, dtype=dtype, device="cuda")
        layer(x[:, :1], enc, enc_mask, cache=cache)  # prefill one token, fills the cross cache
        static_in = x[:, 1:2].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture, then rewind the position
            layer(static_in, None, enc_mask, cache=cache)
            cache.positions.sub_(1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_in, None, enc_mask, cache=cache)  # recorded, not run
        outs = []
        for t in range(1, steps):
            static_in.copy_(x[:, t:t + 1])
            graph.replay()
            outs.append(static_out.clone())
    assert cache.positions.item() == steps
    stepped = torch.cat(outs, dim=1)
    torch.testing.assert_close(stepped.float(), full[:, 1:].float(), rtol=2e-2, atol=2e-2)
