"""One call at a time per engine: concurrent calls from threads give the sequential results, a
stream holds the engine until it is exhausted or closed, and re-entry from the holding thread
raises instead of deadlocking."""
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch.inference as fi  # noqa: E402
from fastpatch.inference.exclusive import EngineGuard  # noqa: E402
from concurrency import run_in_threads  # noqa: E402
from inference_models import bert, gpt2, left_padded  # noqa: E402


def test_concurrent_generate_calls_give_the_sequential_results():
    engine = fi.Gpt.from_hf(gpt2(), max_batch_size=4)
    prompts = [left_padded(101, batch=1 + i % 4, length=3 + i, seed=i) for i in range(8)]
    kwargs = [dict(), dict(num_beams=2), dict(do_sample=True, top_k=5, seed=3)]
    expected = [engine.sample(ids, mask, max_new_tokens=10, **kwargs[i % 3])
                for i, (ids, mask) in enumerate(prompts)]

    def work(i):
        for _ in range(3):
            ids, mask = prompts[i]
            assert torch.equal(engine.sample(ids, mask, max_new_tokens=10, **kwargs[i % 3]), expected[i]), i

    run_in_threads(work, len(prompts))


def test_concurrent_bert_infer_calls_give_the_sequential_results():
    # (on the CPU fi.Bert runs eagerly and shares no buffers between calls; the same test on
    # CUDA, where the graphs' static inputs are shared, is in test_cuda.py)
    engine = fi.Bert.from_hf(bert(), max_batch_size=4)
    batches = [left_padded(99, batch=1 + i % 4, length=4 + 3 * i, seed=i) for i in range(6)]
    expected = [engine.infer(ids, mask).last_hidden_state for ids, mask in batches]

    def work(i):
        for _ in range(3):
            ids, mask = batches[i]
            torch.testing.assert_close(engine.infer(ids, mask).last_hidden_state, expected[i],
                                       rtol=0, atol=0)

    run_in_threads(work, len(batches))


def test_generate_inside_an_unfinished_stream_of_the_same_thread_raises():
    engine = fi.Gpt.from_hf(gpt2())
    ids, mask = left_padded(101, batch=2, length=5, seed=0)
    expected = engine.sample(ids, mask, max_new_tokens=6)
    stream = engine.stream(ids, mask, max_new_tokens=6)
    first = next(stream)
    with pytest.raises(RuntimeError, match="unfinished stream"):
        engine.sample(ids, mask, max_new_tokens=6)
    # the stream itself is unharmed, and once exhausted the engine is free again
    assert torch.equal(torch.stack([first, *stream], dim=1), expected)
    assert torch.equal(engine.sample(ids, mask, max_new_tokens=6), expected)


def test_a_stream_makes_other_threads_wait_until_it_is_closed():
    engine = fi.Gpt.from_hf(gpt2())
    ids, mask = left_padded(101, batch=2, length=5, seed=1)
    expected = engine.sample(ids, mask, max_new_tokens=6)
    stream = engine.stream(ids, mask, max_new_tokens=6)
    next(stream)
    result = {}
    other = threading.Thread(target=lambda: result.update(tokens=engine.sample(ids, mask, max_new_tokens=6)))
    other.start()
    other.join(timeout=0.5)
    assert other.is_alive(), "the other thread's call ran while the stream held the engine"
    stream.close()
    other.join(timeout=60)
    assert not other.is_alive()
    assert torch.equal(result["tokens"], expected)


def test_guard_releases_after_an_error_inside():
    guard = EngineGuard("engine")
    with pytest.raises(ValueError):
        with guard.hold():
            raise ValueError("bad input")
    with guard.hold():  # neither held nor owned any more
        pass


def test_models_holding_a_guard_still_deepcopy_and_pickle():
    import copy
    import pickle

    engine = fi.Gpt.from_hf(gpt2())
    ids, mask = left_padded(101, batch=2, length=5, seed=2)
    expected = engine.sample(ids, mask, max_new_tokens=4)  # makes the guard
    twin = copy.deepcopy(engine)
    assert twin._engine_guard is not engine._engine_guard
    assert torch.equal(twin.sample(ids, mask, max_new_tokens=4), expected)
    guard = pickle.loads(pickle.dumps(engine._engine_guard))
    with guard.hold():
        pass
