"""bias + dropout + residual + LayerNorm (post-LN and pre-LN) and plain LayerNorm,
forward+backward: eager vs torch.compile vs fastpatch."""
import torch
import torch.nn.functional as F

from fastpatch.ops import (bias_dropout_residual_layernorm, bias_dropout_residual_prenorm,
                           layer_norm)
from harness import Case, fwd_bwd

SHAPES = {"bert-base 8192x768": (8192, 768), "bert-large 8192x1024": (8192, 1024)}
P, EPS = 0.1, 1e-5


def eager_post(x, b, r, w, lb):
    return F.layer_norm(r + F.dropout(x + b, p=P, training=True), x.shape[-1:], w, lb, EPS)


def eager_pre(x, b, r, w, lb):
    h = r + F.dropout(x + b, p=P, training=True)
    return h, F.layer_norm(h, x.shape[-1:], w, lb, EPS)


def eager_layer_norm(x, w, lb):
    return F.layer_norm(x, x.shape[-1:], w, lb, EPS)


def fwd_bwd_both(fn, *inputs):
    """Like harness.fwd_bwd, with gradients flowing into both of pre-LN's outputs."""
    outs = fn(*inputs)
    grads = [torch.randn_like(o) for o in outs]
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        torch.autograd.grad(fn(*inputs), leaves, grads)

    return step


def cases():
    compiled_post, compiled_pre = torch.compile(eager_post), torch.compile(eager_pre)
    compiled_ln = torch.compile(eager_layer_norm)
    out = []
    for name, (n, h) in SHAPES.items():
        for dtype in (torch.float16, torch.bfloat16):
            def leaf(*shape):
                return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
            x, r, b, w, lb = leaf(n, h), leaf(n, h), leaf(h), leaf(h), leaf(h)
            dt = str(dtype).split(".")[-1]
            out.append(Case("bias_dropout_residual_ln fwd+bwd", name, dt, {
                "eager": fwd_bwd(eager_post, x, b, r, w, lb),
                "compile": fwd_bwd(compiled_post, x, b, r, w, lb),
                "fastpatch": fwd_bwd(lambda *a: bias_dropout_residual_layernorm(*a, EPS, P), x, b, r, w, lb),
            }, note=f"post-LN, p={P}"))
            out.append(Case("bias_dropout_residual_prenorm fwd+bwd", name, dt, {
                "eager": fwd_bwd_both(eager_pre, x, b, r, w, lb),
                "compile": fwd_bwd_both(compiled_pre, x, b, r, w, lb),
                "fastpatch": fwd_bwd_both(lambda *a: bias_dropout_residual_prenorm(*a, EPS, P),
                                          x, b, r, w, lb),
            }, note=f"pre-LN, p={P}, gradients into both outputs"))
            out.append(Case("layer_norm fwd+bwd", name, dt, {
                "eager": fwd_bwd(eager_layer_norm, x, w, lb),
                "compile": fwd_bwd(compiled_ln, x, w, lb),
                "fastpatch": fwd_bwd(lambda *a: layer_norm(*a, EPS), x, w, lb),
            }))
    return out
