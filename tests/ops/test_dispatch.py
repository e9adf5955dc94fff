"""FusedOp: which path a call takes. Eager calls on plain tensors and nn.Parameters skip the
dispatcher; compile, dispatch modes and tensor subclasses get the custom op."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpatch.ops import bias_activation_dropout


def _grad_fn_name(out):
    return type(out.grad_fn).__name__


def test_eager_call_with_parameters_takes_the_eager_function():
    x = torch.randn(3, 8, requires_grad=True)
    bias = torch.nn.Parameter(torch.randn(8))
    out = bias_activation_dropout(x, bias, "gelu")
    assert "eager" in _grad_fn_name(out), _grad_fn_name(out)


def test_dispatch_mode_goes_through_the_custom_op():
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 8)
    with Recorder():
        bias_activation_dropout(x, None, "relu")
    assert any("fastpatch.bias_activation_dropout" in name for name in seen), seen


def test_both_paths_compute_the_same_values_and_gradients():
    x = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    eager = bias_activation_dropout(x, b, "silu")
    compiled = torch.compile(lambda a, c: bias_activation_dropout(a, c, "silu"), backend="aot_eager",
                             fullgraph=True)(x, b)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    g = torch.randn_like(eager)
    ga = torch.autograd.grad(eager, (x, b), g)
    gb = torch.autograd.grad(compiled, (x, b), g)
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_prepare_dispatch_pays_the_first_custom_op_import_up_front():
    # torch imports torch._dynamo inside the first custom-op call of a process (~1.4 s); after
    # prepare_dispatch a fresh process has it already, so a first batch no longer pays it
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from fastpatch.ops._dispatch import prepare_dispatch\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "prepare_dispatch(torch.device('cpu'))\n"
            "print(before, 'torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "True"]
