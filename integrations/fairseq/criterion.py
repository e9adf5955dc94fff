"""``ls_label_smoothed_cross_entropy``: fairseq's ``label_smoothed_cross_entropy`` on the fused
loss kernel.

Same options (``--label-smoothing``, ``--report-accuracy``, ``--ignore-prefix-size``,
``--sentence-avg``), same formula (``eps_i = eps / (V - 1)``) and the same logged ``loss`` /
``nll_loss`` / ``ppl`` / ``accuracy``. The difference is how the loss is computed: from the logits
in one pass (fp32 statistics) instead of materialising fp32 log-probabilities and gathering from
them, and with a backward that writes the logits' gradient directly.

Models whose output is not plain logits (adaptive softmax, a custom ``get_normalized_probs`` or
``get_targets``) are computed by the parent class, exactly as fairseq does.
"""
from __future__ import annotations

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion, LabelSmoothedCrossEntropyCriterionConfig)
from fairseq.models import BaseFairseqModel, FairseqDecoder
from fairseq.models.transformer import TransformerModelBase

from fastpatch import ops

# get_normalized_probs implementations that are "log_softmax(net_output[0]) in fp32" (the
# transformer re-declares the base one for TorchScript)
_PLAIN_NORMALIZERS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)


def _plain_logits(model) -> bool:
    """True when ``get_normalized_probs`` is fairseq's log-softmax of ``net_output[0]`` and the
    targets are ``sample["target"]`` (``model`` may be fairseq's DDP proxy: it forwards attributes)."""
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, FairseqDecoder) or getattr(decoder, "adaptive_softmax", None) is not None:
        return False
    return (getattr(model.get_normalized_probs, "__func__", None) in _PLAIN_NORMALIZERS
            and getattr(model.get_normalized_probs_scriptable, "__func__", None)
            is BaseFairseqModel.get_normalized_probs_scriptable
            and getattr(model.get_targets, "__func__", None) is BaseFairseqModel.get_targets
            and getattr(decoder.get_normalized_probs_scriptable, "__func__", None)
            is FairseqDecoder.get_normalized_probs_scriptable)


@register_criterion("ls_label_smoothed_cross_entropy",
                    dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class LSLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` with :func:`fastpatch.ops.label_smoothed_cross_entropy`."""

    def compute_loss(self, model, net_output, sample, reduce=True):
        """``(loss, nll_loss)``: fp32 sums, or ``[N, 1]`` per-token values with ``reduce=False``
        (padding rows 0), as the parent returns them."""
        if not _plain_logits(model):
            return super().compute_loss(model, net_output, sample, reduce=reduce)
        logits, target = net_output[0], sample["target"]
        if self.ignore_prefix_size > 0:
            logits = logits[:, self.ignore_prefix_size:, :]
            target = target[:, self.ignore_prefix_size:]
        loss, nll_loss = ops.label_smoothed_cross_entropy(
            logits, target, self.eps, ignore_index=self.padding_idx,
            reduction="sum" if reduce else "none")
        if not reduce:
            loss, nll_loss = loss.reshape(-1, 1), nll_loss.reshape(-1, 1)
        return loss, nll_loss
