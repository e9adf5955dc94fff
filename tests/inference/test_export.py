"""fastpatch.export -> fi.Gpt / fi.Bert: round trips, decoding options, damaged files, and
running with transformers blocked."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastpatch  # noqa: E402
import fastpatch.inference as fi  # noqa: E402
from inference_models import PAD, bert, gpt2, left_padded  # noqa: E402
from numerics import assert_close_relative  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gpt_model():
    return gpt2(n_layer=3)


@pytest.fixture(scope="module")
def gpt_path(gpt_model, tmp_path_factory):
    return fastpatch.export(gpt_model, str(tmp_path_factory.mktemp("gpt")))


@pytest.fixture(scope="module")
def bert_model():
    return bert()


@pytest.fixture(scope="module")
def bert_path(bert_model, tmp_path_factory):
    return fastpatch.export(bert_model, str(tmp_path_factory.mktemp("bert")))


def test_gpt_round_trip_gives_the_live_model_tokens(gpt_model, gpt_path):
    import copy

    accelerated = fastpatch.accelerate(copy.deepcopy(gpt_model))
    ids, mask = left_padded(101, batch=3, length=6, seed=1)
    m = fi.Gpt(gpt_path, max_batch_size=4, device="cpu")
    for kwargs in (dict(do_sample=False), dict(num_beams=4, num_return_sequences=2)):
        live = accelerated.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=5, **kwargs)
        assert torch.equal(m.sample(ids, mask, max_new_tokens=10, pad_token_id=5, **kwargs),
                           live[:, ids.shape[1]:]), kwargs


def test_three_lines_with_python_lists(gpt_model, gpt_path):
    expected = gpt_model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=32,
                                  do_sample=False, pad_token_id=PAD)[:, 3:]
    m = fi.Gpt(gpt_path, max_batch_size=8)
    assert torch.equal(m.sample([[1, 2, 3], [4, 5, 6]], max_new_tokens=32).cpu(), expected)


def test_exported_decoding_options_are_the_defaults_and_kwargs_override_them(gpt_model, tmp_path):
    path = fastpatch.export(gpt_model, str(tmp_path), max_new_tokens=6, num_beams=3, length_penalty=0.5)
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["generation"]["num_beams"] == 3 and config["architecture"] == "gpt"
    ids, mask = left_padded(101, batch=2, length=5, seed=2)
    m = fi.Gpt(path, device="cpu")
    live = fi.Gpt.from_hf(gpt_model)
    assert torch.equal(m.sample(ids, mask),
                       live.sample(ids, mask, max_new_tokens=6, num_beams=3, length_penalty=0.5))
    assert torch.equal(m.sample(ids, mask, num_beams=1, max_new_tokens=4),
                       live.sample(ids, mask, max_new_tokens=4))


def test_export_keeps_the_model_dtype_and_dtype_argument_casts(gpt_model, tmp_path):
    half = fastpatch.export(gpt2().to(torch.bfloat16), str(tmp_path / "bf16"))
    tensors = safetensors_torch.load_file(os.path.join(half, "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    m = fi.Gpt(half, device="cpu", dtype=torch.float32)
    assert m.engine.dtype == torch.float32


def test_bert_round_trip_matches_hf(bert_model, bert_path):
    ids, mask = left_padded(99, batch=3, length=9, seed=3)
    types = (torch.arange(9) >= 5).long().expand(3, 9)
    with torch.no_grad():
        ref = bert_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = fi.Bert(bert_path, max_batch_size=4, device="cpu").infer(ids, mask, token_type_ids=types)
    assert_close_relative(out.last_hidden_state * mask[..., None], ref.last_hidden_state * mask[..., None],
                          1e-5, "last_hidden_state")
    assert_close_relative(out.pooler_output, ref.pooler_output, 1e-5, "pooler_output")
    hidden, pooled = fi.Bert.from_hf(bert_model).infer(ids.tolist(), mask.tolist(), types.tolist())
    assert_close_relative(hidden, out.last_hidden_state, 1e-6, "from_hf")


def test_bert_without_pooler_returns_none(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(bert().config, add_pooling_layer=False).eval()
    path = fastpatch.export(model, str(tmp_path))
    ids = torch.randint(0, 99, (2, 5))
    out = fi.Bert(path, device="cpu").infer(ids)
    assert out.pooler_output is None
    with torch.no_grad():
        assert_close_relative(out.last_hidden_state, model(input_ids=ids).last_hidden_state, 1e-5, "hidden")


def test_bert_bad_inputs_are_named(bert_path):
    m = fi.Bert(bert_path, max_batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="input_ids is ragged"):
        m.infer([[1, 2], [3]])
    with pytest.raises(ValueError, match="input_ids holds token id 99"):
        m.infer([[1, 99]])
    with pytest.raises(ValueError, match="more than max_batch_size=2"):
        m.infer([[1]] * 3)
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        m.infer([[1, 2]], token_type_ids=[[0, 2]])
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        m.infer([[1] * 65])


def _rewrite_weights(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = safetensors_torch.load_file(file)
    edit(tensors)
    safetensors_torch.save_file(tensors, file)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.ln2.bias"), "tensor 'layers.1.ln2.bias' is missing"),
    (lambda t: t.__setitem__("layers.0.attn.qkv.weight", torch.zeros(3, 3)),
     r"tensor 'layers.0.attn.qkv.weight' has shape \[3, 3\], but the config implies \[192, 64\]"),
    (lambda t: t.__setitem__("lm_head.weight", torch.zeros(101, 64)), "unexpected tensor 'lm_head.weight'"),
    (lambda t: t.__setitem__("final_ln.bias", torch.zeros(64, dtype=torch.float16)),
     "tensor 'final_ln.bias' is torch.float16"),
])
def test_damaged_weights_fail_naming_the_tensor(gpt_model, tmp_path, edit, message):
    path = fastpatch.export(gpt_model, str(tmp_path))
    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=message):
        fi.Gpt(path, device="cpu")


def test_config_and_file_mismatches_are_reported(gpt_model, bert_path, tmp_path):
    path = fastpatch.export(gpt_model, str(tmp_path))
    config_file = os.path.join(path, "config.json")
    config = json.load(open(config_file))
    config["model"]["ffn_size"] = 100
    json.dump(config, open(config_file, "w"))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.ffn.fc1.weight' has shape \[256, 64\]"):
        fi.Gpt(path, device="cpu")
    with pytest.raises(ValueError, match="holds a 'bert' model, not 'gpt'"):
        fi.Gpt(bert_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        fi.Gpt(str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="supports Hugging Face GPT-2, BERT and BART"):
        fastpatch.export(torch.nn.Linear(2, 2), str(tmp_path / "x"))


def test_runs_without_transformers_installed(gpt_model, gpt_path, bert_model, bert_path, tmp_path):
    ids, mask = left_padded(101, batch=2, length=5, seed=4)
    tokens = gpt_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=PAD)[:, 5:]
    with torch.no_grad():
        hidden = bert_model(input_ids=ids.clamp(max=98)).last_hidden_state
    torch.save(dict(ids=ids, mask=mask, tokens=tokens, hidden=hidden), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["transformers"] = None  # any import of it now raises ImportError
        sys.modules["fairseq"] = None
        import torch
        import fastpatch
        import fastpatch.inference as fi
        e = torch.load({str(tmp_path / "expected.pt")!r})
        m = fi.Gpt({gpt_path!r}, max_batch_size=8, device="cpu")
        assert torch.equal(m.sample(e["ids"], e["mask"], max_new_tokens=8), e["tokens"])
        out = fi.Bert({bert_path!r}, max_batch_size=8, device="cpu").infer(e["ids"].clamp(max=98))
        err = (out.last_hidden_state - e["hidden"]).norm() / e["hidden"].norm()
        assert err < 1e-5, err
        assert fastpatch.export is fi.export
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_import_fastpatch_stays_torch_only():
    script = ("import sys, fastpatch\n"
              "assert 'fastpatch.inference' not in sys.modules\n"
              "fastpatch.export\n"
              "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'fairseq')]\n"
              "assert not bad, bad\n"
              "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
