"""Multi-tensor Adam / AdamW: the optimizer update of many tensors in one kernel launch.

``torch.optim.AdamW(foreach=True)`` runs about a dozen ``_foreach_*`` kernels per step, each
reading and writing every parameter-sized list again; the fused kernel reads param, grad and the
two moments once and writes them once. Tensor addresses and sizes travel in the kernel's argument
block (apex / PyTorch ``multi_tensor_apply`` style), so one launch covers up to ~76 tensors.

The update is ``torch.optim.AdamW`` (``adamw=True``: decoupled weight decay) or
``torch.optim.Adam`` (``adamw=False``: L2 penalty added to the gradient), non-capturable flavour:
bias corrections come from the Python number ``step``. Arithmetic is fp32 for fp16/bf16 storage.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._checks import REFERENCE_DTYPES
from ._dispatch import kernel_for

_HALF = (torch.float16, torch.bfloat16)


def _reference(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
               exp_avg_sqs: List[Tensor], master_params: List[Tensor], lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, step: float, adamw: bool,
               maximize: bool) -> None:
    """torch.optim.Adam(W)'s single-tensor update, the same ops in the same order, so fp32 results
    match it to rounding. fp16/bf16 tensors are updated in fp32 copies and rounded once at the end,
    as the kernel does."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    masters = master_params if master_params else [None] * len(params)
    for param, grad, exp_avg, exp_avg_sq, master in zip(params, grads, exp_avgs, exp_avg_sqs, masters):
        weights = master if master is not None else param
        compute = torch.float32 if weights.dtype in _HALF else weights.dtype
        w, m, v = (t if t.dtype == compute else t.to(compute) for t in (weights, exp_avg, exp_avg_sq))
        g = grad.to(compute)
        if maximize:
            g = -g
        if weight_decay != 0:
            if adamw:
                w.mul_(1 - lr * weight_decay)
            else:
                g = g.add(w, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        for target, value in ((weights, w), (exp_avg, m), (exp_avg_sq, v)):
            if target is not value:
                target.copy_(value)
        if master is not None:
            param.copy_(master)


def _apply(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
           exp_avg_sqs: List[Tensor], master_params: List[Tensor], *hyper) -> None:
    """The update of one homogeneous group: the CUDA kernel where it can, else the reference.

    The kernel takes CUDA tensors of the kernel dtypes and hands back the indices whose tensors
    are not one flat range laid out alike (e.g. a transposed view); those go to the reference.
    """
    kernel = kernel_for("multi_tensor_adam", params[0], grads[0], exp_avgs[0],
                        master_params[0] if master_params else None)
    if kernel is None:
        _reference(params, grads, exp_avgs, exp_avg_sqs, master_params, *hyper)
        return
    skipped = kernel(params, grads, exp_avgs, exp_avg_sqs, master_params, *hyper)
    if skipped:
        lists = (params, grads, exp_avgs, exp_avg_sqs, master_params)
        _reference(*([t[i] for i in skipped] if t else [] for t in lists), *hyper)


@torch.library.custom_op("fastpatch::multi_tensor_adam_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params"))
def multi_tensor_adam_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                         exp_avg_sqs: List[Tensor], master_params: List[Tensor], lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
                         adamw: bool, maximize: bool) -> None:
    """In-place Adam(W) update of one group: all tensors on one device, one dtype per list.

    ``master_params`` is empty (the params hold the weights) or one fp32 tensor per param.
    """
    if params:
        _apply(params, grads, exp_avgs, exp_avg_sqs, master_params, lr, beta1, beta2, eps,
               weight_decay, step, adamw, maximize)


@multi_tensor_adam_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, master_params, lr, beta1, beta2, eps, weight_decay,
      step, adamw, maximize):
    return None


def _traced() -> bool:
    """Whether the call must go through the dispatcher: under torch.compile / export, or a
    Python dispatch or function mode (FakeTensorMode, FunctionalTensorMode, ...)."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled())


def multi_tensor_adam_group_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                             exp_avg_sqs: List[Tensor], master_params: List[Tensor], lr: float,
                             beta1: float, beta2: float, eps: float, weight_decay: float,
                             step: float, adamw: bool, maximize: bool) -> None:
    """The update of one group whose lists the caller built consistently: one device, one dtype
    per list, ``grads[i]``/moments/master shaped like ``params[i]``, dense grads (FusedAdam builds
    them so). Only the hyperparameters are checked here; the kernel re-checks devices, dtypes and
    sizes before launching, so a broken list raises instead of touching memory it should not.

    In eager mode this calls the implementation directly: going through the dispatcher costs
    about a microsecond per tensor argument (~0.3 ms for BERT-base's 200 params x 5 lists), a
    third of the kernel time. Traced calls use the custom op, so compile/export see one node.
    """
    hyper = _check_hyper(lr, beta1, beta2, eps, weight_decay, step, adamw, maximize)
    if not params:
        return
    with torch.no_grad():
        if _traced():
            multi_tensor_adam_op(params, grads, exp_avgs, exp_avg_sqs, master_params, *hyper)
        else:
            _apply(params, grads, exp_avgs, exp_avg_sqs, master_params, *hyper)


def _check_hyper(lr, beta1, beta2, eps, weight_decay, step, adamw, maximize) -> tuple:
    lr = _check_number("lr", lr, 0.0)
    beta1 = _check_number("beta1", beta1, 0.0, 1.0)
    beta2 = _check_number("beta2", beta2, 0.0, 1.0)
    eps = _check_number("eps", eps, 0.0)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0)
    step = _check_number("step", step, 0.0)
    if step == 0.0:
        raise ValueError("step must be > 0: it counts the update being made, starting at 1")
    return (lr, beta1, beta2, eps, weight_decay, step, _check_flag("adamw", adamw),
            _check_flag("maximize", maximize))


def _as_tensor_list(name: str, value) -> Sequence[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return value


def _check_number(name: str, value, low: float, high: Optional[float] = None,
                  high_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if not value >= low or too_high:
        upper = "" if high is None else f", {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be in [{low}{upper or ', inf)'}, got {value}")
    return float(value)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _explain_mismatch(i: int, param: Tensor, others) -> None:
    """Raises the error naming which tensor at index ``i`` disagrees with ``params[i]``."""
    for name, t in others:
        if t is None:
            continue
        if t.shape != param.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                             f"shape {tuple(param.shape)}")
        if t.device != param.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {param.device}")


def _check_group(i: int, key: tuple) -> None:
    """Dtype and layout rules, checked once per distinct group key (first seen at index ``i``)."""
    _, param_dtype, grad_dtype, grad_layout, state_dtype, sq_dtype, master_dtype = key
    for name, dtype in (("params", param_dtype), ("grads", grad_dtype), ("exp_avgs", state_dtype),
                        ("exp_avg_sqs", sq_dtype), ("master_params", master_dtype)):
        if dtype is not None and dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {dtype}; expected a floating dtype")
    if grad_layout != torch.strided:
        raise ValueError(f"grads[{i}] is {grad_layout}; sparse gradients are not supported "
                         "(use torch.optim.SparseAdam)")
    if sq_dtype != state_dtype:
        raise TypeError(f"exp_avg_sqs[{i}] has dtype {sq_dtype} but exp_avgs[{i}] has dtype "
                        f"{state_dtype}")
    if master_dtype is not None:
        if master_dtype != torch.float32:
            raise TypeError(f"master_params[{i}] must be float32, got {master_dtype}")
        if state_dtype != torch.float32:
            raise TypeError(f"exp_avgs[{i}] must be float32 with master weights, got {state_dtype}")
    elif state_dtype not in (torch.float32, param_dtype):
        raise TypeError(f"exp_avgs[{i}] has dtype {state_dtype}; expected float32 or "
                        f"params[{i}]'s dtype {param_dtype}")


def _group_indices(params, grads, exp_avgs, exp_avg_sqs, masters) -> dict:
    """Validates every index and groups the indices by (device, dtypes): one kernel call each.

    Runs every step over every parameter, so the per-tensor part is only the cheap shape and
    device comparisons; dtype rules are checked once per group.
    """
    groups: dict = {}
    for i in range(len(params)):
        param, grad, exp_avg, exp_avg_sq = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        master = None if masters is None else masters[i]
        shape, device = param.shape, param.device
        if not (grad.shape == shape and exp_avg.shape == shape and exp_avg_sq.shape == shape
                and grad.device == device and exp_avg.device == device
                and exp_avg_sq.device == device
                and (master is None or (master.shape == shape and master.device == device))):
            _explain_mismatch(i, param, (("grads", grad), ("exp_avgs", exp_avg),
                                         ("exp_avg_sqs", exp_avg_sq), ("master_params", master)))
        key = (device, param.dtype, grad.dtype, grad.layout, exp_avg.dtype, exp_avg_sq.dtype,
               None if master is None else master.dtype)
        indices = groups.get(key)
        if indices is None:
            _check_group(i, key)
            groups[key] = [i]
        else:
            indices.append(i)
    return groups


def multi_tensor_adam_(params: Sequence[Tensor], grads: Sequence[Tensor],
                       exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
                       adamw: bool = True, maximize: bool = False,
                       master_params: Optional[Sequence[Tensor]] = None) -> None:
    """Adam / AdamW update of many tensors in place, one kernel launch per ~76 tensors.

    Matches ``torch.optim.AdamW`` (``adamw=True``) or ``torch.optim.Adam`` (``adamw=False``) with
    ``amsgrad=False``, ``capturable=False``, for the state after ``step`` steps.

    Args:
        params: tensors of any shapes, fp32/fp16/bf16 (fp64 runs the reference path); updated.
        grads: ``grads[i]`` has ``params[i]``'s shape and device; any floating dtype, not sparse.
        exp_avgs, exp_avg_sqs: first and second moments, shaped like ``params[i]``; fp32 or the
            params' dtype (fp32 when ``master_params`` is given); updated.
        lr, beta1, beta2, eps, weight_decay: the usual Adam hyperparameters (Python numbers).
        step: the step count after incrementing (1 on the first update), used for the bias
            corrections; ``math.inf`` turns bias correction off (apex / LightSeq
            ``bias_correction=False``).
        adamw: decoupled weight decay (AdamW) instead of the L2 penalty (Adam).
        maximize: ascend instead of descend.
        master_params: optional fp32 master weights, one per param: the update is applied to
            them and ``params[i]`` receives the rounded result (fp16/bf16 training); updated.

    Tensors on different devices or with different dtypes are grouped and updated group by
    group; tensors the kernel cannot walk as one flat range (a transposed view, say) are updated
    by the PyTorch reference path.
    """
    params = _as_tensor_list("params", params)
    lists = {"grads": _as_tensor_list("grads", grads),
             "exp_avgs": _as_tensor_list("exp_avgs", exp_avgs),
             "exp_avg_sqs": _as_tensor_list("exp_avg_sqs", exp_avg_sqs)}
    if master_params is not None:
        lists["master_params"] = _as_tensor_list("master_params", master_params)
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    hyper = _check_hyper(lr, beta1, beta2, eps, weight_decay, step, adamw, maximize)
    masters = lists.get("master_params")
    groups = _group_indices(params, grads, exp_avgs, exp_avg_sqs, masters)
    if len(groups) == 1:  # the usual case, one device and one dtype: no regrouping
        multi_tensor_adam_group_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                 list(masters or ()), *hyper)
        return
    for index in groups.values():
        group = [[tensors[i] for i in index] for tensors in (params, grads, exp_avgs, exp_avg_sqs)]
        group_masters = [masters[i] for i in index] if masters is not None else []
        multi_tensor_adam_group_(*group, group_masters, *hyper)
