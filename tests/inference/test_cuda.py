"""fi.Gpt / fi.Bert on the GPU: graph-replayed decoding, half precision, memory stability."""
import copy
import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
import fastpatch.inference as fi  # noqa: E402
from fastpatch.adapters import FUSED_ATTR  # noqa: E402
from inference_models import PAD, bert, gpt2, left_padded, make_eos_likely  # noqa: E402
from numerics import assert_within_factor_of_torch  # noqa: E402

pytestmark = pytest.mark.cuda


def _cuda(model, dtype):
    return model.to("cuda", dtype)


def _batch(vocab, batch, length, seed):
    ids, mask = left_padded(vocab, batch=batch, length=length, seed=seed)
    return ids.cuda(), mask.cuda()


def test_decode_steps_are_graph_captured():
    engine = fi.Gpt.from_hf(_cuda(gpt2(), torch.float32))
    assert engine.engine.use_cuda_graph, "CUDA kernels missing: see `fastpatch env`"
    ids, mask = _batch(101, 3, 6, 0)
    engine.sample(ids, mask, max_new_tokens=5)
    assert len(engine.engine.graphs) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_greedy_tokens_identical_to_live_accelerated_model(dtype, tmp_path):
    model = fastpatch.accelerate(_cuda(gpt2(n_layer=4, n_embd=128, vocab_size=512), dtype))
    ids, mask = _batch(512, 4, 9, 1)
    live = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                          pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(fi.Gpt.from_hf(model).sample(ids, mask, max_new_tokens=24), live)
    path = fastpatch.export(model, str(tmp_path))
    assert torch.equal(fi.Gpt(path, device="cuda").sample(ids, mask, max_new_tokens=24), live)


def test_fp32_greedy_and_beam_identical_to_hf_on_cuda():
    model = _cuda(make_eos_likely(gpt2()), torch.float32)
    engine = fi.Gpt.from_hf(model)
    ids, mask = _batch(101, 4, 7, 2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                              pad_token_id=PAD)[:, 7:]
    assert torch.equal(engine.sample(ids, mask, max_new_tokens=20), expected)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, pad_token_id=5,
                        num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    out = engine.generate(ids, mask, max_new_tokens=12, num_beams=4, pad_token_id=5, num_return_sequences=2)
    assert torch.equal(out.tokens, hf.sequences[:, 7:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_graph_replay_matches_eager_steps_over_many_changing_calls():
    model = _cuda(make_eos_likely(gpt2(), delta=1.0), torch.float32)
    graphed = fi.Gpt.from_hf(model, max_batch_size=8)
    eager = fi.Gpt.from_hf(model, max_batch_size=8, use_cuda_graph=False)
    g = torch.Generator().manual_seed(0)
    for call in range(40):
        batch = int(torch.randint(1, 9, (1,), generator=g))
        length = int(torch.randint(1, 20, (1,), generator=g))
        new = int(torch.randint(1, 40, (1,), generator=g))
        ids, mask = _batch(101, batch, length, call)
        kwargs = [dict(), dict(num_beams=3, num_return_sequences=2),
                  dict(do_sample=True, top_k=10, seed=call)][call % 3]
        if kwargs.get("num_beams") and batch > 2:
            ids, mask = ids[:2], mask[:2]
        a = graphed.generate(ids, mask, max_new_tokens=new, **kwargs)
        b = eager.generate(ids, mask, max_new_tokens=new, **kwargs)
        assert torch.equal(a.tokens, b.tokens), (call, batch, length, new, kwargs)


def test_no_memory_growth_across_1000_calls():
    engine = fi.Gpt.from_hf(_cuda(gpt2(), torch.float16), max_batch_size=4)
    prompts = [_batch(101, 1 + i % 4, 3 + i % 11, i) for i in range(16)]
    for ids, mask in prompts:  # capture every bucket the loop will use
        engine.sample(ids, mask, max_new_tokens=8)
        engine.sample(ids, mask, max_new_tokens=8, num_beams=2)
    # garbage awaiting the cycle collector is not growth: count what is still referenced
    gc.collect()
    torch.cuda.synchronize()
    before, captures = torch.cuda.memory_allocated(), engine.engine.graphs.captures
    for i in range(1000):
        ids, mask = prompts[i % len(prompts)]
        engine.sample(ids, mask, max_new_tokens=8, **({"num_beams": 2} if i % 5 == 0 else {}))
    gc.collect()
    torch.cuda.synchronize()
    grew = torch.cuda.memory_allocated() - before
    # (failed once on an H100 at 7c1a342 and passed on the next call: the message says why)
    assert grew == 0, (f"allocated memory grew by {grew} bytes; graphs captured during the "
                       f"loop: {engine.engine.graphs.captures - captures}")


def test_streaming_on_cuda_yields_the_generated_tokens():
    engine = fi.Gpt.from_hf(_cuda(gpt2(), torch.float16))
    ids, mask = _batch(101, 2, 5, 3)
    full = engine.sample(ids, mask, max_new_tokens=12)
    assert torch.equal(torch.stack(list(engine.stream(ids, mask, max_new_tokens=12)), 1), full.cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 37), (8, 128)])
def test_bert_matches_hf_by_the_precision_rule(dtype, batch, length, tmp_path):
    model = bert(max_position_embeddings=128)
    reference = copy.deepcopy(model).double().cuda()
    ours = fi.Bert(fastpatch.export(_cuda(copy.deepcopy(model), dtype), str(tmp_path)), device="cuda")
    hf = _cuda(model, dtype)
    ids, mask = left_padded(99, batch=batch, length=length, seed=length)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask)
        same = hf(input_ids=ids, attention_mask=mask)
    for _ in range(2):  # the second call replays the captured graph
        out = ours.infer(ids, mask)
    m = mask[..., None]
    assert_within_factor_of_torch(out.last_hidden_state.double() * m, same.last_hidden_state.double() * m,
                                  ref.last_hidden_state * m, "last_hidden_state")
    assert_within_factor_of_torch(out.pooler_output.double(), same.pooler_output.double(),
                                  ref.pooler_output, "pooler_output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accelerated_bert_inference_forward_replays_graphs_within_the_rule(dtype):
    """accelerate() alone: no_grad forwards of the model replay the engine's graphs (right and
    left padding, changing shapes), within the precision rule of HF in the same dtype; a
    forward with autograd on still runs the fused layers."""
    model = bert(max_position_embeddings=128)
    reference = copy.deepcopy(model).double().cuda()
    hf = _cuda(copy.deepcopy(model), dtype)
    routed = fastpatch.accelerate(_cuda(copy.deepcopy(model), dtype))
    for batch, length, side in [(1, 128, "left"), (3, 37, "right"), (8, 64, "left")]:
        ids, mask = left_padded(99, batch=batch, length=length, seed=length)
        if side == "right":
            ids, mask = ids.flip(1), mask.flip(1)
        ids, mask = ids.cuda(), mask.cuda()
        with torch.no_grad():
            ref, same = reference(ids, mask), hf(ids, mask)
            for _ in range(2):  # the second call replays the captured graph
                out = routed(ids, mask)
        m = mask[..., None]
        assert_within_factor_of_torch(out.last_hidden_state.double() * m,
                                      same.last_hidden_state.double() * m,
                                      ref.last_hidden_state * m, f"hidden {batch}x{length}")
        assert_within_factor_of_torch(out.pooler_output.double(), same.pooler_output.double(),
                                      ref.pooler_output, f"pooled {batch}x{length}")
    state = getattr(routed, FUSED_ATTR)
    assert state.engine is not None and state.engine.engine.use_cuda_graph
    assert len(state.engine.engine._graphs) == 3
    with_grad = routed(ids, mask).last_hidden_state
    assert with_grad.requires_grad and len(state.engine.engine._graphs) == 3


def test_bert_graph_and_eager_agree_across_shapes():
    model = _cuda(bert(max_position_embeddings=128), torch.float32)
    graphed = fi.Bert.from_hf(model, max_batch_size=16)
    eager = fi.Bert.from_hf(model, max_batch_size=16, use_cuda_graph=False)
    assert graphed.engine.use_cuda_graph
    for batch, length, padded in [(1, 5, False), (16, 128, False), (5, 17, True), (16, 128, True), (2, 64, False)]:
        ids, mask = left_padded(99, batch=batch, length=length, seed=batch,
                                lengths=None if padded else [length] * batch)
        ids, mask = ids.cuda(), mask.cuda()
        a, b = graphed.infer(ids, mask), eager.infer(ids, mask)
        m = mask[..., None]
        torch.testing.assert_close(a.last_hidden_state * m, b.last_hidden_state * m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-5, atol=1e-5)


def test_transformer_fp32_identical_to_hf_and_graph_equals_eager():
    from inference_models import bart, right_padded

    model = bart(init_std=0.3, eos_bias=8.0).cuda()
    graphed = fi.Transformer.from_hf(model)
    eager = fi.Transformer.from_hf(model, use_cuda_graph=False)
    assert graphed.engine.use_cuda_graph
    for call, (batch, length) in enumerate([(3, 8), (1, 2), (8, 40), (2, 8)]):
        src, mask = right_padded(97, batch=batch, length=length, seed=call)
        src, mask = src.cuda(), mask.cuda()
        for kwargs in (dict(), dict(num_beams=4, num_return_sequences=2)):
            hf = model.generate(src, attention_mask=mask, max_new_tokens=14, output_scores=True,
                                return_dict_in_generate=True, **kwargs)
            a = graphed.generate(src, mask, max_new_tokens=14, **kwargs)
            b = eager.generate(src, mask, max_new_tokens=14, **kwargs)
            assert torch.equal(a.tokens, hf.sequences[:, 1:]), (batch, length, kwargs)
            assert torch.equal(a.tokens, b.tokens)
            if kwargs:
                torch.testing.assert_close(a.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_captured_beam_search_equals_eager_loop_and_hf():
    """Beam search with each step captured (``captured_search``): translation-style options
    (minimum length, forced EOS, a different limit per call) at batch 1 and 3."""
    from inference_models import EOS, bart, right_padded

    model = bart(init_std=0.3, eos_bias=8.0).cuda()
    graphed = fi.Transformer.from_hf(model)
    eager = fi.Transformer.from_hf(model, use_cuda_graph=False)
    for call, (batch, length, kwargs) in enumerate([
            (1, 9, dict(max_new_tokens=14)),
            (1, 5, dict(max_new_tokens=20, min_new_tokens=6, forced_eos_token_id=(EOS,), early_stopping=True)),
            (3, 8, dict(max_new_tokens=11, num_return_sequences=2)),
            (3, 12, dict(max_new_tokens=16, length_penalty=2.0, early_stopping="never"))]):
        src, mask = right_padded(97, batch=batch, length=length, seed=call)
        src, mask = src.cuda(), mask.cuda()
        hf = model.generate(src, attention_mask=mask, num_beams=4, output_scores=True,
                            return_dict_in_generate=True, **kwargs)
        a = graphed.generate(src, mask, num_beams=4, **kwargs)
        b = eager.generate(src, mask, num_beams=4, **kwargs)
        assert torch.equal(a.tokens, hf.sequences[:, 1:]), (call, kwargs)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores), (call, kwargs)
        torch.testing.assert_close(a.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)
    assert sum(len(g._searches) for g in graphed.engine.graphs._graphs.values()) >= 3


def test_graph_capture_survives_another_thread_pinning_memory():
    """Regression: lightseq-generate (bf16, H100, 2026-12-07) failed a mid-search capture with
    cudaErrorStreamCaptureInvalidated while fairseq's DataLoader pinned batches on its own
    thread: in the default "global" capture mode a cudaHostAlloc anywhere in the process
    invalidates the capture. The engine captures in "thread_local" mode; here a thread keeps
    allocating pinned host memory (each block held, so PyTorch's host cache cannot serve it and
    every pin is a cudaHostAlloc) while the engines capture."""
    import threading
    import time

    stop = threading.Event()
    held = []

    def pin_memory_thread():
        while not stop.is_set() and len(held) < 8192:  # at most 512 MiB pinned
            held.append(torch.empty(1 << 16, dtype=torch.uint8).pin_memory())
            time.sleep(2e-4)  # spread over the captures (a few seconds)

    model = _cuda(make_eos_likely(gpt2(), delta=1.0), torch.float32)
    eager = fi.Gpt.from_hf(model, max_batch_size=8, use_cuda_graph=False)
    pinning = threading.Thread(target=pin_memory_thread, daemon=True)
    pinning.start()
    try:
        for call in range(6):  # a fresh engine each time: every bucket is captured anew
            graphed = fi.Gpt.from_hf(model, max_batch_size=8)
            ids, mask = _batch(101, 1 + call, 4 + call, call)
            kwargs = dict(num_beams=2) if call % 2 else {}
            a = graphed.generate(ids, mask, max_new_tokens=12, **kwargs)
            b = eager.generate(ids, mask, max_new_tokens=12, **kwargs)
            assert torch.equal(a.tokens, b.tokens), call
            assert graphed.engine.graphs.captures > 0
    finally:
        stop.set()
        pinning.join()
    assert held, "the pinning thread did not run"
    held.clear()
    getattr(torch._C, "_host_emptyCache", lambda: None)()  # give the pinned memory back


def test_concurrent_calls_from_threads_give_the_sequential_results():
    """Threads sharing one engine (a server's pool): each call gets its own result, although
    the cache and the graphs' static buffers are shared (the engine takes one call at a time)."""
    from concurrency import run_in_threads

    gpt = fi.Gpt.from_hf(_cuda(gpt2(), torch.float16), max_batch_size=4)
    encoder = fi.Bert.from_hf(_cuda(bert(), torch.float16), max_batch_size=4)
    # ids below both vocabularies (GPT-2 101, BERT 99)
    prompts = [_batch(99, 1 + i % 4, 3 + i, i) for i in range(6)]
    expected = [gpt.sample(ids, mask, max_new_tokens=10, **({"num_beams": 2} if i % 2 else {}))
                for i, (ids, mask) in enumerate(prompts)]
    encoded = [encoder.infer(ids, mask).last_hidden_state for ids, mask in prompts]
    accelerated = fastpatch.accelerate(_cuda(bert(), torch.float16))  # its forward replays graphs

    def forward(ids, mask):
        with torch.no_grad():
            return accelerated(input_ids=ids, attention_mask=mask).last_hidden_state

    forwarded = [forward(ids, mask) for ids, mask in prompts]

    def work(i):
        ids, mask = prompts[i]
        for _ in range(5):
            got = gpt.sample(ids, mask, max_new_tokens=10, **({"num_beams": 2} if i % 2 else {}))
            assert torch.equal(got, expected[i]), i
            assert torch.equal(encoder.infer(ids, mask).last_hidden_state, encoded[i]), i
            assert torch.equal(forward(ids, mask), forwarded[i]), i

    run_in_threads(work, len(prompts))
