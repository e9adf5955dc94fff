"""Loss modules over the fused cross-entropy ops (fairseq's label-smoothing semantics)."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .. import ops
from ..ops._checks import check_choice

_REDUCTIONS = ("sum", "mean", "none")


def _check_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be a float in [0, 1), got {epsilon!r}")
    return float(epsilon)


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


class LabelSmoothedCrossEntropy(nn.Module):
    """fairseq's ``label_smoothed_nll_loss`` on logits: returns ``(loss, nll_loss)``.

    ``eps_i = epsilon / (V - 1)`` and ``loss = (1 - epsilon - eps_i) * nll + eps_i * smooth``
    per token; tokens whose target is ``ignore_index`` (fairseq's ``padding_idx``) count 0.
    The vocabulary is processed in chunks, so no fp32 copy of the log-probabilities is made.
    """

    def __init__(self, epsilon: float = 0.0, ignore_index: int = -100, reduction: str = "sum"):
        super().__init__()
        self.epsilon = _check_epsilon(epsilon)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, ignore_index={self.ignore_index}, reduction={self.reduction}"

    def forward(self, logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """``logits [..., V]``, ``target [...]`` -> ``(loss, nll_loss)``, fp32 (see the op)."""
        return ops.label_smoothed_cross_entropy(logits, target, epsilon=self.epsilon,
                                                ignore_index=self.ignore_index,
                                                reduction=self.reduction)


class LinearCrossEntropy(LabelSmoothedCrossEntropy):
    """The output projection and :class:`LabelSmoothedCrossEntropy` in one op: the ``[N, V]``
    logits are never held in memory (chunks of rows are projected, reduced and discarded).

    The projection weight is passed to ``forward`` (it usually is the tied embedding table, owned
    elsewhere), so the module holds no parameters.
    """

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``hidden [..., H]``, ``weight [V, H]``, ``target [...]``, ``bias [V]`` ->
        ``(loss, nll_loss)`` of ``hidden @ weight.T + bias``."""
        return ops.fused_linear_cross_entropy(hidden, weight, target, bias=bias,
                                              epsilon=self.epsilon,
                                              ignore_index=self.ignore_index,
                                              reduction=self.reduction)
