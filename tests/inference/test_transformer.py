"""fi.Transformer (encoder-decoder) on the CPU: tokens and beam scores identical to HF BART."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
import fastpatch.inference as fi  # noqa: E402
from inference_models import EOS, bart, right_padded  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
    return bart(eos_bias=25.0)


@pytest.fixture(scope="module")
def engine(model):
    return fi.Transformer.from_hf(model, max_batch_size=8)


def test_greedy_identical_to_hf_with_padded_sources(model, engine):
    src, mask = right_padded(97, batch=3, length=9, seed=0)
    hf = model.generate(src, attention_mask=mask, max_new_tokens=20)[:, 1:]  # drop the start token
    ends = (hf == EOS).int().argmax(dim=1)
    assert len(set(ends.tolist())) == 3, "test setup: sentences should end at different steps"
    assert torch.equal(engine.sample(src, mask, max_new_tokens=20), hf)


@pytest.mark.parametrize("kwargs", [
    dict(num_return_sequences=2),
    dict(length_penalty=0.0, early_stopping=True),
    dict(length_penalty=2.0, early_stopping="never", num_return_sequences=4),
])
def test_beam_search_identical_hypotheses_and_scores(kwargs):
    # init_std 1.0 amplifies fp32 rounding (the engine's fused ops round differently from HF's)
    # to ~1e-4 in summed log-probs; 0.3 keeps the comparison at rounding level
    model = bart(init_std=0.3, eos_bias=8.0)
    engine = fi.Transformer.from_hf(model)
    src, mask = right_padded(97, batch=3, length=8, seed=1)
    hf = model.generate(src, attention_mask=mask, max_new_tokens=14, num_beams=4, output_scores=True,
                        return_dict_in_generate=True, **kwargs)
    out = engine.generate(src, mask, max_new_tokens=14, num_beams=4, **kwargs)
    assert torch.equal(out.tokens, hf.sequences[:, 1:])
    torch.testing.assert_close(out.scores, hf.sequences_scores, rtol=1e-4, atol=1e-4)


def test_sampling_draws_like_hf(model, engine):
    src, mask = right_padded(97, batch=2, length=7, seed=2)
    torch.manual_seed(5)
    hf = model.generate(src, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=10)[:, 1:]
    torch.manual_seed(5)
    assert torch.equal(engine.sample(src, mask, max_new_tokens=10, do_sample=True, top_k=10), hf)


def test_scaled_embeddings_and_wider_batches():
    model = bart(eos_bias=25.0, scale_embedding=True, seed=3)
    engine = fi.Transformer.from_hf(model)
    for batch, length in [(1, 3), (8, 30), (5, 2)]:
        src, mask = right_padded(97, batch=batch, length=length, seed=batch)
        hf = model.generate(src, attention_mask=mask, max_new_tokens=9, num_beams=2)[:, 1:]
        assert torch.equal(engine.sample(src, mask, max_new_tokens=9, num_beams=2), hf), (batch, length)


def test_export_then_three_line_infer_without_transformers(model, tmp_path):
    path = fastpatch.export(model, str(tmp_path), num_beams=4, max_new_tokens=12)
    src = [[11, 12, 13], [40, 50, 60]]
    hf = model.generate(torch.tensor(src), num_beams=4, max_new_tokens=12, output_scores=True,
                        return_dict_in_generate=True)
    out = fi.Transformer(path, max_batch_size=8, device="cpu").infer(src)
    assert torch.equal(out.tokens, hf.sequences[:, 1:])
    torch.save(dict(tokens=out.tokens), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["transformers"] = None
        import torch
        import fastpatch.inference as fi
        m = fi.Transformer({path!r}, max_batch_size=8, device="cpu")
        assert torch.equal(m.infer({src!r}).tokens, torch.load({str(tmp_path / "expected.pt")!r})["tokens"])
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_bad_inputs_are_named(engine):
    with pytest.raises(ValueError, match="input_ids is ragged"):
        engine.infer([[3, 4, 5], [6]])
    with pytest.raises(ValueError, match="input_ids holds token id 97"):
        engine.infer([[3, 97]])
    with pytest.raises(ValueError, match="more than max_batch_size=8"):
        engine.infer([[3]] * 9)
    with pytest.raises(ValueError, match="more than the model's 100 positions"):
        engine.infer([[3] * 101])
    with pytest.raises(ValueError, match="max_new_tokens=101 exceeds the model's 100 target positions"):
        engine.infer([[3, 4]], max_new_tokens=101)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_min_new_tokens_bars_eos_as_hf_does(num_beams):
    # eos_bias makes EOS the likeliest token from the first step: without the minimum every
    # sentence would end at once
    model = bart(init_std=0.3, eos_bias=25.0)
    engine = fi.Transformer.from_hf(model)
    src, mask = right_padded(97, batch=3, length=8, seed=3)
    hf = model.generate(src, attention_mask=mask, max_new_tokens=12, min_new_tokens=6,
                        num_beams=num_beams)[:, 1:]
    out = engine.generate(src, mask, max_new_tokens=12, min_new_tokens=6, num_beams=num_beams).tokens
    assert torch.equal(out, hf)
    ends = (out == EOS).int().argmax(dim=1)
    assert bool((out == EOS).any(dim=1).all()) and ends.min() == 6  # the first EOS allowed
