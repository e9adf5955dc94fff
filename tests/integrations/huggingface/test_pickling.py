"""torch.save(model) / torch.load and copy.deepcopy of accelerated Hugging Face models: the copy
is the same accelerated model (fused layers, routed generate/forward, fused loss) with the
same outputs, and revert still gives the original classes back."""
import copy
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from fastpatch.adapters import is_accelerated  # noqa: E402
from helpers import padded_batch  # noqa: E402
from test_bart import model as bart_model  # noqa: E402
from test_bart import seq2seq_batch  # noqa: E402
from test_bert import bert_config  # noqa: E402
from test_gpt2 import gpt2  # noqa: E402

from numerics import assert_close_relative  # noqa: E402


def _bert_mlm():
    model = transformers.BertForMaskedLM(bert_config())
    ids, mask = padded_batch(model.config.vocab_size, batch=3, length=13, side="right")
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _gpt2():
    model = gpt2()
    ids, mask = padded_batch(model.config.vocab_size, batch=3, length=13, side="left")
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _bart():
    model = bart_model("BartForConditionalGeneration")
    ids, mask, dec, dec_mask = seq2seq_batch("right", batch=3, src_len=13, tgt_len=9)
    return model, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                       decoder_attention_mask=dec_mask, labels=dec.masked_fill(dec_mask == 0, -100))


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("build", [_bert_mlm, _gpt2, _bart], ids=["bert_mlm", "gpt2", "bart"])
@pytest.mark.parametrize("copy_with", [_saved_and_loaded, copy.deepcopy], ids=["torch_save", "deepcopy"])
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
