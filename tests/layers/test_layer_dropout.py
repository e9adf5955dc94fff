"""Dropout inside the fused layers: reproducible under a seed, fresh masks on every call, and
the expected output preserved (checked where the layer is linear in the dropout masks)."""
import pytest
import torch

from fastpatch.layers import LayerConfig, TransformerDecoderLayer, TransformerEncoderLayer
from numerics import assert_close_relative
from plain_layers import randomize_

DROPOUTS = dict(attention_dropout=0.2, activation_dropout=0.3, hidden_dropout=0.1)


def layers():
    enc = TransformerEncoderLayer(LayerConfig(32, 4, 64, activation="gelu", **DROPOUTS))
    dec = TransformerDecoderLayer(LayerConfig(32, 4, 64, causal=True, cross_attention=True,
                                              pre_layer_norm=True, **DROPOUTS))
    return randomize_(enc), randomize_(dec)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_same_seed_same_output_and_masks_differ_across_calls(which):
    enc, dec = layers()
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    run = (lambda: enc(x)) if which == "encoder" else (lambda: dec(x, memory))
    torch.manual_seed(7)
    first = run()
    second = run()
    torch.manual_seed(7)
    again = run()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    layer = enc if which == "encoder" else dec
    layer.eval()
    assert torch.equal(run(), run())


def _expected_value_check(layer, x, samples=6000, tol=0.03):
    """Averages the layer over ``samples`` independent dropout draws (replicated batch rows)."""
    with torch.no_grad():
        layer.eval()
        expected = layer(x)
        layer.train()
        draws = layer(x.repeat(samples, 1, 1)).view(samples, *x.shape)
    assert not torch.equal(draws[0], draws[1])
    assert_close_relative(draws.mean(0) - x, expected - x, tol, "mean over dropout draws")


def test_expected_value_preserved_through_attention_and_hidden_dropout():
    # pre-LN with the FFN switched off: out = x + drop(Attn(LN(x)) + b), linear in both masks
    layer = randomize_(TransformerEncoderLayer(LayerConfig(16, 2, 32, pre_layer_norm=True,
                                                           attention_dropout=0.3,
                                                           hidden_dropout=0.2)))
    with torch.no_grad():
        layer.fc1_weight.zero_()
        layer.fc1_bias.zero_()
        layer.fc2_weight.zero_()
        layer.fc2_bias.zero_()
    _expected_value_check(layer, torch.randn(2, 5, 16))


def test_expected_value_preserved_through_activation_and_hidden_dropout():
    # pre-LN with the attention switched off: out = x + b + drop(fc2(drop(act(fc1(LN(x))))))
    layer = randomize_(TransformerEncoderLayer(LayerConfig(16, 2, 32, pre_layer_norm=True,
                                                           activation="relu",
                                                           activation_dropout=0.3,
                                                           hidden_dropout=0.2)))
    with torch.no_grad():
        layer.attn_out_weight.zero_()
        layer.attn_out_bias.zero_()
    _expected_value_check(layer, torch.randn(2, 5, 16))
