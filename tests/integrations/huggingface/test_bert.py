"""accelerate() on BERT-shaped models (BERT heads, RoBERTa, XLM-RoBERTa) against the originals."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from helpers import assert_same_outputs_and_grads, padded_batch, twin  # noqa: E402
from numerics import assert_close_relative  # noqa: E402


def bert_config(**overrides):
    kwargs = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=600, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, type_vocab_size=2)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


HEADS = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
         "BertForQuestionAnswering", "BertForPreTraining"]


def _first_tensor(output):
    for key in ("logits", "prediction_logits", "start_logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            return getattr(output, key)
    raise AssertionError("no tensor output")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_heads_match_original(head, side):
    torch.manual_seed(0)
    model = getattr(transformers, head)(bert_config()).eval()
    original, accelerated = twin(model)
    assert len(fastpatch.report(accelerated).replaced) == 3  # the embeddings and two layers
    ids, mask = padded_batch(97, side=side)

    def run(m):
        out = _first_tensor(m(input_ids=ids, attention_mask=mask))
        return out * mask[..., None] if out.dim() == 3 and out.shape[1] == ids.shape[1] else out

    assert_same_outputs_and_grads(original, accelerated, run)


def test_multiple_choice_head():
    torch.manual_seed(0)
    model = transformers.BertForMultipleChoice(bert_config()).eval()
    original, accelerated = twin(model)
    ids, mask = padded_batch(97, batch=4, length=9)
    ids, mask = ids.view(2, 2, 9), mask.view(2, 2, 9)
    assert_same_outputs_and_grads(original, accelerated,
                                  lambda m: m(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", ["RobertaForMaskedLM", "XLMRobertaForSequenceClassification",
                                    "ElectraForMaskedLM"])
def test_other_bert_shaped_families(family):
    torch.manual_seed(0)
    config_cls = getattr(transformers, family.replace("ForMaskedLM", "Config").replace(
        "ForSequenceClassification", "Config"))
    config = config_cls(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=600, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=1,
                        **({"embedding_size": 64} if family.startswith("Electra") else {}))
    model = getattr(transformers, family)(config).eval()
    original, accelerated = twin(model)
    assert len(fastpatch.report(accelerated).replaced) == 3, str(fastpatch.report(accelerated))
    ids, mask = padded_batch(97, pad_id=1)
    assert_same_outputs_and_grads(original, accelerated,
                                  lambda m: m(input_ids=ids, attention_mask=mask).logits * (
                                      mask[..., None] if family.endswith("MaskedLM") else 1))


@pytest.mark.parametrize("length", [1, 2, 129, 512])
def test_lengths(length):
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    original, accelerated = twin(model)
    ids, mask = padded_batch(97, batch=2, length=length)
    assert_same_outputs_and_grads(
        original, accelerated,
        lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None])


def test_eager_attention_implementation_masks():
    torch.manual_seed(0)
    config = bert_config()
    config._attn_implementation = "eager"
    model = transformers.BertModel(config).eval()
    original, accelerated = twin(model)
    ids, mask = padded_batch(97)
    assert_same_outputs_and_grads(
        original, accelerated,
        lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None])


def test_hidden_states_and_attentions_are_still_collected():
    torch.manual_seed(0)
    config = bert_config()
    config._attn_implementation = "eager"  # sdpa returns no attention probabilities at all
    original, accelerated = twin(transformers.BertModel(config).eval())
    ids, mask = padded_batch(97)
    a = original(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    b = accelerated(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert_close_relative(hb, ha, 1e-5, "hidden state")
    assert len(b.attentions) == 2
    for aa, ab in zip(a.attentions, b.attentions):
        assert_close_relative(ab, aa, 1e-5, "attention probabilities")


def test_state_dict_keys_save_pretrained_roundtrip_and_revert(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config()).eval()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    fastpatch.accelerate(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    ids, mask = padded_batch(97)
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    vanilla = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert not any(type(m).__name__.startswith("Fused") for m in vanilla.modules())
    assert_close_relative(vanilla(input_ids=ids, attention_mask=mask).logits, expected, 1e-5)
    # a vanilla checkpoint loads into an accelerated model
    other = fastpatch.accelerate(transformers.BertForMaskedLM(bert_config()).eval())
    other.load_state_dict(vanilla.state_dict())
    assert_close_relative(other(input_ids=ids, attention_mask=mask).logits, expected, 1e-5)
    fastpatch.revert(model)
    assert type(model.bert.encoder.layer[0]) is transformers.models.bert.modeling_bert.BertLayer
    assert_close_relative(model(input_ids=ids, attention_mask=mask).logits, expected, 1e-5)
    assert not fastpatch.report(model).replaced


def test_training_parity_30_adamw_steps():
    torch.manual_seed(0)
    original, accelerated = twin(transformers.BertForMaskedLM(bert_config()).train())
    opt_a = torch.optim.AdamW(original.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(accelerated.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        ids, mask = padded_batch(97, batch=4, length=16, seed=step)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        losses = []
        for model, opt in ((original, opt_a), (accelerated, opt_b)):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)


def test_dropout_training_mode_statistics():
    torch.manual_seed(0)
    config = bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = fastpatch.accelerate(transformers.BertModel(config).train())
    ids, mask = padded_batch(97)
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(5)
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    c = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                       model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_unsupported_layers_are_reported_and_strict_raises():
    config = bert_config(hidden_act="quick_gelu")
    model = transformers.BertModel(config)
    fastpatch.accelerate(model)
    rep = fastpatch.report(model)
    assert list(rep.replaced) == ["embeddings"] and len(rep.skipped) == 2
    assert all("hidden_act" in reason for reason in rep.skipped.values())
    assert "hidden_act" in str(rep)
    with pytest.raises(fastpatch.UnsupportedModelError, match="hidden_act"):
        fastpatch.accelerate(transformers.BertModel(config), strict=True)


def test_model_without_supported_layers_is_returned_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    assert fastpatch.accelerate(model) is model
    rep = fastpatch.report(model)
    assert not rep.replaced and "nothing was replaced" in str(rep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(fastpatch.UnsupportedModelError):
        fastpatch.accelerate(model, strict=True)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastpatch.accelerate("bert")
    with pytest.raises(TypeError, match="dtype"):
        fastpatch.accelerate(transformers.BertModel(bert_config()), dtype="fp16")


def test_inference_reuses_the_qkv_concatenation_until_weights_change():
    torch.manual_seed(0)
    model = fastpatch.accelerate(transformers.BertModel(bert_config()).eval())
    ids, mask = padded_batch(97)
    cache = getattr(model.encoder.layer[0], "_fastpatch").qkv_cache
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        cached = cache._entries["weight"][1]
        model(input_ids=ids, attention_mask=mask)
        assert cache._entries["weight"][1] is cached  # reused, not concatenated again
        model.encoder.layer[0].attention.self.query.weight.add_(0.5)  # in-place update
        changed = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert cache._entries["weight"][1] is not cached
    reference = copy.deepcopy(model)
    fastpatch.revert(reference)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(first, changed)
    assert_close_relative(changed, expected, 1e-5)


class _LoraLikeLinear(torch.nn.Linear):
    """A subclass whose forward adds a low-rank update, as adapter libraries do."""

    def __init__(self, base):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.delta = torch.nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return super().forward(x) + self.delta(x)


@pytest.mark.parametrize("name", ["attention.self.value", "output.dense"])
def test_adapter_wrapped_projections_are_reported_not_bypassed(name):
    original = transformers.BertModel(bert_config()).eval()
    parent, _, child = name.rpartition(".")
    layer = original.encoder.layer[1]
    setattr(layer.get_submodule(parent), child, _LoraLikeLinear(layer.get_submodule(name)))
    accelerated = fastpatch.accelerate(copy.deepcopy(original))
    report = fastpatch.report(accelerated)
    assert f"{name} is test_bert._LoraLikeLinear, not a plain torch.nn" in report.skipped["encoder.layer.1"]
    assert "encoder.layer.0" in report.replaced
    ids, mask = padded_batch(97, batch=3, length=9, side="right")
    with torch.no_grad():
        assert_close_relative(accelerated(ids, mask).last_hidden_state,
                              original(ids, mask).last_hidden_state, 1e-5, "hidden")
