"""``ls_adam``: fairseq's ``adam`` options on :class:`fastpatch.optim.FusedAdam`.

fairseq's ``adam`` runs apex's FusedAdam when apex is installed and otherwise a Python loop with
about ten kernels per parameter tensor; ``ls_adam`` updates all tensors of a group in one
multi-tensor kernel launch (the PyTorch reference on the CPU).

Semantics: decoupled weight decay, as fairseq's ``adam`` ("AdamW" in its docstring), and the
update of ``torch.optim.AdamW``, i.e. ``eps`` is added after the bias correction of the second
moment, as in apex's FusedAdam. fairseq's Python fallback adds ``eps`` before it, so its
denominator differs by ``eps * (1 - sqrt(1 - beta2^t))``: a relative difference below
``eps / sqrt(v)`` in each update, invisible in training curves (1e-8 against gradients of
1e-3..1e-6).

Options: every option of ``adam`` (``--adam-betas``, ``--adam-eps``, ``--weight-decay``, ``--lr``,
``--use-old-adam`` which selects fairseq's Python Adam, ``--fp16-adam-stats`` which is refused:
the moments are kept in fp32).

fp16/bf16: with ``--fp16``/``--bf16`` fairseq hands the optimizer fp32 (flat) master parameters;
with ``--memory-efficient-fp16``/``bf16`` it hands the half-precision parameters, and ``ls_adam``
then keeps fp32 moments and an fp32 master copy of each (fairseq's Adam keeps fp32 moments and
re-derives fp32 weights from the half-precision ones at every step).
"""
from __future__ import annotations

import logging

from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import Adam, FairseqAdam, FairseqAdamConfig

from fastpatch.optim import FusedAdam

logger = logging.getLogger("fastpatch.fairseq")


@register_optimizer("ls_adam", dataclass=FairseqAdamConfig)
class LSAdam(FairseqAdam):
    """fairseq's ``adam`` with a fused multi-tensor step (``optimizer_config`` and BMUF's
    ``average_params`` are ``adam``'s)."""

    def __init__(self, cfg: FairseqAdamConfig, params):
        FairseqOptimizer.__init__(self, cfg)
        if getattr(cfg, "tpu", False):
            raise NotImplementedError("--optimizer ls_adam runs on GPUs and CPUs, not on TPUs; "
                                      "use --optimizer adam")
        if cfg.fp16_adam_stats:
            raise NotImplementedError("--fp16-adam-stats is not supported by --optimizer ls_adam "
                                      "(its moments are fp32)")
        if getattr(cfg, "use_old_adam", False):
            logger.info("ls_adam: --use-old-adam given, using fairseq.optim.adam.Adam")
            self._optimizer = Adam(params, **self.optimizer_config)
        else:
            self._optimizer = FusedAdam(params, adam_w_mode=True, master_weights=True,
                                        **self.optimizer_config)

    @property
    def supports_memory_efficient_fp16(self):
        return True

    @property
    def supports_flat_params(self):
        return True
