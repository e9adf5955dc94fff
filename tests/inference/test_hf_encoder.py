"""accelerate() routes a BERT encoder's inference forward through the encoder engine; other
calls run the fused layers. On the CPU the engine runs eagerly (the tests add "cpu" to the
devices it serves); the cuda tests check the graph-replayed path."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from fastpatch.inference import hf_encoder  # noqa: E402
from inference_models import bert  # noqa: E402
from numerics import assert_close_relative  # noqa: E402


@pytest.fixture(autouse=True)
def engine_on_cpu(monkeypatch):
    monkeypatch.setattr(hf_encoder, "ENGINE_DEVICE_TYPES", ("cuda", "cpu"))


def _batch(vocab, side, batch=4, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        keep = length - 3 * row
        if side == "right":
            mask[row, keep:] = 0
        else:
            mask[row, : length - keep] = 0
    types = torch.randint(0, 2, (batch, length), generator=g)
    return ids.masked_fill(mask == 0, 0), mask, types


def _routed(model):
    return fastpatch.accelerate(copy.deepcopy(model).eval())


def _engine_ran(caplog) -> bool:
    return any("replayed the encoder engine" in r.getMessage() for r in caplog.records)


def _assert_same(got, want, mask, tol=1e-5):
    """Hidden states at the tokens (padding positions carry no meaning) and the pooled output."""
    keep = mask.bool()[..., None]
    assert_close_relative(got.last_hidden_state * keep, want.last_hidden_state * keep, tol,
                          "last_hidden_state")
    assert_close_relative(got.pooler_output, want.pooler_output, tol, "pooler_output")


@pytest.mark.parametrize("side", ["right", "left"])
def test_inference_forward_runs_the_engine_and_matches_the_original(side, caplog):
    original = bert().eval()
    routed = _routed(original)
    report = fastpatch.report(routed)
    assert report.fully_accelerated and any("encoder engine" in n for n in report.notes)
    ids, mask, types = _batch(original.config.vocab_size, side)
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask, token_type_ids=types)
        with caplog.at_level(logging.DEBUG, logger="fastpatch"):
            got = routed(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert _engine_ran(caplog)
    _assert_same(got, want, mask)
    assert not got.last_hidden_state.is_inference()  # usable under autograd later
    with torch.inference_mode():
        _assert_same(routed(ids, mask), original(ids, mask), mask)
        plain = routed(ids, mask, return_dict=False)
        routed.config.return_dict = False
        from_config = routed(ids, mask)
    assert isinstance(plain, tuple) and len(plain) == 2
    assert isinstance(from_config, tuple) and torch.equal(from_config[0], plain[0])


def test_heads_route_their_bert_body(caplog):
    torch.manual_seed(0)
    original = transformers.BertForSequenceClassification(bert().config).eval()
    routed = _routed(original)
    assert type(routed.bert).__name__ == "BertModel" and hf_encoder.EngineEncoderForward in type(routed.bert).__mro__
    ids, mask, _ = _batch(original.config.vocab_size, "right")
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="fastpatch"):
        got, want = routed(input_ids=ids, attention_mask=mask).logits, original(input_ids=ids, attention_mask=mask).logits
    assert _engine_ran(caplog)
    assert_close_relative(got, want, 1e-5, "logits")


@pytest.mark.parametrize("case", ["training", "grad", "hidden_states", "position_ids", "float_mask",
                                  "inputs_embeds", "empty_row", "autocast"])
def test_other_calls_run_the_fused_layers_with_the_same_result(case, caplog):
    original = bert().eval()
    routed = _routed(original)
    ids, mask, _ = _batch(original.config.vocab_size, "right")
    kwargs = dict(input_ids=ids, attention_mask=mask)
    context = torch.no_grad()
    if case == "training":
        original.train(), routed.train()  # dropout is 0 in this config
    elif case == "grad":
        context = torch.enable_grad()
    elif case == "hidden_states":
        kwargs["output_hidden_states"] = True
    elif case == "position_ids":
        kwargs["position_ids"] = torch.arange(ids.shape[1]).flip(0)[None]
    elif case == "float_mask":
        kwargs["attention_mask"] = mask.float()
    elif case == "inputs_embeds":
        kwargs = dict(inputs_embeds=original.embeddings.word_embeddings(ids), attention_mask=mask)
    elif case == "empty_row":
        kwargs["attention_mask"] = mask.clone()
        kwargs["attention_mask"][-1] = 0
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context, caplog.at_level(logging.DEBUG, logger="fastpatch"):
        want = original(**kwargs)
        got = routed(**kwargs)
    assert not _engine_ran(caplog)
    assert any("runs the fused layers" in r.getMessage() for r in caplog.records)
    tol = 1e-2 if case == "autocast" else 1e-5
    if case == "empty_row":  # a row without tokens has no meaningful output in either
        keep = kwargs["attention_mask"].bool()[..., None]
        assert_close_relative(got.last_hidden_state * keep, want.last_hidden_state * keep, tol, "hidden")
    else:
        assert_close_relative(got.last_hidden_state, want.last_hidden_state, tol, "last_hidden_state")
    if case == "hidden_states":
        assert len(got.hidden_states) == len(want.hidden_states)


def test_engine_follows_weight_updates_moves_and_copies():
    original = bert().eval()
    routed = _routed(original)
    ids, mask, _ = _batch(original.config.vocab_size, "right")
    with torch.no_grad():
        routed(ids, mask)  # builds the engine
        for model in (original, routed):
            model.encoder.layer[0].attention.self.query.weight.mul_(1.5)  # in place (version)
            model.pooler.dense.bias.add_(0.1)
        _assert_same(routed(ids, mask), original(ids, mask), mask)
        routed.load_state_dict(original.state_dict())
        _assert_same(routed(ids, mask), original(ids, mask), mask)
        _assert_same(copy.deepcopy(routed)(ids, mask), original(ids, mask), mask)
        routed.double()
        _assert_same(routed(ids.clone(), mask), original.double()(ids, mask), mask)


def test_accelerate_twice_and_revert():
    original = bert().eval()
    routed = _routed(original)
    replaced = dict(fastpatch.report(routed).replaced)
    fastpatch.accelerate(routed)
    assert fastpatch.report(routed).replaced == replaced
    fastpatch.revert(routed)
    assert type(routed) is transformers.BertModel
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in routed.modules())


def test_enable_encoder_forward_rejects_other_models():
    with pytest.raises(TypeError, match="BertModel"):
        hf_encoder.enable_encoder_forward(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        hf_encoder.enable_encoder_forward("bert")


def test_models_whose_weights_the_engine_cannot_read_are_not_routed():
    class ScaledEmbedding(torch.nn.Embedding):  # e.g. an adapter-wrapped table
        def forward(self, ids):
            return super().forward(ids) * 2

    model = bert()
    wrapped = ScaledEmbedding(*model.embeddings.word_embeddings.weight.shape)
    wrapped.load_state_dict(model.embeddings.word_embeddings.state_dict())
    model.embeddings.word_embeddings = wrapped
    routed = fastpatch.accelerate(copy.deepcopy(model).eval())
    assert not isinstance(routed, hf_encoder.EngineEncoderForward)
    report = fastpatch.report(routed)
    assert not any("encoder engine" in n for n in report.notes)
    assert "overrides nn.Embedding" in report.skipped["embeddings"]
    ids, mask, _ = _batch(model.config.vocab_size, "right")
    with torch.no_grad():
        _assert_same(routed(ids, mask), model.eval()(ids, mask), mask)
