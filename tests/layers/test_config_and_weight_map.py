"""LayerConfig / EmbeddingConfig validation and the weight maps in both directions."""
import io
import pickle

import pytest
import torch

from fastpatch.layers import (CONCAT, TRANSPOSE, EmbeddingConfig, Entry, LayerConfig,
                              TransformerDecoderLayer, TransformerEncoderLayer, WeightMap,
                              fairseq_layer_map, hf_bert_layer_map, hf_gpt2_block_map)
from plain_layers import BertLayer, FairseqDecoderLayer, FairseqEncoderLayer, GPT2Block, randomize_


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=32.0), "hidden_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(ffn_size=-1), "ffn_size"),
    (dict(activation="tanh"), "activation"),
    (dict(activation=None), "activation"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(activation_dropout=1.0), "activation_dropout"),
    (dict(hidden_dropout="0.1"), "hidden_dropout"),
    (dict(pre_layer_norm=1), "pre_layer_norm"),
    (dict(causal="yes"), "causal"),
    (dict(qkv_bias=None), "qkv_bias"),
    (dict(encoder_hidden_size=16), "encoder_hidden_size"),
    (dict(cross_attention=True, encoder_hidden_size=0), "encoder_hidden_size"),
    (dict(attention_scale=-1.0), "attention_scale"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_layer_config_rejects_with_the_field_name(changes, field):
    kwargs = dict(hidden_size=32, num_heads=4, ffn_size=64)
    kwargs.update(changes)
    with pytest.raises(ValueError, match=field):
        LayerConfig(**kwargs)


def test_layer_config_normalises_activation_aliases_and_has_no_length_caps():
    config = LayerConfig(768, 12, 3072, activation="gelu_new")
    assert config.activation == "gelu_tanh" and config.head_dim == 64
    assert LayerConfig(768, 12, 3072, activation="swish").activation == "silu"
    assert not any("max" in f for f in LayerConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="num_heads"):
        config.replace(num_heads=5)


@pytest.mark.parametrize("changes, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(padding_idx=100), "padding_idx"),
    (dict(positions="rotary"), "positions"),
    (dict(positions="learned", max_positions=0), "max_positions"),
    (dict(fairseq_positions=True), "fairseq_positions"),
    (dict(padding_idx=1, fairseq_positions=True, positions="none"), "fairseq_positions"),
    (dict(type_vocab_size=-1), "type_vocab_size"),
    (dict(scale=0), "scale"),
    (dict(dropout=1.5), "dropout"),
    (dict(layer_norm="yes"), "layer_norm"),
])
def test_embedding_config_rejects_with_the_field_name(changes, field):
    kwargs = dict(vocab_size=100, hidden_size=16)
    kwargs.update(changes)
    with pytest.raises(ValueError, match=field):
        EmbeddingConfig(**kwargs)


def test_layer_rejects_non_config():
    with pytest.raises(TypeError, match="config"):
        TransformerEncoderLayer(dict(hidden_size=32))


def test_parameters_are_ordinary_named_parameters():
    config = LayerConfig(32, 4, 64, cross_attention=True, causal=True)
    layer = TransformerDecoderLayer(config)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["qkv_weight"] == (96, 32) and shapes["cross_kv_weight"] == (64, 32)
    assert shapes["fc1_weight"] == (64, 32) and shapes["fc2_weight"] == (32, 64)
    assert len(shapes) == 20
    half = TransformerDecoderLayer(config).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert TransformerEncoderLayer(LayerConfig(32, 4, 64, dtype=torch.bfloat16)).fc1_weight.dtype \
        == torch.bfloat16


# --------------------------------------------------------------------------------- weight maps
def test_entry_and_map_validation():
    with pytest.raises(ValueError, match="Concat"):
        Entry("w", ("a", "b"))
    with pytest.raises(ValueError, match="twice"):
        WeightMap([Entry("w", "a"), Entry("w", "b")])
    with pytest.raises(ValueError, match="twice"):
        WeightMap([Entry("w", "a"), Entry("v", "a")])
    wmap = WeightMap([Entry("w", ("a", "b"), CONCAT), Entry("t", "c", TRANSPOSE)])
    assert wmap.source_keys == ("a", "b", "c") and wmap.fused_keys == ("w", "t")
    assert "concat" in repr(wmap) and "transpose" in repr(wmap)
    with pytest.raises(KeyError, match="'b'"):
        wmap.to_fused({"a": torch.ones(2), "c": torch.ones(2, 3)})


@pytest.mark.parametrize("kind", ["fairseq_decoder", "bert", "gpt2"])
def test_round_trip_through_the_map_is_exact(kind):
    if kind == "fairseq_decoder":
        config = LayerConfig(32, 4, 64, causal=True, cross_attention=True, encoder_hidden_size=24)
        plain, wmap, cls = (FairseqDecoderLayer(32, 4, 64, encoder_dim=24),
                            fairseq_layer_map(config), TransformerDecoderLayer)
    elif kind == "bert":
        config = LayerConfig(32, 4, 64, activation="gelu", layer_norm_eps=1e-12)
        plain, wmap, cls = BertLayer(32, 4, 64), hf_bert_layer_map(config), TransformerEncoderLayer
    else:
        config = LayerConfig(32, 4, 128, pre_layer_norm=True, causal=True, activation="gelu_new")
        plain, wmap, cls = GPT2Block(32, 4, 128), hf_gpt2_block_map(config), TransformerEncoderLayer
    randomize_(plain)
    source = plain.state_dict()
    assert set(wmap.source_keys) == set(source)
    fused = wmap.load_into(cls(config), plain)
    back = wmap.to_source(dict(fused.named_parameters()))
    assert set(back) == set(source)
    for k, v in source.items():
        assert torch.equal(back[k], v), k
    # write_back into a fresh source module
    fresh = type(plain)(*(32, 4, 64) if kind != "gpt2" else (32, 4, 128),
                        **({"encoder_dim": 24} if kind == "fairseq_decoder" else {}))
    wmap.write_back(fused, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_attached_state_dict_has_source_keys_and_independent_tensors():
    config = LayerConfig(32, 4, 64, causal=True, cross_attention=True)
    plain = randomize_(FairseqDecoderLayer(32, 4, 64))
    wmap = fairseq_layer_map(config)
    fused = wmap.attach(wmap.load_into(TransformerDecoderLayer(config), plain))
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([fused])})
    state = model.state_dict()
    expected = {f"layers.0.{k}": v for k, v in plain.state_dict().items()}
    assert list(sorted(state)) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    q, k_ = state["layers.0.self_attn.q_proj.weight"], state["layers.0.self_attn.k_proj.weight"]
    # split pieces must not share storage: save_pretrained would take them for tied weights
    assert q.untyped_storage().data_ptr() != k_.untyped_storage().data_ptr()

    # a vanilla checkpoint loads into the fused model; the fused keys load too
    other = randomize_(FairseqDecoderLayer(32, 4, 64))
    model.load_state_dict({f"layers.0.{k}": v for k, v in other.state_dict().items()})
    assert torch.equal(fused.qkv_weight, torch.cat([other.self_attn.q_proj.weight,
                                                    other.self_attn.k_proj.weight,
                                                    other.self_attn.v_proj.weight]))
    fused_state = {f"layers.0.{n}": p.detach().clone() for n, p in fused.named_parameters()}
    model.load_state_dict(fused_state)
    with pytest.raises(RuntimeError, match="Missing key"):
        broken = {k: v for k, v in state.items() if "fc1" not in k}
        model.load_state_dict(broken)

    # torch.save / torch.load of the whole model and of its state dict
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    assert set(torch.load(buffer)) == set(expected)
    clone = pickle.loads(pickle.dumps(model))
    assert set(clone.state_dict()) == set(expected)


def test_load_into_reports_shape_and_coverage_mismatches():
    config = LayerConfig(32, 4, 64)
    wmap = fairseq_layer_map(config)
    with pytest.raises(ValueError, match="fc1_weight"):
        wmap.load_into(TransformerEncoderLayer(config), FairseqEncoderLayer(32, 4, 48))
    no_bias = LayerConfig(32, 4, 64, fc1_bias=False)
    with pytest.raises(KeyError, match="fc1_bias"):
        fairseq_layer_map(no_bias).load_into(TransformerEncoderLayer(config), {})
    with pytest.raises(ValueError, match="cross_attention"):
        hf_bert_layer_map(LayerConfig(32, 4, 64, cross_attention=True))
