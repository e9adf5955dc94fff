"""enable_generate: HF ``generate()`` through the engine where allowed, HF's loop otherwise."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
import fastpatch.inference as fi  # noqa: E402
from inference_models import (PAD, bart, bert, gpt2, left_padded, make_eos_likely, right_aligned,  # noqa: E402
                              right_padded)


@pytest.fixture(scope="module")
def pair():
    vanilla = make_eos_likely(gpt2(), delta=1.5)
    routed = fi.enable_generate(fastpatch.accelerate(copy.deepcopy(vanilla)))
    return vanilla, routed


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
        return
    assert torch.equal(a.sequences, b.sequences)
    for name in ("sequences_scores",):
        if getattr(a, name, None) is not None:
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-4)
    if getattr(a, "scores", None) is not None:
        assert len(a.scores) == len(b.scores)
        for x, y in zip(a.scores, b.scores):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    if getattr(a, "beam_indices", None) is not None:
        assert torch.equal(a.beam_indices, b.beam_indices)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=15),
    dict(max_length=16),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=2),
    dict(max_new_tokens=10, num_beams=3, output_scores=True, return_dict_in_generate=True),
    dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True),
    dict(max_new_tokens=10, num_beams=2, length_penalty=0.5, early_stopping=True, pad_token_id=PAD),
    dict(max_new_tokens=10, min_new_tokens=7, num_beams=2),
    dict(max_new_tokens=10, min_new_tokens=7),
])
def test_engine_path_gives_hf_outputs(pair, caplog, kwargs):
    vanilla, routed = pair
    ids, mask = left_padded(101, batch=3, length=6, seed=1)
    expected = vanilla.generate(ids, attention_mask=mask, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        got = routed.generate(ids, attention_mask=mask, **kwargs)
    assert "runs the fastpatch engine" in caplog.text
    _same(expected, got)


def test_sampling_through_the_engine_draws_like_hf(pair, caplog):
    vanilla, routed = pair
    ids, mask = left_padded(101, batch=2, length=5, seed=2)
    kwargs = dict(max_new_tokens=9, do_sample=True, top_k=30, top_p=0.8, temperature=0.9)
    torch.manual_seed(7)
    expected = vanilla.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        got = routed.generate(ids, attention_mask=mask, **kwargs)
    assert "runs the fastpatch engine (sampling)" in caplog.text
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3 is not implemented"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions=True"),
    (dict(logits_processor=transformers.LogitsProcessorList()), "logits_processor is set"),
    (dict(min_length=9), "min_length=9"),
    (dict(use_cache=False), "use_cache=False"),
])
def test_unsupported_calls_fall_back_to_hf_and_say_why(pair, caplog, kwargs, reason):
    vanilla, routed = pair
    ids, mask = left_padded(101, batch=2, length=5, seed=3)
    expected = vanilla.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        got = routed.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    assert "runs Hugging Face's loop" in caplog.text and reason in caplog.text
    _same(expected, got)


def test_right_padded_masks_keep_hf_semantics(pair, caplog):
    vanilla, routed = pair
    ids, mask = right_aligned(*left_padded(101, batch=2, length=5, seed=4))
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        got = routed.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert "not left-padded" in caplog.text
    assert torch.equal(got, vanilla.generate(ids, attention_mask=mask, max_new_tokens=4))


def test_hf_streamer_receives_prompt_then_tokens(pair):
    vanilla, routed = pair

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = torch.tensor([[5, 6, 7, 8]])
    a, b = Collect(), Collect()
    vanilla.generate(ids, max_new_tokens=7, streamer=a)
    routed.generate(ids, max_new_tokens=7, streamer=b)
    assert a.ended and b.ended and a.chunks == b.chunks


def test_engine_follows_the_model_to_another_dtype_and_revert_undoes_everything():
    vanilla = gpt2()
    routed = fi.enable_generate(copy.deepcopy(vanilla))
    ids, mask = left_padded(101, batch=2, length=5, seed=5)
    assert torch.equal(routed.generate(ids, attention_mask=mask, max_new_tokens=5),
                       vanilla.generate(ids, attention_mask=mask, max_new_tokens=5))
    routed.double()
    vanilla.double()
    assert torch.equal(routed.generate(ids, attention_mask=mask, max_new_tokens=5),
                       vanilla.generate(ids, attention_mask=mask, max_new_tokens=5))
    fastpatch.revert(routed)
    assert type(routed) is transformers.GPT2LMHeadModel
    with pytest.raises(TypeError, match="enable_generate supports GPT2LMHeadModel, "
                                        "BartForConditionalGeneration; got BertModel"):
        fi.enable_generate(bert())


def test_forced_bos_and_eos_processors_run_in_the_engine(pair, caplog):
    vanilla, routed = pair
    ids, mask = left_padded(101, batch=2, length=5, seed=6)
    for kwargs in (dict(forced_eos_token_id=7), dict(forced_eos_token_id=[7, 9], num_beams=3),
                   dict(forced_bos_token_id=4)):
        expected = vanilla.generate(ids[:, -1:], max_new_tokens=6, **kwargs)
        with caplog.at_level(logging.INFO, logger="fastpatch"):
            got = routed.generate(ids[:, -1:], max_new_tokens=6, **kwargs)
        assert "runs the fastpatch engine" in caplog.text
        assert torch.equal(got, expected), kwargs


def test_a_copy_of_a_routed_model_builds_its_own_engine():
    from fastpatch.adapters import FUSED_ATTR

    routed = fi.enable_generate(fastpatch.accelerate(gpt2()))
    ids, mask = left_padded(routed.config.vocab_size)
    first = routed.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert getattr(routed, FUSED_ATTR).engine is not None
    twin = copy.deepcopy(routed)
    assert getattr(twin, FUSED_ATTR).engine is None  # CUDA graphs are not copied
    assert torch.equal(twin.generate(ids, attention_mask=mask, max_new_tokens=5), first)
    assert getattr(twin, FUSED_ATTR).engine is not getattr(routed, FUSED_ATTR).engine


# ------------------------------------------------------------------------------------ BART
@pytest.fixture(scope="module")
def bart_pair():
    # init_std 0.3: HF's loop over the fused layers must not flip near-ties either (the fallback
    # cases compare it with the vanilla model); see test_transformer.py
    vanilla = bart(eos_bias=4.0, init_std=0.3)
    routed = fastpatch.accelerate(copy.deepcopy(vanilla))
    assert any("decoding engine" in note for note in fastpatch.report(routed).notes)
    return vanilla, routed


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=15),
    dict(max_length=12),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=2),
    dict(max_new_tokens=10, num_beams=3, length_penalty=0.5, early_stopping=True,
         output_scores=True, return_dict_in_generate=True),
    dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True),
    dict(max_new_tokens=10, min_new_tokens=6, num_beams=3),
])
def test_bart_generate_runs_the_engine_with_hf_outputs(bart_pair, caplog, kwargs):
    """accelerate(BartForConditionalGeneration): generate() on the encoder-decoder engine, with
    HF's outputs (sequences from the start token, output classes, scores) on padded sources."""
    vanilla, routed = bart_pair
    src, mask = right_padded(97, batch=3, length=9, seed=4)
    expected = vanilla.generate(src, attention_mask=mask, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        got = routed.generate(src, attention_mask=mask, **kwargs)
    assert "runs the fastpatch engine" in caplog.text
    assert type(got) is type(expected)
    _same(expected, got)


def test_bart_sampling_and_what_falls_back(bart_pair, caplog):
    vanilla, routed = bart_pair
    src, mask = right_padded(97, batch=2, length=7, seed=5)
    kwargs = dict(max_new_tokens=9, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    expected = vanilla.generate(src, attention_mask=mask, **kwargs)
    torch.manual_seed(3)
    _same(expected, routed.generate(src, attention_mask=mask, **kwargs))
    for extra, reason in ((dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
                          (dict(decoder_input_ids=torch.full((2, 2), 2)), "decoder_input_ids")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastpatch"):
            got = routed.generate(src, attention_mask=mask, max_new_tokens=6, **extra)
        assert "runs Hugging Face's loop" in caplog.text and reason in caplog.text
        _same(vanilla.generate(src, attention_mask=mask, max_new_tokens=6, **extra), got)


def test_bart_engine_follows_in_place_weight_updates():
    """BART's engine holds concatenated q/k/v (copies): an optimizer step must rebuild it."""
    vanilla = bart(eos_bias=6.0, seed=2)
    routed = fastpatch.accelerate(copy.deepcopy(vanilla))
    src, mask = right_padded(97, batch=2, length=6, seed=6)
    routed.generate(src, attention_mask=mask, max_new_tokens=5)
    with torch.no_grad():
        for model in (vanilla, routed):
            model.model.decoder.layers[0].self_attn.v_proj.weight.mul_(-2.0)
    _same(vanilla.generate(src, attention_mask=mask, max_new_tokens=8),
          routed.generate(src, attention_mask=mask, max_new_tokens=8))
