"""bias + GELU + dropout, forward+backward: eager vs torch.compile vs fastpatch."""
import torch
import torch.nn.functional as F

from fastpatch.ops import bias_activation_dropout
from harness import Case, fwd_bwd

SHAPES = {"bert-base 8192x3072": (8192, 3072), "gpt2 8192x3072": (8192, 3072),
          "transformer-big 8192x4096": (8192, 4096)}


def eager(x, b):
    return F.dropout(F.gelu(x + b), p=0.1, training=True)


def cases():
    compiled = torch.compile(eager)
    out = []
    for name, (n, h) in SHAPES.items():
        if name.startswith("gpt2"):
            continue  # same shape as bert-base
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(h, device="cuda", dtype=dtype, requires_grad=True)
            out.append(Case("bias_gelu_dropout fwd+bwd", name, str(dtype).split(".")[-1], {
                "eager": fwd_bwd(eager, x, b),
                "compile": fwd_bwd(compiled, x, b),
                "fastpatch": fwd_bwd(lambda a, c: bias_activation_dropout(a, c, "gelu", p=0.1), x, b),
            }))
    return out
