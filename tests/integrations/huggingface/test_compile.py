"""torch.compile over accelerated Hugging Face models on the CPU (``aot_eager``: dynamo and
AOTAutograd trace the fused layers exactly as inductor would receive them; the cuda tests
compile with inductor). Logits and gradients equal the uncompiled accelerated model's."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from model_cases import CASES, IDS  # noqa: E402
from numerics import assert_close_relative  # noqa: E402


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_compiled_accelerated_model_matches_eager(build):
    torch.manual_seed(0)
    base, inputs = build()
    eager = fastpatch.accelerate(copy.deepcopy(base).train())
    compiled_model = fastpatch.accelerate(copy.deepcopy(base).train())
    assert fastpatch.report(eager).fully_accelerated
    compiled = torch.compile(compiled_model, backend="aot_eager")
    weights = torch.randn_like(eager(**inputs).logits)

    def step(model, fn):
        model.zero_grad()
        logits = fn(**inputs).logits
        (logits * weights).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want_logits, want_grads = step(eager, eager)
    got_logits, got_grads = step(compiled_model, compiled)
    assert_close_relative(got_logits, want_logits, 1e-5, "compiled logits")
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert_close_relative(got_grads[name], grad, 1e-4, f"grad of {name}")


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_compiled_accelerated_model_in_eval_under_no_grad(build):
    """Inference reuses concatenated q/k/v weights between calls; a compiled graph must not."""
    torch.manual_seed(0)
    base, inputs = build()
    model = fastpatch.accelerate(copy.deepcopy(base).eval())
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        want = model(**inputs).logits
        got = compiled(**inputs).logits
        assert_close_relative(got, want, 1e-5, "compiled logits")
        for p in model.parameters():  # new weights: the compiled graph must read them
            p.mul_(1.01)
        assert_close_relative(compiled(**inputs).logits, model(**inputs).logits, 1e-5,
                              "compiled logits after a weight update")
