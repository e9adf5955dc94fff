"""Captured beam-search steps (``fastpatch.inference.captured_search``) against the eager loop.

On the CPU no graph can be captured, so ``CapturedCall`` is replaced by a stand-in that runs
the function as the real one does: its warm-up runs at construction (they reorder and write
the cache, which the captured step must undo), then once per call. That checks everything but
the capture itself: the device-side step number and limit, the reorder of every slot, graph
reuse across calls with other lengths and batches. ``test_cuda.py`` runs the real graphs.
"""
import pytest
import torch

pytest.importorskip("transformers")

import fastpatch.inference as fi  # noqa: E402
from fastpatch.inference import captured_search, session  # noqa: E402
from inference_models import EOS, bart, gpt2, left_padded, make_eos_likely, right_padded  # noqa: E402


class EagerCall:
    """``graphs.CapturedCall``'s contract without a GPU: warm-ups now, then ``fn()`` per call."""

    runs = 0

    def __init__(self, fn, device, warmup=2):
        for _ in range(warmup):
            fn()
        self.fn = fn
        self.output = fn()  # the capture: shapes and output buffers (its effects are undone below)

    def __call__(self):
        EagerCall.runs += 1
        return self.fn()


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(session, "CapturedCall", EagerCall)
    monkeypatch.setattr(captured_search, "CapturedCall", EagerCall)
    EagerCall.runs = 0

    def graphed(engine):
        engine.engine.use_cuda_graph = True
        return engine
    return graphed


def _searches(engine):
    return sum(len(g._searches) for g in engine.engine.graphs._graphs.values())


# one engine over many calls: graphs are kept per shape and reused with other step limits
CALLS = [
    (3, 8, dict(max_new_tokens=14, num_return_sequences=2)),
    (3, 8, dict(max_new_tokens=9)),  # the same graph, another limit
    (1, 5, dict(max_new_tokens=14, min_new_tokens=6, forced_eos_token_id=(EOS,))),
    (2, 11, dict(max_new_tokens=20, length_penalty=0.0, early_stopping=True)),
    (2, 11, dict(max_new_tokens=12, length_penalty=2.0, early_stopping="never", num_return_sequences=4)),
    (3, 8, dict(max_new_tokens=2)),
]


def test_transformer_captured_beam_steps_equal_the_eager_loop(graphs_on_cpu):
    model = bart(init_std=0.3, eos_bias=8.0)
    captured = graphs_on_cpu(fi.Transformer.from_hf(model))
    eager = fi.Transformer.from_hf(model)
    for call, (batch, length, kwargs) in enumerate(CALLS):
        src, mask = right_padded(97, batch=batch, length=length, seed=call)
        a = captured.generate(src, mask, num_beams=4, **kwargs)
        b = eager.generate(src, mask, num_beams=4, **kwargs)
        assert torch.equal(a.tokens, b.tokens), (call, kwargs)
        assert torch.equal(a.scores, b.scores), (call, kwargs)
        assert torch.equal(a.beam_indices, b.beam_indices), (call, kwargs)
    assert EagerCall.runs > 0 and _searches(captured) >= 4


def test_transformer_captured_beam_steps_equal_hf(graphs_on_cpu):
    model = bart(init_std=0.3, eos_bias=8.0)
    engine = graphs_on_cpu(fi.Transformer.from_hf(model))
    src, mask = right_padded(97, batch=3, length=8, seed=1)
    hf = model.generate(src, attention_mask=mask, max_new_tokens=14, num_beams=4, num_return_sequences=2,
                        output_scores=True, return_dict_in_generate=True)
    out = engine.generate(src, mask, max_new_tokens=14, num_beams=4, num_return_sequences=2)
    assert _searches(engine) == 1
    assert torch.equal(out.tokens, hf.sequences[:, 1:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_gpt_captured_beam_steps_equal_hf_with_left_padding(graphs_on_cpu):
    model = make_eos_likely(gpt2())
    engine = graphs_on_cpu(fi.Gpt.from_hf(model))
    for call, (batch, length, new) in enumerate([(4, 7, 12), (2, 5, 20), (4, 9, 6)]):
        ids, mask = left_padded(101, batch=batch, length=length, seed=call)
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=3, pad_token_id=EOS,
                            num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
        out = engine.generate(ids, mask, max_new_tokens=new, num_beams=3, num_return_sequences=2,
                              pad_token_id=EOS)
        assert torch.equal(out.tokens, hf.sequences[:, length:]), call
        torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)
    assert EagerCall.runs > 0


def test_eager_loop_where_capture_does_not_apply(graphs_on_cpu, monkeypatch):
    model = bart(init_std=0.3, eos_bias=8.0)
    engine = graphs_on_cpu(fi.Transformer.from_hf(model))
    src, mask = right_padded(97, batch=3, length=8, seed=1)
    engine.generate(src, mask, max_new_tokens=10, num_beams=4, output_scores=True)  # per-step scores
    engine.generate(src, mask, max_new_tokens=10, num_beams=4, do_sample=True, seed=0)
    engine.generate(src, mask, max_new_tokens=1, num_beams=4)
    monkeypatch.setattr(captured_search, "MAX_ROWS", 8)  # 12 rows -> bucket 16
    engine.generate(src, mask, max_new_tokens=10, num_beams=4)
    assert _searches(engine) == 0
