"""Language-model losses of Hugging Face heads through the fused cross-entropy.

Eager transformers computes an LM loss with ``F.cross_entropy`` on the ``[N, V]`` logits
(``ForCausalLMLoss`` first copies them to fp32): log-softmax and its gradient materialised
over the vocabulary. Here the same loss runs as ``fastpatch.ops`` cross-entropy (one online
softmax pass, per-row fp32 statistics), with transformers 5's semantics kept exactly:

* ``ForCausalLMLoss`` (GPT-2 and the ``*ForCausalLM`` / ``BertLMHeadModel`` heads, which call
  ``self.loss_function``): labels shifted left with ``ignore_index`` padding (or ``shift_labels``
  as given), ``ignore_index`` (-100) rows skipped, fp32 loss; ``num_items_in_batch`` given ->
  sum / ``num_items_in_batch``, else mean over the non-ignored tokens. Installed through
  transformers' own ``model.loss_function = ...`` setter: no class swap, so it composes with
  ``generate()`` routing (``fastpatch.inference.enable_generate``).
* Masked LM heads (``BertForMaskedLM``, ``RobertaForMaskedLM``, ...) and ``BertForPreTraining``
  build ``CrossEntropyLoss()`` inline in ``forward``: mean over non-ignored tokens, loss in the
  logits' dtype (fp32 under autocast). Their root class is swapped (name kept, as transformers
  saves ``type(model).__name__``) for one whose ``forward`` runs the original without labels
  and adds the fused loss; its signature is the original's, which Trainer inspects.

The logits are still computed: every head returns them, so the fused linear + cross-entropy
(which never forms them) cannot be used without changing what the model returns.
Trainer's ``label_smoother`` (``label_smoothing_factor``) calls the model without labels and
is left as it is.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastpatch.adapters import fused_subclass, is_accelerated
from fastpatch.ops import label_smoothed_cross_entropy

# heads that call ``self.loss_function(logits, labels, vocab_size, **kwargs)``
LOSS_FUNCTION_HEADS = ("GPT2LMHeadModel", "BertLMHeadModel", "RobertaForCausalLM",
                       "XLMRobertaForCausalLM", "CamembertForCausalLM", "Data2VecTextForCausalLM",
                       "ElectraForCausalLM")


@dataclasses.dataclass(frozen=True)
class InlineLossHead:
    """A head that computes its loss inline: which arguments trigger it, where the logits are."""

    label_args: Tuple[str, ...]
    logits_field: str


_MASKED_LM = InlineLossHead(("labels",), "logits")
INLINE_LOSS_HEADS = {
    "BertForMaskedLM": _MASKED_LM, "RobertaForMaskedLM": _MASKED_LM,
    "XLMRobertaForMaskedLM": _MASKED_LM, "CamembertForMaskedLM": _MASKED_LM,
    "Data2VecTextForMaskedLM": _MASKED_LM, "ElectraForMaskedLM": _MASKED_LM,
    "BertForPreTraining": InlineLossHead(("labels", "next_sentence_label"), "prediction_logits"),
}


# ---------------------------------------------------------------------------- the losses
def _cross_entropy_fp32(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Cross-entropy of ``logits [N, V]`` against ``target [N]`` in fp32 ("sum" or "mean" over
    the rows whose target is not ``ignore_index``), with no fp32 copy of the logits."""
    loss, _ = label_smoothed_cross_entropy(logits, target, 0.0, ignore_index, reduction)
    return loss


def fused_causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                         num_items_in_batch: Optional[Tensor] = None, ignore_index: int = -100,
                         shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ``ForCausalLMLoss`` with the fused cross-entropy (same signature).

    ``logits`` ``[B, L, V]``, ``labels`` ``[B, L]`` (token ``t`` predicts label ``t + 1``; the
    last position is ignored) or ``shift_labels`` ``[B, L]`` already aligned. Returns an fp32
    scalar: the sum over non-ignored tokens divided by ``num_items_in_batch`` when given (an int
    or a tensor, as Trainer passes for gradient accumulation), else their mean.
    """
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return _cross_entropy_fp32(logits, shift_labels, ignore_index, "mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return _cross_entropy_fp32(logits, shift_labels, ignore_index, "sum") / num_items_in_batch


fused_causal_lm_loss._fastpatch_fused_loss = True  # what unfuse_lm_loss removes


def fused_masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """``CrossEntropyLoss()(logits.view(-1, vocab_size), labels.view(-1))`` as the masked-LM heads
    compute it: mean over labels != -100, in the logits' dtype, fp32 under autocast (where
    ``cross_entropy`` is an fp32 op)."""
    logits = logits.view(-1, vocab_size)
    loss = _cross_entropy_fp32(logits, labels.to(logits.device).view(-1), -100, "mean")
    return loss if torch.is_autocast_enabled(logits.device.type) else loss.to(logits.dtype)


# ------------------------------------------------------------------- inline-loss heads
def _inline_forward(original: type, head: InlineLossHead):
    """``forward`` for ``original`` that computes ``head``'s loss with the fused cross-entropy.

    When any of the label arguments is missing the original forward runs unchanged (it would
    compute no loss); otherwise it runs without them and the loss is added to its output.
    """
    hf_forward = original.forward
    params = list(inspect.signature(hf_forward).parameters)
    positions = {name: params.index(name) - 1 for name in head.label_args}  # -1: self

    @functools.wraps(hf_forward)
    def forward(self, *args, **kwargs):
        labels = {name: args[pos] if pos < len(args) else kwargs.get(name)
                  for name, pos in positions.items()}
        if any(value is None for value in labels.values()):
            return hf_forward(self, *args, **kwargs)
        args = [None if i in positions.values() else a for i, a in enumerate(args)]
        for name in labels:
            kwargs.pop(name, None)
        # can_return_tuple's rule, applied after the loss is in the output
        return_dict = self.config.return_dict
        passed = kwargs.pop("return_dict", return_dict)
        if passed is not None:
            return_dict = passed
        out = hf_forward(self, *args, return_dict=True, **kwargs)
        loss = fused_masked_lm_loss(out[head.logits_field], labels["labels"], self.config.vocab_size)
        if "next_sentence_label" in labels:  # BertForPreTraining: masked LM + next sentence
            loss = loss + nn.functional.cross_entropy(out.seq_relationship_logits.view(-1, 2),
                                                      labels["next_sentence_label"].view(-1))
        out = type(out)(**{**out, "loss": loss})
        return out if return_dict else out.to_tuple()

    return forward


class FusedLossHead:
    """Root mixin of an inline-loss head; its ``forward`` is set per original class."""


@functools.lru_cache(maxsize=None)
def _inline_mixin(original: type) -> type:
    head = INLINE_LOSS_HEADS[original.__name__]
    return type(f"FusedLoss{original.__name__}", (FusedLossHead,),
                {"forward": _inline_forward(original, head), "__module__": __name__,
                 "_fastpatch_rebuild": (_inline_mixin, (original,))})


# ------------------------------------------------------------------------ enable/disable
def _hf_causal_loss(model: nn.Module) -> Optional[str]:
    """Why ``model``'s ``loss_function`` is not transformers' ``ForCausalLMLoss``, or None."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    current = vars(model).get("_loss_function")
    if current is not None:
        return None if current is fused_causal_lm_loss else "a custom loss_function is set"
    if type(model).loss_function is not PreTrainedModel.loss_function:
        return f"{type(model).__name__} overrides loss_function"
    loss_type = getattr(model, "loss_type", None)
    # PreTrainedModel.loss_function's resolution (an unknown loss_type means ForCausalLM)
    resolved = LOSS_MAPPING[loss_type] if loss_type in LOSS_MAPPING else ForCausalLMLoss
    if resolved is not ForCausalLMLoss:
        return f"loss_type={loss_type!r} is not ForCausalLM"
    return None


def fuse_lm_loss(model: nn.Module) -> Optional[str]:
    """Route ``model``'s LM loss through the fused cross-entropy (in place); returns the report
    note, or None for a model without an LM loss fastpatch handles."""
    name = type(model).__name__
    if name in LOSS_FUNCTION_HEADS:
        reason = _hf_causal_loss(model)
        if reason is not None:
            return f"loss: {name} keeps Hugging Face's loss ({reason})"
        model.loss_function = fused_causal_lm_loss
        return (f"loss: {name}'s causal-LM loss runs fastpatch's fused cross-entropy "
                "(label shift, ignore_index=-100, num_items_in_batch)")
    if name in INLINE_LOSS_HEADS:
        if not is_accelerated(model):
            model.__class__ = fused_subclass(_inline_mixin(type(model)), type(model), keep_name=True)
        elif not isinstance(model, FusedLossHead):
            return None
        return (f"loss: {name}'s masked-LM loss runs fastpatch's fused cross-entropy "
                "(ignore_index=-100, mean)")
    return None


def unfuse_lm_loss(model: nn.Module) -> None:
    """Undo :func:`fuse_lm_loss`'s ``loss_function`` (the class swap is undone by ``revert``)."""
    if getattr(vars(model).get("_loss_function"), "_fastpatch_fused_loss", False):
        del model._loss_function
