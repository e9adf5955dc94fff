"""accelerate() on GPT-2: training parity, padded batches and generate() through the Cache API."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from helpers import assert_same_outputs_and_grads, padded_batch, twin  # noqa: E402


def gpt2(**overrides):
    kwargs = dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=1100, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("length", [1, 17, 1024])
def test_logits_and_grads_match(side, length):
    original, accelerated = twin(gpt2())
    assert len(fastpatch.report(accelerated).replaced) == 2
    ids, mask = padded_batch(101, batch=2 if length > 100 else 3, length=length, side=side)
    assert_same_outputs_and_grads(
        original, accelerated, lambda m: m(input_ids=ids, attention_mask=mask).logits * mask[..., None])


def test_training_parity_30_adamw_steps():
    original, accelerated = twin(gpt2().train())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (original, accelerated)]
    for step in range(30):
        ids, mask = padded_batch(101, batch=4, length=16, seed=step)
        labels = ids.masked_fill(mask == 0, -100)
        losses = []
        for model, opt in zip((original, accelerated), opts):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)


def test_greedy_generation_identical_with_left_padding():
    original, accelerated = twin(gpt2())
    ids, mask = padded_batch(101, batch=3, length=7, side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    a = original.generate(ids, **kwargs)
    b = accelerated.generate(ids, **kwargs)
    assert torch.equal(a, b)


def test_beam_search_identical_hypotheses_and_scores():
    original, accelerated = twin(gpt2())
    ids, mask = padded_batch(101, batch=2, length=6, side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, num_beams=4, do_sample=False, pad_token_id=0,
                  num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    a = original.generate(ids, **kwargs)
    b = accelerated.generate(ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_still_works():
    original, accelerated = twin(gpt2().train())
    for m in (original, accelerated):
        m.gradient_checkpointing_enable()
    ids, mask = padded_batch(101, batch=2, length=9)
    assert_same_outputs_and_grads(original, accelerated,
                                  lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss)


def test_generate_routed_to_engine_and_checkpoint_stays_vanilla(tmp_path, caplog):
    model = fastpatch.accelerate(gpt2())
    assert type(model).__name__ == "GPT2LMHeadModel"  # saved as "architectures" by transformers
    assert any("decoding engine" in note for note in fastpatch.report(model).notes)
    ids, mask = padded_batch(101, batch=2, length=5, side="left")
    with caplog.at_level("INFO", logger="fastpatch"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert any("fastpatch engine" in r.getMessage() for r in caplog.records)
    model.save_pretrained(tmp_path)
    vanilla = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert vanilla.config.architectures == ["GPT2LMHeadModel"]
    fastpatch.revert(model)
    assert type(model) is transformers.GPT2LMHeadModel
    assert type(model.transformer.h[0]) is transformers.models.gpt2.modeling_gpt2.GPT2Block


def test_adapter_wrapped_conv1d_is_reported_not_bypassed():
    from transformers.pytorch_utils import Conv1D

    class LoraLikeConv1D(Conv1D):
        def forward(self, x):
            return super().forward(x) * 1.5

    original = gpt2()
    block = original.transformer.h[0]
    wrapped = LoraLikeConv1D(*reversed(block.attn.c_attn.weight.shape))
    wrapped.load_state_dict(block.attn.c_attn.state_dict())
    block.attn.c_attn = wrapped
    accelerated = fastpatch.accelerate(copy.deepcopy(original))
    report = fastpatch.report(accelerated)
    assert "attn.c_attn is test_gpt2." in report.skipped["transformer.h.0"]
    assert "LoraLikeConv1D, not a plain transformers.pytorch_utils.Conv1D" in report.skipped["transformer.h.0"]
    ids = torch.randint(0, original.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.allclose(accelerated(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
