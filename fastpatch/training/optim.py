"""``LSAdam``: LightSeq's optimizer name and constructor over :class:`fastpatch.optim.FusedAdam`."""
from __future__ import annotations

from typing import Tuple

from ..optim import FusedAdam


class LSAdam(FusedAdam):
    """Adam with decoupled weight decay (as fairseq's ``adam`` optimizer) in one fused step.

    Takes LightSeq's constructor arguments. The variants LightSeq accepted but fastpatch does not
    implement are refused by name rather than ignored: ``bias_correction=False``,
    ``eps_inside_sqrt=True``, ``max_grad_norm > 0`` (clip with ``torch.nn.utils.clip_grad_norm_``)
    and ``amsgrad=True``. Weight decay is AdamW's ``p -= lr * weight_decay * p``; LightSeq's
    kernel scaled it by the bias-corrected step size instead.
    """

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0,
                 max_grad_norm: float = 0.0, amsgrad: bool = False):
        for name, value, supported in (("bias_correction", bias_correction, True),
                                       ("eps_inside_sqrt", eps_inside_sqrt, False),
                                       ("amsgrad", amsgrad, False)):
            if value is not supported:
                raise ValueError(f"{name}={value!r} is not supported by LSAdam (only "
                                 f"{name}={supported})")
        if max_grad_norm != 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is not supported by LSAdam; clip "
                             f"with torch.nn.utils.clip_grad_norm_ before step()")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         adam_w_mode=True)
