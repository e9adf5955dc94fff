"""Choosing between a CUDA kernel and the PyTorch reference for one call."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtypes(tensors) -> bool:
    """Whether every floating tensor of ``tensors`` has a dtype the kernels take (not fp64)."""
    return not any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in tensors)


def kernel_for(name: str, *tensors: torch.Tensor | None):
    """The ``fastpatch_cuda::<name>`` op if every given tensor is a CUDA tensor the kernels take.

    Returns ``None`` (use the reference) for CPU tensors, fp64 (gradcheck), or when the
    extension is unavailable; the reason for the latter is in ``fastpatch env``.
    """
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return None
    if not kernel_dtypes(present):
        return None
    ops = _extension.cuda_ops()
    if ops is None:
        return None
    return getattr(ops, name, None)


def prepare_dispatch(device: torch.device) -> None:
    """Pay now the one-time costs of the first fused-op call of a process.

    The first call of any ``torch.library`` custom op imports ``torch._dynamo`` (about 1.4 s),
    and on CUDA the first kernel lookup loads (or JIT-builds) the extension. ``accelerate`` and
    the inference engines call this while the model is being prepared, so that the first
    forward or generated batch does not carry them (a server's first request, and
    ``fairseq-generate``'s timer, which excludes model loading but not the first batch).
    """
    import torch._dynamo  # noqa: F401

    if device.type == "cuda":
        _extension.cuda_ops()


# nn.Parameter is a Tensor subclass that needs no tracing; every other subclass (FakeTensor,
# FunctionalTensor, DTensor...) goes through the custom op.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def needs_custom_op(*args) -> bool:
    """Whether this call must go through the ``torch.library`` custom op.

    The custom op is what ``torch.compile``, ``torch.export``, fake tensors and dispatch modes
    understand (it carries the fake implementation). A plain eager call on plain tensors does
    not need it, and skipping the Python dispatcher there saves most of the host time a fused
    op costs (measured on an H200: the dispatcher path made BERT-base slower than eager).
    """
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return True
    if _get_current_dispatch_mode() is not None:
        return True
    return any(type(a) not in _PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


class FusedOp:
    """One fused op, reachable two ways over the same implementation.

    * ``torch.ops.fastpatch.<name>`` (and ``<name>_backward``): ``torch.library`` custom ops with
      fake implementations and an autograd formula, for compile / export / tracing.
    * A plain ``torch.autograd.Function`` for eager calls, which skips the Python dispatcher.

    ``backward_formula(ctx, backward, *grads)`` is written once and receives whichever backward
    to call (the backward custom op, or its implementation directly).

    Args:
        name: op name in the ``fastpatch`` namespace.
        forward: implementation (kernel or reference); its annotations define the schema.
        forward_fake: fake implementation of ``forward``.
        backward: implementation of the backward op; ``backward_fake`` its fake.
        setup_context: ``(ctx, inputs, output)`` as for ``register_autograd``.
        backward_formula: ``(ctx, backward, *grads) -> grads of the inputs``.
    """

    def __init__(self, name, forward, forward_fake, backward, backward_fake, setup_context,
                 backward_formula):
        self.op = torch.library.custom_op(f"fastpatch::{name}", mutates_args=())(forward)
        self.op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"fastpatch::{name}_backward", mutates_args=())(backward)
        self.backward_op.register_fake(backward_fake)
        backward_op = self.backward_op

        def autograd_formula(ctx, *grads):
            return backward_formula(ctx, backward_op, *grads)

        self.op.register_autograd(autograd_formula, setup_context=setup_context)

        # Old-style forward(ctx, ...): the new style (separate setup_context) re-binds default
        # arguments through inspect.signature on every call, which costs more than the kernel.
        def eager_forward(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        def eager_backward(ctx, *grads):
            return backward_formula(ctx, backward, *grads)

        # built with type() so autograd names its node "<name>_eagerBackward" in traces
        eager_function = type(f"{name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})
        self._eager = eager_function

    def __call__(self, *args):
        if needs_custom_op(*args):
            return self.op(*args)
        return self._eager.apply(*args)
