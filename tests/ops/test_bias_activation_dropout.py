"""fastpatch.ops.bias_activation_dropout against formulas written here."""
import math

import pytest
import torch

from fastpatch.ops import bias_activation_dropout
from numerics import assert_close_relative, assert_within_factor_of_torch

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]


def naive(x, bias, activation):
    """The textbook formulas, independent of the library's reference."""
    v = x + bias if bias is not None else x
    if activation == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    if activation == "relu":
        return torch.where(v > 0, v, torch.zeros_like(v))
    return v / (1 + torch.exp(-v))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 7), (4, 1, 13)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_backward_matches_formula(activation, shape, with_bias):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True) if with_bias else None
    out = bias_activation_dropout(x, bias, activation, p=0.0)
    expected = naive(x, bias, activation)
    assert_close_relative(out, expected, 1e-12, "forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + ([bias] if with_bias else []), g)
    ref_grads = torch.autograd.grad(expected, [x] + ([bias] if with_bias else []), g)
    for a, b in zip(grads, ref_grads):
        assert_close_relative(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    # keep x away from ReLU's kink, where finite differences are meaningless
    x = (torch.rand(2, 3, 6, dtype=torch.float64) + 0.1) * torch.sign(torch.randn(2, 3, 6, dtype=torch.float64))
    x.requires_grad_(True)
    bias = (0.01 * torch.randn(6, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: bias_activation_dropout(a, b, activation), (x, bias))


def test_fp32_matches_formula():
    x = torch.randn(64, 33)
    bias = torch.randn(33)
    assert_close_relative(bias_activation_dropout(x, bias, "gelu"), naive(x, bias, "gelu"), 1e-6)


def test_dropout_statistics_and_gradient_uses_same_mask():
    p = 0.3
    x = torch.randn(400, 250, requires_grad=True)
    bias = torch.zeros(250)
    out = bias_activation_dropout(x, bias, "relu", p=p)
    relu = torch.relu(x.detach())
    kept = out != 0
    active = relu != 0
    drop_rate = 1 - kept[active].float().mean().item()
    assert abs(drop_rate - p) < 0.01, drop_rate
    torch.testing.assert_close(out[kept], relu[kept] / (1 - p))
    # expected value preserved
    assert abs(out.sum().item() / relu.sum().item() - 1) < 0.01
    out.backward(torch.ones_like(out))
    expected_grad = (kept & active).float() / (1 - p)
    torch.testing.assert_close(x.grad, expected_grad)


def test_dropout_reproducible_with_seed_and_varies_across_calls():
    x = torch.randn(32, 64)
    torch.manual_seed(1)
    a = bias_activation_dropout(x, None, "gelu", p=0.5)
    b = bias_activation_dropout(x, None, "gelu", p=0.5)
    torch.manual_seed(1)
    c = bias_activation_dropout(x, None, "gelu", p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_eval_mode_disables_dropout():
    x = torch.randn(8, 16)
    torch.testing.assert_close(bias_activation_dropout(x, None, "relu", p=0.9, training=False), torch.relu(x))


def test_half_precision_on_cpu_reference():
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    b = torch.randn(24, dtype=torch.bfloat16)
    out = bias_activation_dropout(x, b, "silu")
    assert out.dtype == torch.bfloat16
    assert_close_relative(out.float(), naive(x.float(), b.float(), "silu"), 1e-2)


@pytest.mark.parametrize("bad, error, name", [
    (dict(x=[1.0]), TypeError, "x"),
    (dict(x=torch.ones(4, dtype=torch.int64)), TypeError, "x"),
    (dict(bias=torch.ones(5)), ValueError, "bias"),
    (dict(bias=torch.ones(4, dtype=torch.float64)), TypeError, "bias"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(p=1.0), ValueError, "p"),
    (dict(p="0.1"), TypeError, "p"),
])
def test_bad_input_names_the_argument(bad, error, name):
    kwargs = dict(x=torch.ones(2, 4), bias=None, activation="gelu", p=0.1)
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        bias_activation_dropout(**kwargs)


def test_torch_compile_fullgraph_traces_through_op():
    x = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    fn = torch.compile(lambda a, c: bias_activation_dropout(a, c, "gelu_tanh"), fullgraph=True, backend="aot_eager")
    out = fn(x, b)
    assert_close_relative(out, naive(x, b, "gelu_tanh"), 1e-6)
    out.sum().backward()
    assert x.grad is not None and b.grad is not None


def test_opcheck():
    x = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpatch.bias_activation_dropout.default, (x, b, 0, 0.0))


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 64), (8192, 768), (37, 1001), (16, 8192), (3, 5, 3072)])
def test_cuda_kernel_error_within_rule(dtype, activation, shape):
    from fastpatch.ops._dispatch import kernel_for
    x32 = torch.randn(shape, device="cuda")
    b32 = torch.randn(shape[-1], device="cuda")
    assert kernel_for("bias_act_dropout_fwd", x32) is not None, "CUDA kernel not loaded"
    x, b = x32.to(dtype).requires_grad_(True), b32.to(dtype).requires_grad_(True)
    xr, br = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    xt, bt = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    out = bias_activation_dropout(x, b, activation)
    ref = naive(xr, br, activation)
    plain = naive(xt, bt, activation)
    assert_within_factor_of_torch(out, plain, ref, "forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, b), g)
    ref_grads = torch.autograd.grad(ref, (xr, br), g.double())
    plain_grads = torch.autograd.grad(plain, (xt, bt), g)
    for name, a, p_, r in zip(("grad x", "grad bias"), grads, plain_grads, ref_grads):
        assert_within_factor_of_torch(a, p_, r, name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_statistics_and_reproducibility(dtype):
    x = torch.randn(8192, 770, device="cuda", dtype=dtype).abs() + 0.5
    torch.manual_seed(3)
    a = bias_activation_dropout(x, None, "relu", p=0.1)
    torch.manual_seed(3)
    b = bias_activation_dropout(x, None, "relu", p=0.1)
    c = bias_activation_dropout(x, None, "relu", p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rate = (a == 0).float().mean().item()
    assert abs(rate - 0.1) < 0.005, rate


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_graph_capture():
    x = torch.randn(256, 768, device="cuda", dtype=torch.float16)
    b = torch.randn(768, device="cuda", dtype=torch.float16)
    fn = torch.compile(lambda a, c: bias_activation_dropout(a, c, "gelu"), fullgraph=True)
    torch.testing.assert_close(fn(x, b), bias_activation_dropout(x, b, "gelu"))
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bias_activation_dropout(static_x, b, "gelu", p=0.1)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bias_activation_dropout(static_x, b, "gelu", p=0.1)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out), "dropout masks must change between graph replays"
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    kept = out != 0
    expected = torch.nn.functional.gelu(static_x.float() + b.float()) / 0.9
    torch.testing.assert_close(out[kept].float(), expected[kept], rtol=2e-2, atol=2e-2)
