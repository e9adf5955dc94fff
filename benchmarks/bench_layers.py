"""One transformer layer, forward+backward (input and all parameter gradients), training mode
with dropout 0.1: PyTorch's ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` in
eager and under ``torch.compile`` vs fastpatch's fused layers, 8192 tokens (64 x 128).

Shapes follow LightSeq's presets: BERT-base (768/12/3072, post-LN, GELU) and transformer-big
(1024/16/4096, pre-LN, ReLU); the decoder attends to a 64 x 128 encoder output. The
``fastpatch-split`` variant routes the head split through the ``split_heads`` kernel instead of
strided views (``FusedSublayers.split_heads_kernel``), to tell which the layers should use.
"""
import torch
from torch import nn

from fastpatch.layers import LayerConfig, TransformerDecoderLayer, TransformerEncoderLayer
from harness import Case

BATCH, LENGTH = 64, 128
DROPOUT = 0.1
# name: (hidden, heads, ffn, pre_ln, activation)
SHAPES = {
    "bert-base": (768, 12, 3072, False, "gelu"),
    "transformer-big": (1024, 16, 4096, True, "relu"),
}


def _train_step(module, *inputs):
    """Forward + backward of ``module(*inputs)``, gradients of the inputs and every parameter
    (returned, not accumulated, so each call does the same work)."""
    leaves = [t for t in inputs if t.requires_grad] + list(module.parameters())
    out = module(*inputs)
    grad = torch.randn_like(out)

    def step():
        torch.autograd.grad(module(*inputs), leaves, grad)

    return step


class _TorchDecoder(nn.Module):
    """``nn.TransformerDecoderLayer`` with the causal mask built the way its docs ask."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device,
                                                              dtype=x.dtype)
        return self.layer(x, memory, tgt_mask=mask, tgt_is_causal=True)


class _FusedDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x, memory):
        return self.layer(x, memory)


def _layers(kind, hidden, heads, ffn, pre_ln, activation, dtype):
    config = LayerConfig(hidden, heads, ffn, pre_layer_norm=pre_ln, activation=activation,
                         attention_dropout=DROPOUT, activation_dropout=0.0,
                         hidden_dropout=DROPOUT, causal=kind == "decoder",
                         cross_attention=kind == "decoder", dtype=dtype)
    torch_kwargs = dict(d_model=hidden, nhead=heads, dim_feedforward=ffn, dropout=DROPOUT,
                        activation=activation, batch_first=True, norm_first=pre_ln,
                        device="cuda", dtype=dtype)
    if kind == "encoder":
        plain = nn.TransformerEncoderLayer(**torch_kwargs)
        fused, split = (TransformerEncoderLayer(config).cuda() for _ in range(2))
    else:
        plain = _TorchDecoder(nn.TransformerDecoderLayer(**torch_kwargs))
        fused, split = (_FusedDecoder(TransformerDecoderLayer(config).cuda()) for _ in range(2))
    (split.layer if kind == "decoder" else split).split_heads_kernel = True
    return plain.train(), fused.train(), split.train()


def cases():
    out = []
    for name, (hidden, heads, ffn, pre_ln, activation) in SHAPES.items():
        for kind in ("encoder", "decoder"):
            for dtype in (torch.float16, torch.bfloat16):
                plain, fused, split = _layers(kind, hidden, heads, ffn, pre_ln, activation, dtype)
                x = torch.randn(BATCH, LENGTH, hidden, device="cuda", dtype=dtype,
                                requires_grad=True)
                inputs = (x,)
                if kind == "decoder":
                    inputs += (torch.randn(BATCH, LENGTH, hidden, device="cuda", dtype=dtype,
                                           requires_grad=True),)
                compiled = torch.compile(plain)
                out.append(Case(f"{kind} layer fwd+bwd", f"{name} {BATCH}x{LENGTH}",
                                str(dtype).split(".")[-1], {
                                    "eager": _train_step(plain, *inputs),
                                    "compile": _train_step(compiled, *inputs),
                                    "fastpatch": _train_step(fused, *inputs),
                                    "fastpatch-split": _train_step(split, *inputs),
                                }, note=f"{'pre' if pre_ln else 'post'}-LN {activation}, "
                                        f"dropout {DROPOUT}"))
    return out
