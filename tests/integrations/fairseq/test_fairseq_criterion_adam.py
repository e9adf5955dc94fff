"""ls_label_smoothed_cross_entropy and ls_adam against fairseq's label_smoothed_cross_entropy and
adam: same options, same logged values, same updates."""
import argparse
import copy
import math

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq_helpers import DictTask, dictionary, padded_pair, transformer  # noqa: E402
from numerics import assert_close_relative  # noqa: E402

from fastpatch.integrations.fairseq import registry  # noqa: E402

registry.register()


def _criterion(name, task, **options):
    from fairseq import criterions

    cfg = argparse.Namespace(criterion=name, label_smoothing=0.1, report_accuracy=False,
                             ignore_prefix_size=0, sentence_avg=False)
    for key, value in options.items():
        setattr(cfg, key, value)
    return criterions.build_criterion(cfg, task)


def _sample(d, seed=0):
    src, lengths, prev, target = padded_pair(d, batch=5, seed=seed)
    return {"net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev},
            "target": target, "ntokens": int(target.ne(d.pad()).sum()), "id": torch.arange(5)}


OPTIONS = {
    "default": {},
    "no_smoothing": dict(label_smoothing=0.0),
    "accuracy_prefix_sentence_avg": dict(report_accuracy=True, ignore_prefix_size=2,
                                         sentence_avg=True),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_criterion_matches_fairseq(name):
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    d = dictionary()
    task = DictTask(d)
    model = transformer(d)
    reference = _criterion("label_smoothed_cross_entropy", task, **OPTIONS[name])
    fused = _criterion("ls_label_smoothed_cross_entropy", task, **OPTIONS[name])
    assert type(fused).__name__ == "LSLabelSmoothedCrossEntropyCriterion"
    sample = _sample(d)
    results = []
    for criterion, net in ((reference, model), (fused, copy.deepcopy(model))):
        loss, sample_size, log = criterion(net, sample)
        loss.backward()
        results.append((loss, sample_size, log, {n: p.grad for n, p in net.named_parameters()}))
    (loss_a, size_a, log_a, grads_a), (loss_b, size_b, log_b, grads_b) = results
    assert size_a == size_b and loss_b.dtype == loss_a.dtype == torch.float32
    assert log_a.keys() == log_b.keys()
    for key in log_a:
        a, b = log_a[key], log_b[key]
        if torch.is_tensor(a):
            assert_close_relative(b, a, 1e-6, key)
        else:
            assert a == b, key
    for key, grad in grads_a.items():
        # k_proj.bias: softmax is invariant to it, its gradient is 0 up to rounding noise
        if grad is not None and not key.endswith("k_proj.bias"):
            assert_close_relative(grads_b[key], grad, 1e-5, f"grad of {key}")
    # the aggregated metrics fairseq logs come from the same reduce_metrics
    assert type(fused).reduce_metrics.__func__ is LabelSmoothedCrossEntropyCriterion.reduce_metrics.__func__


def test_criterion_unreduced_shapes_and_fallback():
    d = dictionary()
    task = DictTask(d)
    model = transformer(d)
    reference = _criterion("label_smoothed_cross_entropy", task)
    fused = _criterion("ls_label_smoothed_cross_entropy", task)
    sample = _sample(d, seed=1)
    net_output = model(**sample["net_input"])
    for a, b in zip(reference.compute_loss(model, net_output, sample, reduce=False),
                    fused.compute_loss(model, net_output, sample, reduce=False)):
        assert b.shape == a.shape
        assert_close_relative(b, a, 1e-6, "unreduced loss")

    class Tempered(type(model)):
        """A model whose normalisation is not log_softmax(logits): the parent path must run."""

        def get_normalized_probs(self, net_output, log_probs, sample=None):
            return torch.log_softmax(net_output[0].float() / 2.0, dim=-1)

    model.__class__ = Tempered
    a = reference.compute_loss(model, net_output, sample)
    b = fused.compute_loss(model, net_output, sample)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _optimizer(name, params, **options):
    from fairseq import optim

    cfg = argparse.Namespace(optimizer=name, lr=[1e-3], adam_betas="(0.9, 0.98)", adam_eps=1e-8,
                             weight_decay=0.0, use_old_adam=False, fp16_adam_stats=False, tpu=False)
    for key, value in options.items():
        setattr(cfg, key, value)
    return optim.build_optimizer(cfg, params)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_ls_adam_matches_fairseq_adam(weight_decay):
    """Five steps on the same gradients: the same parameters up to eps placement (see
    integrations/fairseq/optimizer.py), far below 1e-6 relative here."""
    torch.manual_seed(0)
    params_a = [torch.randn(s, requires_grad=True) for s in ((7, 5), (5,), (33,))]
    params_b = [p.detach().clone().requires_grad_() for p in params_a]
    reference = _optimizer("adam", params_a, weight_decay=weight_decay)
    fused = _optimizer("ls_adam", params_b, weight_decay=weight_decay)
    assert type(fused._optimizer).__name__ == "FusedAdam"
    assert fused.optimizer_config == reference.optimizer_config
    for step in range(5):
        grads = [torch.randn_like(p) * (step + 1) for p in params_a]
        for p, q, g in zip(params_a, params_b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        reference.step()
        fused.step()
    for p, q in zip(params_a, params_b):
        assert_close_relative(q.detach(), p.detach(), 1e-6, "parameters after 5 steps")
    # fairseq's adam state (step, exp_avg, exp_avg_sq) loads into ls_adam and continues
    restored = _optimizer("ls_adam", params_b, weight_decay=weight_decay)
    restored.load_state_dict(reference.state_dict())
    state = restored._optimizer.state[params_b[0]]
    assert state["step"] == 5 and torch.equal(state["exp_avg"],
                                              reference._optimizer.state[params_a[0]]["exp_avg"])


def test_ls_adam_options():
    from fairseq.optim.adam import Adam

    params = [torch.zeros(3, requires_grad=True)]
    assert isinstance(_optimizer("ls_adam", params, use_old_adam=True)._optimizer, Adam)
    with pytest.raises(NotImplementedError, match="--fp16-adam-stats"):
        _optimizer("ls_adam", params, fp16_adam_stats=True)
    lr_schedule = _optimizer("ls_adam", params)
    lr_schedule.set_lr(0.5)
    assert lr_schedule.get_lr() == 0.5 and not math.isnan(lr_schedule.get_lr())
