"""fastpatch.ops.layernorm_residual against formulas written here."""
import pytest
import torch
import torch.nn.functional as F

from fastpatch.ops.layernorm_residual import (bias_dropout_residual_layernorm,
                                              bias_dropout_residual_prenorm, layer_norm)
from numerics import assert_close_relative, assert_within_factor_of_torch


def naive_layer_norm(h, weight, ln_bias, eps):
    """The textbook LayerNorm over the last dim (biased variance)."""
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    out = (h - mu) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if ln_bias is not None:
        out = out + ln_bias
    return out


def naive_residual(x, bias, residual, keep=None, p=0.0):
    """residual + dropout(x + bias), with dropout given by a 0/1 keep tensor."""
    v = x if bias is None else x + bias
    if keep is not None:
        v = v * keep / (1 - p)
    return residual + v


def make_inputs(shape, dtype=torch.float64, device="cpu", bias=True, weight=True, ln_bias=True):
    hidden = shape[-1]
    def leaf(*s, present=True, scale=1.0):
        if not present:
            return None
        return (scale * torch.randn(*s, dtype=torch.float64, device=device)).to(dtype).requires_grad_(True)
    return dict(x=leaf(*shape), bias=leaf(hidden, present=bias, scale=0.5),
                residual=leaf(*shape), weight=leaf(hidden, present=weight, scale=0.5),
                ln_bias=leaf(hidden, present=ln_bias, scale=0.5))


def leaves(inputs):
    return [t for t in inputs.values() if t is not None]


AFFINE = [dict(), dict(weight=False, ln_bias=False), dict(ln_bias=False), dict(bias=False)]


@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 7), (4, 1, 13), (6, 33)])
@pytest.mark.parametrize("present", AFFINE)
@pytest.mark.parametrize("eps", [1e-5, 1e-12, 0.3])
def test_post_ln_forward_backward_matches_formula(shape, present, eps):
    inp = make_inputs(shape, **present)
    out = bias_dropout_residual_layernorm(**inp, eps=eps)
    expected = naive_layer_norm(naive_residual(inp["x"], inp["bias"], inp["residual"]),
                                inp["weight"], inp["ln_bias"], eps)
    assert_close_relative(out, expected, 1e-12, "forward")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves(inp), g),
                    torch.autograd.grad(expected, leaves(inp), g)):
        assert_close_relative(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 7), (6, 33)])
@pytest.mark.parametrize("present", AFFINE)
def test_pre_ln_forward_backward_combines_both_outputs(shape, present):
    inp = make_inputs(shape, **present)
    new_residual, normed = bias_dropout_residual_prenorm(**inp, eps=1e-6)
    ref_residual = naive_residual(inp["x"], inp["bias"], inp["residual"])
    ref_normed = naive_layer_norm(ref_residual, inp["weight"], inp["ln_bias"], 1e-6)
    assert_close_relative(new_residual, ref_residual, 1e-14, "new residual")
    assert_close_relative(normed, ref_normed, 1e-12, "normed")
    g_res, g_norm = torch.randn_like(new_residual), torch.randn_like(normed)
    grads = torch.autograd.grad((new_residual, normed), leaves(inp), (g_res, g_norm))
    ref_grads = torch.autograd.grad((ref_residual, ref_normed), leaves(inp), (g_res, g_norm))
    for a, b in zip(grads, ref_grads):
        assert_close_relative(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("used", ["residual", "normed"])
def test_pre_ln_backward_with_one_output_unused(used):
    inp = make_inputs((4, 9))
    outs = bias_dropout_residual_prenorm(**inp)
    ref_residual = naive_residual(inp["x"], inp["bias"], inp["residual"])
    refs = (ref_residual, naive_layer_norm(ref_residual, inp["weight"], inp["ln_bias"], 1e-5))
    i = 0 if used == "residual" else 1
    g = torch.randn_like(outs[i])
    grads = torch.autograd.grad(outs[i], leaves(inp), g, allow_unused=True)
    ref_grads = torch.autograd.grad(refs[i], leaves(inp), g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if b is None or not b.abs().max() > 0:  # no path from this input to the output used
            assert a is None or not a.abs().max() > 0
        else:
            assert_close_relative(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 1), (6, 33)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_formula_and_torch(shape, affine):
    inp = make_inputs(shape, bias=False, weight=affine, ln_bias=affine)
    x, w, b = inp["x"], inp["weight"], inp["ln_bias"]
    out = layer_norm(x, w, b, eps=1e-5)
    expected = naive_layer_norm(x, w, b, 1e-5)
    assert_close_relative(out, expected, 1e-12, "forward")
    assert_close_relative(out, F.layer_norm(x, shape[-1:], w, b, 1e-5), 1e-12, "vs F.layer_norm")
    g = torch.randn_like(out)
    params = [t for t in (x, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
        assert_close_relative(a, r, 1e-10, "gradient")


def test_gradcheck_post_and_pre_ln_with_dropout():
    inp = make_inputs((3, 6))
    args = leaves(inp)

    def seeded(fn):
        # the same mask on every call, so finite differences see one function
        def run(x, bias, residual, weight, ln_bias):
            torch.manual_seed(7)
            return fn(x, bias, residual, weight, ln_bias, eps=1e-3, p=0.3)
        return run

    assert torch.autograd.gradcheck(seeded(bias_dropout_residual_layernorm), args)
    assert torch.autograd.gradcheck(seeded(bias_dropout_residual_prenorm), args)


def test_gradcheck_layer_norm():
    inp = make_inputs((4, 5), bias=False)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b, 1e-4),
                                    (inp["x"], inp["weight"], inp["ln_bias"]))


def test_fp32_matches_eager_pytorch():
    x, r = torch.randn(64, 33), torch.randn(64, 33)
    b, w, lb = torch.randn(33), torch.randn(33), torch.randn(33)
    expected = F.layer_norm(r + (x + b), (33,), w, lb, 1e-5)
    assert_close_relative(bias_dropout_residual_layernorm(x, b, r, w, lb), expected, 1e-6)
    assert_close_relative(layer_norm(x, w, lb), F.layer_norm(x, (33,), w, lb), 1e-6)


def test_dropout_statistics_mask_and_gradient_agree():
    p = 0.3
    x = (torch.rand(400, 250) + 0.5).requires_grad_(True)
    residual = torch.randn(400, 250)
    new_residual, _ = bias_dropout_residual_prenorm(x, None, residual, None, None, p=p)
    dropped = new_residual - residual  # dropout(x)
    kept = dropped != 0
    assert abs((1 - kept.float().mean().item()) - p) < 0.01
    torch.testing.assert_close(dropped[kept], x.detach()[kept] / (1 - p))
    # only the residual stream is used: the normed output's gradient is absent
    new_residual.backward(torch.ones_like(new_residual))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))


def test_post_ln_dropout_gradient_uses_forward_mask():
    p = 0.25
    inp = make_inputs((16, 24))
    out, h, _, _, mask = torch.ops.fastpatch.bias_dropout_residual_layernorm(
        inp["x"], inp["bias"], inp["residual"], inp["weight"], inp["ln_bias"], 1e-5, p)
    keep = mask.double()
    assert 0 < keep.mean() < 1
    ref_h = naive_residual(inp["x"], inp["bias"], inp["residual"], keep, p)
    expected = naive_layer_norm(ref_h, inp["weight"], inp["ln_bias"], 1e-5)
    assert_close_relative(h, ref_h, 1e-14, "h")
    assert_close_relative(out, expected, 1e-12, "forward")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves(inp), g), torch.autograd.grad(expected, leaves(inp), g)):
        assert_close_relative(a, b, 1e-10, "gradient")


def test_dropout_reproducible_with_seed_and_varies_across_calls():
    x, r = torch.randn(32, 64), torch.randn(32, 64)
    torch.manual_seed(1)
    a = bias_dropout_residual_layernorm(x, None, r, None, None, p=0.5)
    b = bias_dropout_residual_layernorm(x, None, r, None, None, p=0.5)
    torch.manual_seed(1)
    c = bias_dropout_residual_layernorm(x, None, r, None, None, p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_eval_mode_disables_dropout():
    x, r, b = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16)
    out = bias_dropout_residual_layernorm(x, b, r, None, None, p=0.9, training=False)
    torch.testing.assert_close(out, F.layer_norm(r + x + b, (16,)))
    new_residual, _ = bias_dropout_residual_prenorm(x, b, r, None, None, p=0.9, training=False)
    torch.testing.assert_close(new_residual, r + x + b)


def test_half_precision_on_cpu_reference():
    x, r = torch.randn(5, 24, dtype=torch.bfloat16), torch.randn(5, 24, dtype=torch.bfloat16)
    w = torch.randn(24, dtype=torch.bfloat16)
    out = bias_dropout_residual_layernorm(x, None, r, w, None)
    assert out.dtype == torch.bfloat16
    expected = naive_layer_norm((r.double() + x.double()).to(torch.bfloat16).double(), w.double(), None, 1e-5)
    assert_close_relative(out, expected, 1e-2)


def test_empty_batch():
    inp = make_inputs((0, 12), dtype=torch.float32)
    new_residual, normed = bias_dropout_residual_prenorm(**inp)
    assert normed.shape == (0, 12) and new_residual.shape == (0, 12)
    (normed.sum() + new_residual.sum()).backward()
    assert torch.equal(inp["weight"].grad, torch.zeros(12))
    assert torch.equal(inp["bias"].grad, torch.zeros(12))


@pytest.mark.parametrize("bad, error, name", [
    (dict(x=[1.0]), TypeError, "x"),
    (dict(x=torch.ones(2, 4, dtype=torch.int64)), TypeError, "x"),
    (dict(x=torch.ones(2, 0), residual=torch.ones(2, 0)), ValueError, "x"),
    (dict(residual=None), TypeError, "residual"),
    (dict(residual=torch.ones(2, 5)), ValueError, "residual"),
    (dict(residual=torch.ones(2, 4, dtype=torch.float64)), TypeError, "residual"),
    (dict(bias=torch.ones(5)), ValueError, "bias"),
    (dict(weight=torch.ones(4, 1)), ValueError, "weight"),
    (dict(ln_bias=torch.ones(4, dtype=torch.float16)), TypeError, "ln_bias"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(p=1.0), ValueError, "p"),
    (dict(p=None), TypeError, "p"),
])
@pytest.mark.parametrize("fn", [bias_dropout_residual_layernorm, bias_dropout_residual_prenorm])
def test_bad_input_names_the_argument(fn, bad, error, name):
    kwargs = dict(x=torch.ones(2, 4), bias=None, residual=torch.ones(2, 4), weight=None,
                  ln_bias=None, eps=1e-5, p=0.1)
    kwargs.update(bad)
    with pytest.raises(error, match=rf"\b{name}\b"):
        fn(**kwargs)


@pytest.mark.parametrize("bad, error, name", [
    (dict(x=torch.ones(3)), ValueError, "weight"),
    (dict(bias=torch.ones(4, dtype=torch.bfloat16)), TypeError, "bias"),
    (dict(eps=True), TypeError, "eps"),
])
def test_layer_norm_bad_input_names_the_argument(bad, error, name):
    kwargs = dict(x=torch.ones(2, 4), weight=torch.ones(4), bias=None, eps=1e-5)
    kwargs.update(bad)
    with pytest.raises(error, match=rf"\b{name}\b"):
        layer_norm(**kwargs)


def test_torch_compile_fullgraph_traces_through_ops():
    inp = make_inputs((4, 16), dtype=torch.float32)

    def block(x, bias, residual, weight, ln_bias):
        new_residual, normed = bias_dropout_residual_prenorm(x, bias, residual, weight, ln_bias)
        post = bias_dropout_residual_layernorm(normed, bias, new_residual, weight, ln_bias, p=0.0)
        return layer_norm(post, weight, ln_bias)

    fn = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = fn(**inp)
    expected = block(**{k: v.detach() for k, v in inp.items()})
    assert_close_relative(out, expected, 1e-6)
    out.square().sum().backward()
    assert all(t.grad is not None for t in leaves(inp))


def test_opcheck():
    inp = make_inputs((3, 8), dtype=torch.float32)
    x, b, r, w, lb = inp["x"], inp["bias"], inp["residual"], inp["weight"], inp["ln_bias"]
    torch.library.opcheck(torch.ops.fastpatch.bias_dropout_residual_layernorm.default,
                          (x, b, r, w, lb, 1e-5, 0.0))
    torch.library.opcheck(torch.ops.fastpatch.bias_dropout_residual_layernorm.default,
                          (x, None, r, None, None, 1e-5, 0.0))
    torch.library.opcheck(torch.ops.fastpatch.layer_norm.default, (x, w, lb, 1e-5))
    torch.library.opcheck(torch.ops.fastpatch.layer_norm.default, (x, None, None, 1e-5))
    d = lambda t: t.detach()
    _, h, mean, rstd, mask = torch.ops.fastpatch.bias_dropout_residual_layernorm(
        d(x), d(b), d(r), d(w), d(lb), 1e-5, 0.2)
    torch.library.opcheck(torch.ops.fastpatch.bias_dropout_residual_layernorm_backward.default,
                          (torch.randn(3, 8), torch.randn(3, 8), h, mean, rstd, d(w), mask, 0.2,
                           True, True, True))
    torch.library.opcheck(torch.ops.fastpatch.layer_norm_backward.default,
                          (torch.randn(3, 8), None, h, mean, rstd, None, None, 0.0,
                           False, False, False))


@pytest.mark.parametrize("kind", ["post", "pre", "layer_norm"])
def test_eager_path_matches_custom_op_autograd(kind):
    """Eager calls run an autograd.Function; compile runs the custom ops' registered autograd.
    Both must give the same outputs and gradients (same seed, so the same dropout mask)."""
    inp = make_inputs((5, 12))
    args = tuple(inp.values())
    ops = torch.ops.fastpatch
    names = ["x", "weight", "ln_bias"] if kind == "layer_norm" else list(inp)
    torch.manual_seed(2)
    if kind == "post":
        eager = (bias_dropout_residual_layernorm(*args, p=0.3),)
    elif kind == "pre":
        eager = bias_dropout_residual_prenorm(*args, p=0.3)
    else:
        eager = (layer_norm(inp["x"], inp["weight"], inp["ln_bias"]),)
    torch.manual_seed(2)
    if kind == "layer_norm":
        op = ops.layer_norm(inp["x"], inp["weight"], inp["ln_bias"], 1e-5)[:1]
    else:
        out, h, _, _, _ = ops.bias_dropout_residual_layernorm(*args, 1e-5, 0.3)
        op = (out,) if kind == "post" else (h, out)
    assert "Generated" not in type(eager[0].grad_fn).__name__  # the eager path was taken
    grads = [torch.randn_like(t) for t in eager]
    eager_grads = torch.autograd.grad(eager, [inp[n] for n in names], grads)
    op_grads = torch.autograd.grad(op, [inp[n] for n in names], grads)
    for a, b in zip(eager + eager_grads, op + op_grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- GPU
CUDA_SHAPES = [(1, 64), (8192, 768), (8192, 1024), (37, 1001), (16, 8192), (3, 5, 3072), (7, 4),
               (5, 2050), (2, 16384)]


def _kernel_loaded():
    from fastpatch.ops._dispatch import kernel_for
    probe = torch.zeros(1, device="cuda")
    return kernel_for("layernorm_residual_fwd", probe) is not None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("kind", ["post", "pre", "layer_norm"])
def test_cuda_kernel_error_within_rule(dtype, shape, kind):
    assert _kernel_loaded(), "CUDA kernel not loaded"
    base = make_inputs(shape, dtype=torch.float32, device="cuda")
    base = {k: v.detach() for k, v in base.items()}
    def copy(to):
        return {k: v.to(to).requires_grad_(True) for k, v in base.items()}
    fused_in, plain_in = copy(dtype), copy(dtype)
    ref_in = {k: v.to(dtype).double().requires_grad_(True) for k, v in base.items()}
    hidden = shape[-1:]

    def run(fn_kind, inp):
        if fn_kind == "layer_norm":
            return (F.layer_norm(inp["x"], hidden, inp["weight"], inp["ln_bias"], 1e-5),)
        h = inp["residual"] + (inp["x"] + inp["bias"])
        out = F.layer_norm(h, hidden, inp["weight"], inp["ln_bias"], 1e-5)
        return (out,) if fn_kind == "post" else (h, out)

    if kind == "post":
        fused = (bias_dropout_residual_layernorm(**fused_in),)
    elif kind == "pre":
        fused = bias_dropout_residual_prenorm(**fused_in)
    else:
        fused = (layer_norm(fused_in["x"], fused_in["weight"], fused_in["ln_bias"]),)
    plain, ref = run(kind, plain_in), run(kind, ref_in)
    for i, (a, b, r) in enumerate(zip(fused, plain, ref)):
        assert a.dtype == dtype
        assert_within_factor_of_torch(a, b, r, f"output {i}")
    names = ["x", "weight", "ln_bias"] if kind == "layer_norm" else list(base)
    grads = [torch.randn_like(o) for o in fused]
    got = torch.autograd.grad(fused, [fused_in[n] for n in names], grads)
    want = torch.autograd.grad(plain, [plain_in[n] for n in names], grads)
    exact = torch.autograd.grad(ref, [ref_in[n] for n in names], [g.double() for g in grads])
    for name, a, b, r in zip(names, got, want, exact):
        assert_within_factor_of_torch(a, b, r, f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 768), (33, 1001)])
def test_cuda_dropout_matches_formula_with_kernel_mask(dtype, shape):
    assert _kernel_loaded(), "CUDA kernel not loaded"
    p = 0.1
    inp = {k: v.detach().to(dtype) for k, v in make_inputs(shape, torch.float32, "cuda").items()}
    out, h, mean, rstd, mask = torch.ops.fastpatch.bias_dropout_residual_layernorm(
        inp["x"], inp["bias"], inp["residual"], inp["weight"], inp["ln_bias"], 1e-5, p)
    assert mask.dtype == torch.uint8 and mask.shape == shape
    d = {k: v.double() for k, v in inp.items()}
    ref_h = naive_residual(d["x"], d["bias"], d["residual"], mask.double(), p)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close_relative(h, ref_h, tol, "h")
    # normalising the h the kernel stored isolates the LayerNorm from h's rounding
    assert_close_relative(out, naive_layer_norm(h.double(), d["weight"], d["ln_bias"], 1e-5), tol, "out")
    assert_close_relative(mean, h.double().mean(-1), 1e-5, "mean")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_statistics_and_reproducibility(dtype):
    x = torch.rand(8192, 770, device="cuda", dtype=dtype) + 0.5
    r = torch.zeros_like(x)
    torch.manual_seed(3)
    a, _ = bias_dropout_residual_prenorm(x, None, r, None, None, p=0.1)
    torch.manual_seed(3)
    b, _ = bias_dropout_residual_prenorm(x, None, r, None, None, p=0.1)
    c, _ = bias_dropout_residual_prenorm(x, None, r, None, None, p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rate = (a == 0).float().mean().item()
    assert abs(rate - 0.1) < 0.005, rate
    per_column = (a == 0).float().mean(0)  # no column pattern in the mask
    assert per_column.min() > 0.05 and per_column.max() < 0.15


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_unaligned_rows_match_aligned(dtype):
    """A view starting one element into its storage takes the element-wise path: same result."""
    shape = (64, 768)
    inp = {k: v.detach().to(dtype) for k, v in make_inputs(shape, torch.float32, "cuda").items()}
    storage = torch.empty(64 * 768 + 1, device="cuda", dtype=dtype)
    shifted = storage[1:].view(shape)
    shifted.copy_(inp["x"])
    assert shifted.data_ptr() % 16 != 0
    args = (inp["bias"], inp["residual"], inp["weight"], inp["ln_bias"])
    torch.testing.assert_close(bias_dropout_residual_layernorm(shifted, *args),
                               bias_dropout_residual_layernorm(inp["x"], *args), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_rows_wider_than_kernel_use_reference():
    inp = make_inputs((3, 40000), torch.float16, "cuda")
    out = bias_dropout_residual_layernorm(**inp)
    d = {k: v.detach().double() for k, v in inp.items()}
    expected = naive_layer_norm(naive_residual(d["x"], d["bias"], d["residual"]), d["weight"],
                                d["ln_bias"], 1e-5)
    assert_close_relative(out, expected, 2e-3)
    out.sum().backward()
    assert inp["weight"].grad is not None


@pytest.mark.cuda
def test_cuda_empty_batch():
    inp = make_inputs((0, 768), torch.float16, "cuda")
    h, out = bias_dropout_residual_prenorm(**inp, p=0.1)
    (h.sum() + out.sum()).backward()
    assert out.shape == (0, 768) and torch.equal(inp["weight"].grad, torch.zeros_like(inp["weight"]))


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_graph_capture():
    inp = {k: v.detach() for k, v in make_inputs((256, 768), torch.float16, "cuda").items()}
    args = (inp["x"], inp["bias"], inp["residual"], inp["weight"], inp["ln_bias"])
    fn = torch.compile(lambda *a: bias_dropout_residual_layernorm(*a), fullgraph=True)
    torch.testing.assert_close(fn(*args), bias_dropout_residual_layernorm(*args))
    static_x = inp["x"].clone()
    static_args = (static_x,) + args[1:]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bias_dropout_residual_prenorm(*static_args, p=0.1)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, out = bias_dropout_residual_prenorm(*static_args, p=0.1)
    graph.replay()
    first = h.clone()
    graph.replay()
    assert not torch.equal(first, h), "dropout masks must change between graph replays"
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    kept = (h - inp["residual"]) != 0
    expected = inp["residual"].float() + (static_x.float() + inp["bias"].float()) / 0.9
    torch.testing.assert_close(h[kept].float(), expected[kept], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), F.layer_norm(h.float(), (768,), inp["weight"].float(),
                                                         inp["ln_bias"].float()), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["pre", "layer_norm"])
def test_cuda_custom_op_autograd_matches_eager_path(kind):
    """The registered autograd of the custom ops (used under torch.compile) and the eager
    autograd.Function the public functions use give identical results."""
    inp = make_inputs((300, 1024), torch.bfloat16, "cuda")
    names = ["x", "weight", "ln_bias"] if kind == "layer_norm" else list(inp)
    ops = torch.ops.fastpatch
    if kind == "layer_norm":
        public = (layer_norm(inp["x"], inp["weight"], inp["ln_bias"], 1e-5),)
        op = ops.layer_norm(inp["x"], inp["weight"], inp["ln_bias"], 1e-5)[:1]
    else:
        args = tuple(inp.values())
        torch.manual_seed(5)
        public = bias_dropout_residual_prenorm(*args, p=0.2)
        torch.manual_seed(5)
        out, h, _, _, _ = ops.bias_dropout_residual_layernorm(*args, 1e-5, 0.2)
        op = (h, out)
    grads = [torch.randn_like(t) for t in public]
    for a, b in zip(public, op):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(public, [inp[n] for n in names], grads),
                    torch.autograd.grad(op, [inp[n] for n in names], grads)):
        assert torch.equal(a, b)
