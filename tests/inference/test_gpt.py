"""fi.Gpt on the CPU: tokens and beam scores identical to Hugging Face ``generate``.

The engine's step runs eagerly here (CUDA graphs are for CUDA); the search code, the cache
arena, the prefill and the decode step are the same code the GPU runs.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
import fastpatch.inference as fi  # noqa: E402
from inference_models import EOS, PAD, gpt2, left_padded, make_eos_likely, right_aligned  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return gpt2()


@pytest.fixture(scope="module")
def engine(model):
    return fi.Gpt.from_hf(model, max_batch_size=8)


def hf_new_tokens(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_identical_to_hf_with_left_padding(model, engine, seed):
    ids, mask = left_padded(101, batch=4, length=7, seed=seed)
    expected = hf_new_tokens(model, ids, mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(engine.sample(ids, mask, max_new_tokens=20), expected)


def test_greedy_stops_each_row_at_eos_and_trims_like_hf():
    model = make_eos_likely(gpt2())
    ids, mask = left_padded(101, batch=4, length=7, seed=0)
    expected = hf_new_tokens(model, ids, mask, max_new_tokens=30, do_sample=False)
    assert (expected == EOS).any(dim=1).all(), "test setup: every row should end with EOS"
    assert expected.shape[1] < 30
    assert torch.equal(fi.Gpt.from_hf(model).sample(ids, mask, max_new_tokens=30), expected)


def test_right_padding_and_list_inputs_give_the_left_padded_result(model, engine):
    ids, mask = left_padded(101, batch=3, length=6, seed=3)
    expected = hf_new_tokens(model, ids, mask, max_new_tokens=8, do_sample=False)
    rids, rmask = right_aligned(ids, mask)
    assert torch.equal(engine.sample(rids, rmask, max_new_tokens=8), expected)
    assert torch.equal(engine.sample(rids.tolist(), rmask.tolist(), max_new_tokens=8), expected)


@pytest.mark.parametrize("kwargs", [
    dict(num_return_sequences=2),
    dict(length_penalty=0.0, early_stopping=True),
    dict(length_penalty=2.0, early_stopping="never"),
    dict(length_penalty=-0.5, num_return_sequences=4),
])
def test_beam_search_identical_hypotheses_and_scores(model, engine, kwargs):
    ids, mask = left_padded(101, batch=3, length=6, seed=4)
    fill = 5  # HF pads finished beams with `pad_token_id or eos`: a non-zero pad keeps both equal
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False,
                        pad_token_id=fill, output_scores=True, return_dict_in_generate=True, **kwargs)
    out = engine.generate(ids, mask, max_new_tokens=12, num_beams=4, pad_token_id=fill, **kwargs)
    assert torch.equal(out.tokens, hf.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.beam_indices, hf.beam_indices.to(torch.int32))


def test_beam_search_reaches_eos_like_hf():
    model = make_eos_likely(gpt2())
    ids, mask = left_padded(101, batch=2, length=5, seed=5)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=15, num_beams=4, pad_token_id=5,
                        num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    out = fi.Gpt.from_hf(model).generate(ids, mask, max_new_tokens=15, num_beams=4, pad_token_id=5,
                                         num_return_sequences=3)
    assert (hf.sequences[:, ids.shape[1]:] == EOS).any(), "test setup: some hypothesis should end with EOS"
    assert torch.equal(out.tokens, hf.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_sampling_matches_hf_draws_and_a_seed_makes_it_reproducible(model, engine):
    ids, mask = left_padded(101, batch=3, length=6, seed=6)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.7)
    torch.manual_seed(11)
    expected = hf_new_tokens(model, ids, mask, **kwargs)
    torch.manual_seed(11)
    assert torch.equal(engine.sample(ids, mask, **kwargs), expected)  # same formulas, same RNG draws
    a = engine.sample(ids, mask, seed=3, **kwargs)
    torch.manual_seed(999)  # a private generator: the global RNG state does not matter
    b = engine.sample(ids, mask, seed=3, **kwargs)
    c = engine.sample(ids, mask, seed=4, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_several_samples_per_prompt_and_beam_sampling_match_hf(model, engine):
    ids, mask = left_padded(101, batch=2, length=5, seed=7)
    torch.manual_seed(3)
    expected = hf_new_tokens(model, ids, mask, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    torch.manual_seed(3)
    assert torch.equal(engine.sample(ids, mask, max_new_tokens=6, do_sample=True, num_return_sequences=3),
                       expected)
    torch.manual_seed(4)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=True,
                        pad_token_id=5, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(4)
    out = engine.generate(ids, mask, max_new_tokens=6, num_beams=3, do_sample=True, pad_token_id=5)
    assert torch.equal(out.tokens, hf.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_stream_and_streamer_yield_the_tokens_as_produced(engine):
    ids, mask = left_padded(101, batch=3, length=6, seed=8)
    full = engine.sample(ids, mask, max_new_tokens=9)
    streamed = list(engine.stream(ids, mask, max_new_tokens=9))
    assert len(streamed) == full.shape[1]
    assert torch.equal(torch.stack(streamed, dim=1), full)
    assert not torch.is_inference_mode_enabled()  # nothing leaks between yields
    seen = []
    engine.generate(ids, mask, max_new_tokens=9, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), full)


def test_output_scores_are_the_logits_each_token_was_chosen_from(engine):
    ids, mask = left_padded(101, batch=2, length=4, seed=9)
    out = engine.generate(ids, mask, max_new_tokens=5, output_scores=True)
    assert len(out.step_scores) == out.tokens.shape[1]
    for t, scores in enumerate(out.step_scores):
        assert torch.equal(scores.argmax(dim=-1), out.tokens[:, t])


def test_accelerated_model_and_engine_agree(model):
    import copy

    accelerated = fastpatch.accelerate(copy.deepcopy(model))
    assert fastpatch.report(accelerated).replaced
    ids, mask = left_padded(101, batch=3, length=6, seed=10)
    expected = hf_new_tokens(accelerated, ids, mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(fi.Gpt.from_hf(accelerated).sample(ids, mask, max_new_tokens=10), expected)


def test_from_hf_shares_the_parameters(model, engine):
    block = model.transformer.h[0]
    assert engine.engine.layers[0].qkv.weights[0].data_ptr() == block.attn.c_attn.weight.data_ptr()
    assert engine.engine.lm_head.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_untied_head_and_scaled_attention_variants():
    model = gpt2(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                 activation_function="relu", n_layer=3)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    ids, mask = left_padded(101, batch=2, length=5, seed=12)
    expected = hf_new_tokens(model, ids, mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(fi.Gpt.from_hf(model).sample(ids, mask, max_new_tokens=8), expected)


def test_cache_grows_across_calls_of_different_sizes(model, engine):
    for batch, length, new in [(1, 3, 4), (8, 9, 70), (2, 60, 60), (5, 4, 3)]:
        ids, mask = left_padded(101, batch=batch, length=length, seed=batch + length)
        expected = hf_new_tokens(model, ids, mask, max_new_tokens=new, do_sample=False)
        assert torch.equal(engine.sample(ids, mask, max_new_tokens=new), expected), (batch, length, new)


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("ids, match", [
    ([[1, 2, 3], [4, 5]], "input_ids is ragged"),
    ([1, 2, 3], "input_ids must be 2-D"),
    ([[1, [2], 3]], "input_ids must be 2-D"),
    (torch.tensor([1, 2, 3]), "input_ids must be 2-D"),
    (torch.ones(2, 3), "input_ids must hold integers"),
    ([[1, 2, 101]], "input_ids holds token id 101"),
    ([[-1, 2, 3]], "input_ids holds token id -1"),
    ([[1, 2]] * 9, "input_ids has 9 rows, more than max_batch_size=8"),
])
def test_bad_input_ids_raise_value_error_naming_them(engine, ids, match):
    with pytest.raises(ValueError, match=match):
        engine.sample(ids, max_new_tokens=2)


def test_bad_masks_and_options_are_named(engine):
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        engine.sample([[3, 4, 5]], [[1, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask row 1 has no token"):
        engine.sample([[3, 4], [5, 6]], [[1, 1], [0, 0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        engine.sample([[3, 4]], [[1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=200 .* exceeds the model's 128 positions"):
        engine.sample([[3, 4]], max_new_tokens=200)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.sample([[3, 4]], do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="num_return_sequences .* must be <= num_beams"):
        engine.sample([[3, 4]], num_beams=2, num_return_sequences=3)
    with pytest.raises(TypeError, match="unexpected decoding option 'repetition_penalty'"):
        engine.sample([[3, 4]], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        fi.Gpt.from_hf(gpt2(), max_batch_size=0)
