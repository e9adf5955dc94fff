"""FusedAdam: Adam / AdamW whose step is a multi-tensor kernel, optionally with fp32 master weights."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ..ops.adam import multi_tensor_adam_group_

_HALF = (torch.float16, torch.bfloat16)
# float state tensors FusedAdam keeps per param; master_param only for fp16/bf16 params
_FLOAT_STATE = ("exp_avg", "exp_avg_sq", "master_param")
# group flags with their values for groups that predate them
_GROUP_FLAGS = {"adam_w_mode": True, "maximize": False, "master_weights": False}


class FusedAdam(torch.optim.Optimizer):
    """Adam (``adam_w_mode=False``) or AdamW (``adam_w_mode=True``) with a fused CUDA step.

    The update is exactly ``torch.optim.AdamW`` / ``torch.optim.Adam`` (``amsgrad=False``): each
    step calls :func:`fastpatch.ops.multi_tensor_adam_` once per parameter group (and per
    device/dtype inside it), which launches one kernel per ~76 tensors on CUDA and runs the PyTorch
    reference on the CPU.

    Args:
        params: parameters or dicts defining parameter groups.
        lr: learning rate, read from the group at every step (so LR schedulers work).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled decay (AdamW) or L2 penalty (Adam), per ``adam_w_mode``.
        adam_w_mode: AdamW's decoupled weight decay (default) instead of Adam's L2 penalty.
        maximize: maximize the objective instead of minimizing it.
        master_weights: keep an fp32 copy of every fp16/bf16 parameter in the state
            (``state["master_param"]``, saved by ``state_dict()``); the update is applied to it and
            the parameter receives the rounded value, and the moments are fp32. Without it, the
            moments of a half-precision parameter have its dtype (as in ``torch.optim``), while the
            arithmetic is still fp32. Edit a parameter in place after the first step and its master
            copy, not the parameter, is what the next step continues from.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and, with master weights,
    ``master_param``. ``load_state_dict`` accepts ``torch.optim.Adam``/``AdamW`` state too.

    Not supported: ``amsgrad``; sparse gradients (ValueError). ``step()`` is not CUDA-graph
    capturable: ``lr``, ``step`` and the bias corrections are host numbers baked into each launch,
    so a captured step would replay the first step's values (the op itself captures fine with
    fixed arguments).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, adam_w_mode: bool = True,
                 maximize: bool = False, master_weights: bool = False):
        _check_nonnegative("lr", lr)
        _check_nonnegative("eps", eps)
        _check_nonnegative("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be a number in [0, 1), got {beta!r}")
        for name, flag in (("adam_w_mode", adam_w_mode), ("maximize", maximize),
                           ("master_weights", master_weights)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode, maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Also runs inside load_state_dict: groups saved by torch.optim.Adam/AdamW (or an older
        # FusedAdam) lack some keys; those take this optimizer's constructor values, except that
        # torch's decoupled_weight_decay says whether the checkpoint was Adam or AdamW.
        super().__setstate__(state)
        for group in self.param_groups:
            if "adam_w_mode" not in group and "decoupled_weight_decay" in group:
                group["adam_w_mode"] = bool(group["decoupled_weight_decay"])
            for key, fallback in _GROUP_FLAGS.items():
                group.setdefault(key, self.defaults.get(key, fallback))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: Dict[str, Any]) -> None:
        # One kernel call per (step count, device, dtypes, with/without master weights): params
        # that missed steps for lack of a gradient lag behind in step count; normally that is a
        # single call. The lists are consistent by construction (autograd keeps p.grad's shape
        # and device those of p; the state is made like p), so they skip the public op's
        # per-tensor validation, which would cost as much host time as the kernel takes.
        calls: Dict[tuple, List[List[Tensor]]] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise ValueError(f"FusedAdam does not support sparse gradients (got {grad.layout} "
                                 "for a parameter); use torch.optim.SparseAdam")
            state = self.state[p]
            if not state:
                self._init_state(p, state, group["master_weights"])
            state["step"] += 1
            master = state.get("master_param")
            key = (state["step"], p.device, p.dtype, grad.dtype, master is not None)
            lists = calls.get(key)
            if lists is None:
                lists = calls[key] = [[], [], [], [], []]
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(state["exp_avg"])
            lists[3].append(state["exp_avg_sq"])
            if master is not None:
                lists[4].append(master)
        beta1, beta2 = group["betas"]
        for (step, *_), lists in calls.items():
            multi_tensor_adam_group_(*lists, group["lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], step, group["adam_w_mode"],
                                     group["maximize"])

    @staticmethod
    def _init_state(p: Tensor, state: Dict[str, Any], master_weights: bool) -> None:
        state["step"] = 0
        with_master = master_weights and p.dtype in _HALF
        state_dtype = torch.float32 if with_master else p.dtype
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        if with_master:
            state["master_param"] = p.detach().to(torch.float32, copy=True)

    @staticmethod
    def _normalize_state(p: Tensor, state: Dict[str, Any], master_weights: bool) -> None:
        """Brings loaded state (ours, or torch.optim.Adam/AdamW's) to what ``step`` expects."""
        if isinstance(state.get("step"), Tensor):
            state["step"] = int(state["step"].item())
        with_master = master_weights and p.dtype in _HALF
        if with_master:
            if "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
        else:
            state.pop("master_param", None)
        state_dtype = torch.float32 if with_master else p.dtype
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].to(state_dtype)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but fp32 moments and master weights of
        fp16/bf16 params stay fp32 (the base class casts floating state to the param's dtype)."""
        for i, saved_group in enumerate(state_dict["param_groups"]):
            if saved_group.get("amsgrad", False):
                raise ValueError(f"param_groups[{i}] of the state dict uses amsgrad, which FusedAdam "
                                 "does not implement")
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for saved_id, p in zip(saved_group["params"], group["params"]):
                saved = saved_state.get(saved_id)
                if saved is None:
                    continue
                state = self.state[p]
                for key in _FLOAT_STATE:
                    if key in saved:
                        state[key] = saved[key].to(device=p.device)
                self._normalize_state(p, state, group["master_weights"])


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
