"""Pickling and copy.deepcopy of accelerated Hugging Face models: the copy
is the same accelerated model (fused layers, routed generate/forward, fused loss) with the
same outputs, and revert still gives the original classes back."""
import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from fastpatch.adapters import is_accelerated  # noqa: E402
from model_cases import CASES, IDS  # noqa: E402
from numerics import assert_close_relative  # noqa: E402


def _pickled_and_unpickled(model):
    # pickle itself: what multiprocessing and a whole-model torch.save use (such a file can only
    # be read back with weights_only=False, like any pickled module; checkpoints are state_dicts)
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("build", CASES, ids=IDS)
@pytest.mark.parametrize("copy_with", [_pickled_and_unpickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_copies_of_accelerated_models_stay_accelerated(build, copy_with):
    torch.manual_seed(0)
    base, inputs = build()
    model = fastpatch.accelerate(base.eval())
    with torch.no_grad():
        want = model(**inputs)
    twin = copy_with(model)
    assert [type(m).__name__ for m in twin.modules()] == [type(m).__name__ for m in model.modules()]
    assert [is_accelerated(m) for m in twin.modules()] == [is_accelerated(m) for m in model.modules()]
    assert any(is_accelerated(m) for m in twin.modules())
    with torch.no_grad():
        got = twin(**inputs)
    assert_close_relative(got.logits, want.logits, 1e-6, "logits")
    assert_close_relative(got.loss, want.loss, 1e-6, "loss")
    fastpatch.revert(twin)
    assert type(twin).__module__.startswith("transformers.")
    assert not any(is_accelerated(m) for m in twin.modules())
    with torch.no_grad():
        assert_close_relative(twin(**inputs).logits, want.logits, 1e-5, "logits after revert")
