"""Host cost of one fairseq layer, fused against fairseq's own, on a machine without a GPU.

    python benchmarks/host_cost_layers.py [--tokens 16 8] [--width 32] [--calls 400]

One ``TransformerEncoderLayerBase`` and one ``TransformerDecoderLayerBase`` (post-LN, dropout
0.1, training mode) at tiny widths run forward and backward on the CPU: fairseq's layer as it
is, and the same layer after ``fastpatch.accelerate`` with the CUDA kernels replaced by
stand-ins (``stand_in_kernels.py``), so the fused layer makes the calls it makes on a GPU. At
these widths the time is the host's: Python, dispatch, autograd (and fairseq's tiny CPU matmuls
and attention, which the fused layer runs as well). Milliseconds per forward+backward, medians
of five repeats.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stand_in_kernels  # noqa: E402


def _config(width: int):
    from fairseq.models.transformer import TransformerConfig

    config = TransformerConfig()
    for side in (config.encoder, config.decoder):
        side.embed_dim, side.ffn_embed_dim, side.attention_heads = width, 2 * width, 2
    config.dropout, config.attention_dropout, config.activation_dropout = 0.1, 0.0, 0.0
    return config


def _per_call_ms(step, calls: int) -> float:
    for _ in range(30):
        step()
    repeats = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(calls):
            step()
        repeats.append((time.perf_counter() - began) / calls * 1e3)
    return statistics.median(repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs=2, type=int, default=[16, 8], metavar=("T", "B"))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()

    import fastpatch
    from fairseq.modules.transformer_layer import (TransformerDecoderLayerBase,
                                                   TransformerEncoderLayerBase)

    # one thread: CPU thread pools add their own swings to host timings on a small machine
    torch.set_num_threads(1)
    length, batch = args.tokens
    x = torch.randn(length, batch, args.width, requires_grad=True)
    encoder_out = torch.randn(length, batch, args.width)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -3:] = True  # one padded row
    causal = torch.triu(torch.full((length, length), float("-inf")), 1)
    grad = torch.ones_like(x)

    def encoder_step(layer):
        return lambda: torch.autograd.backward(layer(x, padding), grad)

    def decoder_step(layer):
        return lambda: torch.autograd.backward(
            layer(x, encoder_out=encoder_out, encoder_padding_mask=padding, self_attn_mask=causal)[0], grad)

    print(f"# host cost of one layer, ms per forward+backward, T={length} B={batch} C={args.width}, "
          f"torch {torch.__version__}, CPU")
    print(f"{'layer':10} {'fairseq':>9} {'fused (stand-in kernels)':>26}")
    for name, cls, step in (("encoder", TransformerEncoderLayerBase, encoder_step),
                            ("decoder", TransformerDecoderLayerBase, decoder_step)):
        layer = cls(_config(args.width)).train()
        plain_ms = _per_call_ms(step(layer), args.calls)
        holder = torch.nn.Sequential(copy.deepcopy(layer))
        fastpatch.accelerate(holder)
        with stand_in_kernels.installed() as kernels:
            fused_ms = _per_call_ms(step(holder[0]), args.calls)
        if kernels.calls == 0:
            raise SystemExit(f"the fused {name} layer made no kernel call: it ran the reference path")
        print(f"{name:10} {plain_ms:9.3f} {fused_ms:26.3f}")


if __name__ == "__main__":
    main()
