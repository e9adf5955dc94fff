"""accelerate() on Hugging Face embeddings (BERT/RoBERTa-shaped) and LM-head losses.

The embeddings run ``fastpatch.ops.transformer_embedding`` on the module's own tables; the LM
losses run the fused cross-entropy with transformers 5's semantics (label shift, -100,
``num_items_in_batch``). Everything is compared against the untouched original model.
"""
import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from fastpatch.integrations.huggingface.loss import (INLINE_LOSS_HEADS,  # noqa: E402
                                                     LOSS_FUNCTION_HEADS, FusedLossHead,
                                                     fused_causal_lm_loss, fused_masked_lm_loss)
from helpers import assert_same_outputs_and_grads, padded_batch, twin  # noqa: E402
from numerics import assert_close_relative, assert_within_factor_of_torch  # noqa: E402

VOCAB = 97
# family -> pad id (RoBERTa-style vocabularies put <pad> at 1, and positions start after it)
FAMILIES = {"Bert": 0, "Electra": 0, "Roberta": 1, "XLMRoberta": 1, "Camembert": 1,
            "Data2VecText": 1}


def config(family, **overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=36, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, type_vocab_size=3, pad_token_id=FAMILIES[family])
    if family == "Electra":
        kwargs["embedding_size"] = 20  # ELECTRA's embeddings are narrower than its layers
    kwargs.update(overrides)
    return getattr(transformers, f"{family}Config")(**kwargs)


def embeddings_twin(family, **overrides):
    """(original, accelerated) embedding modules of a tiny ``<family>Model``."""
    torch.manual_seed(0)
    original, accelerated = twin(getattr(transformers, f"{family}Model")(config(family, **overrides)).eval())
    assert type(accelerated.embeddings).__name__ == f"Fused{family}Embeddings"
    return original.embeddings, accelerated.embeddings


def lm_labels(ids, mask, seed=0, fraction=0.4):
    """Labels = ids on a random subset of real tokens, -100 elsewhere (padding always -100)."""
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < fraction
    keep[:, 0] = True
    return torch.where(keep & (mask == 1), ids, torch.full_like(ids, -100))


# ----------------------------------------------------------------------------- embeddings
@pytest.fixture
def fused_embedding_calls(monkeypatch):
    """Counts the adapter's calls of the fused embedding op (a fallback makes none)."""
    from fastpatch.integrations.huggingface import embeddings

    calls = []
    fused = embeddings.transformer_embedding

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(embeddings, "transformer_embedding", spy)
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("inputs", ["ids", "token_types", "positions", "positions_1xL"])
def test_embeddings_match_original(family, side, inputs, fused_embedding_calls):
    original, accelerated = embeddings_twin(family)
    ids, _ = padded_batch(VOCAB, batch=3, length=13, side=side, pad_id=FAMILIES[family])
    kwargs = {}
    g = torch.Generator().manual_seed(3)
    if inputs == "token_types":
        kwargs["token_type_ids"] = torch.randint(0, 3, ids.shape, generator=g)
    elif inputs == "positions":
        kwargs["position_ids"] = torch.randint(0, 64, ids.shape, generator=g)
    elif inputs == "positions_1xL":
        kwargs["position_ids"] = torch.arange(5, 18).unsqueeze(0)
    assert_same_outputs_and_grads(original, accelerated, lambda m: m(input_ids=ids, **kwargs))
    assert fused_embedding_calls == [ids.shape]


def _cache_length_argument(module) -> str:
    """The installed transformers' name of the cached-tokens offset (renamed within 5.x)."""
    return tuple(inspect.signature(type(module).forward).parameters)[-1]


@pytest.mark.parametrize("family", ["Bert", "Roberta"])
def test_embeddings_past_key_values_length(family, fused_embedding_calls):
    original, accelerated = embeddings_twin(family)
    ids, _ = padded_batch(VOCAB, batch=2, length=4, side="left", pad_id=FAMILIES[family])
    offset = {_cache_length_argument(original): 5}
    assert_same_outputs_and_grads(original, accelerated, lambda m: m(input_ids=ids, **offset))
    assert fused_embedding_calls == [ids.shape]


@pytest.mark.parametrize("family", ["Bert", "Roberta"])
def test_embeddings_compile_fullgraph(family):
    original, accelerated = embeddings_twin(family)
    ids, _ = padded_batch(VOCAB, batch=3, length=9, side="left", pad_id=FAMILIES[family])
    compiled = torch.compile(accelerated, backend="aot_eager", fullgraph=True)
    for kwargs in ({}, {_cache_length_argument(original): 2, "token_type_ids": torch.ones_like(ids)}):
        assert_close_relative(compiled(input_ids=ids, **kwargs).detach(),
                              original(input_ids=ids, **kwargs).detach(), 1e-5, "compiled output")


def test_roberta_positions_are_padding_aware():
    """A left-padded row embeds its tokens as the same row without padding does (fairseq)."""
    _, accelerated = embeddings_twin("Roberta")
    tokens = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), tokens], dim=1)  # pad id 1
    with torch.no_grad():
        torch.testing.assert_close(accelerated(input_ids=padded)[:, 3:], accelerated(input_ids=tokens),
                                   rtol=1e-6, atol=1e-6)


def test_embeddings_token_type_buffer_is_honoured():
    """Omitted token types are read from the module's buffer, as transformers does."""
    original, accelerated = embeddings_twin("Bert")
    for m in (original, accelerated):
        m.token_type_ids[:, 4:] = 2
    ids, _ = padded_batch(VOCAB, batch=2, length=9)
    assert_same_outputs_and_grads(original, accelerated, lambda m: m(input_ids=ids))


def test_embeddings_fall_back_to_original_where_the_kernel_does_not_apply(fused_embedding_calls):
    original, accelerated = embeddings_twin("Roberta")
    embeds = torch.randn(2, 7, 36, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(accelerated(inputs_embeds=embeds), original(inputs_embeds=embeds))
        # 1-D position ids broadcast in eager transformers; the kernel takes [B, L] / [1, L]
        kwargs = dict(position_ids=torch.arange(2, 9), token_type_ids=torch.zeros_like(ids))
        assert torch.equal(accelerated(input_ids=ids, **kwargs), original(input_ids=ids, **kwargs))
        for m in (original, accelerated):  # tables of mixed dtypes: eager's own type promotion
            m.word_embeddings.double(), m.LayerNorm.double()
        assert torch.equal(accelerated(input_ids=ids), original(input_ids=ids))
    assert fused_embedding_calls == []


def test_embeddings_dropout_statistics_and_reproducibility():
    original, accelerated = embeddings_twin("Bert", hidden_dropout_prob=0.25)
    accelerated.train()
    ids = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.manual_seed(11)
        a = accelerated(input_ids=ids)
        torch.manual_seed(11)
        b = accelerated(input_ids=ids)
        c = accelerated(input_ids=ids)
        assert torch.equal(a, b) and not torch.equal(a, c)
        dropped = (a == 0).float().mean().item()
        assert abs(dropped - 0.25) < 0.02, dropped
        # the survivors are the eval output scaled by 1 / (1 - p)
        expected = original.eval()(input_ids=ids) / 0.75
        kept = a != 0
        torch.testing.assert_close(a[kept], expected[kept], rtol=1e-5, atol=1e-6)


def test_unsupported_embeddings_are_reported_with_the_knob():
    torch.manual_seed(0)
    model = transformers.BertModel(config("Bert"))
    model.embeddings.word_embeddings.max_norm = 1.0
    fastpatch.accelerate(model)
    assert "max_norm" in fastpatch.report(model).skipped["embeddings"]
    model = transformers.RobertaModel(config("Roberta"))
    model.embeddings.position_embedding_type = "relative_key"
    fastpatch.accelerate(model)
    assert "position_embedding_type" in fastpatch.report(model).skipped["embeddings"]


def test_decoder_generation_reaches_past_key_values_length():
    """BERT as a decoder: its layers stay original (is_decoder), its embeddings are fused and
    see past_key_values_length > 0 during cached greedy decoding."""
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(config("Bert", is_decoder=True)).eval()
    original, accelerated = twin(model)
    assert "bert.embeddings" in fastpatch.report(accelerated).replaced
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(accelerated.generate(ids, **kwargs), original.generate(ids, **kwargs))


# ---------------------------------------------------------------------- loss functions
def _logits_and_labels(batch=3, length=7, vocab=53, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    return logits, labels


def _value_and_grad(fn, logits, *args, **kwargs):
    logits.grad = None
    loss = fn(logits, *args, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("variant", ["mean", "num_items_tensor", "num_items_int", "shift_labels",
                                     "ignore_index"])
def test_causal_lm_loss_is_transformers_for_causal_lm_loss(variant):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = _logits_and_labels()
    kwargs = {}
    if variant == "num_items_tensor":
        kwargs["num_items_in_batch"] = torch.tensor(9)
    elif variant == "num_items_int":
        kwargs["num_items_in_batch"] = 9
    elif variant == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, 2, dims=1)
    elif variant == "ignore_index":
        kwargs["ignore_index"] = 5
        labels = labels.masked_fill(labels == -100, 5)
    expected, grad_expected = _value_and_grad(ForCausalLMLoss, logits, labels, 53, **kwargs)
    actual, grad_actual = _value_and_grad(fused_causal_lm_loss, logits, labels, 53,
                                          output_attentions=False, **kwargs)
    assert actual.dtype == expected.dtype == torch.float32
    assert_close_relative(actual, expected, 1e-6, "loss")
    assert_close_relative(grad_actual, grad_expected, 1e-6, "grad of logits")


def test_causal_lm_loss_half_logits_give_fp32_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = _logits_and_labels(dtype=torch.bfloat16)
    expected, grad_expected = _value_and_grad(ForCausalLMLoss, logits, labels, 53)
    actual, grad_actual = _value_and_grad(fused_causal_lm_loss, logits, labels, 53)
    assert actual.dtype == torch.float32 and grad_actual.dtype == torch.bfloat16
    assert_close_relative(actual, expected, 1e-6, "loss")
    assert_close_relative(grad_actual.float(), grad_expected.float(), 1e-2, "grad of logits")


@pytest.mark.parametrize("autocast", [False, True])
def test_masked_lm_loss_is_cross_entropy_loss(autocast):
    logits, labels = _logits_and_labels(dtype=torch.bfloat16 if autocast else torch.float32)
    eager = torch.nn.CrossEntropyLoss()

    def hf(x, y, v):
        return eager(x.view(-1, v), y.view(-1))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, grad_expected = _value_and_grad(hf, logits, labels, 53)
        actual, grad_actual = _value_and_grad(fused_masked_lm_loss, logits, labels, 53)
    assert actual.dtype == expected.dtype
    assert_close_relative(actual, expected, 1e-6, "loss")
    assert_close_relative(grad_actual.float(), grad_expected.float(), 1e-2 if autocast else 1e-6,
                          "grad of logits")


def test_all_ignored_labels_give_nan_like_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, _ = _logits_and_labels()
    labels = torch.full((3, 7), -100)
    assert torch.isnan(fused_causal_lm_loss(logits, labels, 53))
    assert torch.isnan(ForCausalLMLoss(logits, labels, 53))
    assert torch.isnan(fused_masked_lm_loss(logits, labels, 53))


# ---------------------------------------------------------------------- loss in models
def lm_model(head, **overrides):
    torch.manual_seed(0)
    if head == "GPT2LMHeadModel":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    else:
        if head in LOSS_FUNCTION_HEADS:
            overrides.setdefault("is_decoder", True)
        cfg = config(_family(head), num_hidden_layers=2, **overrides)
    return getattr(transformers, head)(cfg).eval()


def _family(head):
    return next(family for family in FAMILIES if head.startswith(family))


def _batch(head, side="right", seed=0, batch=3, length=13):
    pad = 0 if head.startswith("GPT2") else FAMILIES[_family(head)]
    ids, mask = padded_batch(VOCAB, batch=batch, length=length, side=side, pad_id=pad, seed=seed)
    return ids, mask, lm_labels(ids, mask, seed)


def _loss(head, ids, mask, labels, **kwargs):
    extra = {}
    if head == "BertForPreTraining":
        extra["next_sentence_label"] = torch.arange(ids.shape[0], device=ids.device) % 2
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, **extra, **kwargs).loss


LM_HEADS = list(INLINE_LOSS_HEADS) + list(LOSS_FUNCTION_HEADS)


@pytest.fixture
def vocab_sized_cross_entropy_calls(monkeypatch):
    """Class counts of every ``F.cross_entropy`` call (eager transformers' loss path)."""
    calls = []
    eager = torch.nn.functional.cross_entropy

    def spy(input, target, *args, **kwargs):
        calls.append(input.shape[-1])
        return eager(input, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    return calls


@pytest.mark.parametrize("head", LM_HEADS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_lm_head_loss_and_grads_match_original(head, side, vocab_sized_cross_entropy_calls):
    original, accelerated = twin(lm_model(head))
    rep = fastpatch.report(accelerated)
    assert any(note.startswith(f"loss: {head}") and "fused" in note for note in rep.notes), str(rep)
    ids, mask, labels = _batch(head, side)
    assert_same_outputs_and_grads(original, accelerated, _loss(head, ids, mask, labels))
    calls = vocab_sized_cross_entropy_calls
    # the original called F.cross_entropy over the vocabulary once, the fused model never
    assert calls.count(VOCAB) == 1, calls


def test_gpt2_loss_with_num_items_in_batch():
    original, accelerated = twin(lm_model("GPT2LMHeadModel"))
    ids, mask, labels = _batch("GPT2LMHeadModel")
    for items in (torch.tensor(11), 11):
        assert_same_outputs_and_grads(original, accelerated,
                                      _loss("GPT2LMHeadModel", ids, mask, labels, num_items_in_batch=items))


def test_masked_lm_positional_labels_tuple_outputs_and_no_labels():
    original, accelerated = twin(lm_model("BertForMaskedLM"))
    ids, mask, labels = _batch("BertForMaskedLM")
    # labels is the 8th argument of BertForMaskedLM.forward
    args = (ids, mask, None, None, None, None, None, labels)
    a = original(*args, return_dict=False)
    b = accelerated(*args, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a) == 2
    assert_close_relative(b[0], a[0], 1e-5, "loss")
    assert_close_relative(b[1], a[1], 1e-5, "logits")
    out = accelerated(input_ids=ids, attention_mask=mask)
    assert out.loss is None and list(out.keys()) == ["logits"]
    out = accelerated(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert list(out.keys()) == ["loss", "logits", "hidden_states"]


def test_pretraining_without_next_sentence_label_has_no_loss():
    original, accelerated = twin(lm_model("BertForPreTraining"))
    ids, mask, labels = _batch("BertForPreTraining")
    assert original(input_ids=ids, labels=labels).loss is None
    assert accelerated(input_ids=ids, labels=labels).loss is None


def test_signature_is_the_original_one():
    """Trainer picks dataset columns and loss kwargs from ``inspect.signature(model.forward)``."""
    for head in ("BertForMaskedLM", "BertForPreTraining"):
        original, accelerated = twin(lm_model(head))
        assert inspect.signature(accelerated.forward) == inspect.signature(original.forward)


def test_custom_loss_function_is_kept():
    model = lm_model("GPT2LMHeadModel")

    def custom(logits, labels, vocab_size, **kwargs):
        return logits.sum() * 0

    model.loss_function = custom
    fastpatch.accelerate(model)
    assert model.loss_function is custom
    assert any("keeps Hugging Face's loss" in note for note in fastpatch.report(model).notes)
    fastpatch.revert(model)
    assert model.loss_function is custom


@pytest.mark.parametrize("head", ["RobertaForMaskedLM", "GPT2LMHeadModel"])
def test_training_parity_30_adamw_steps(head):
    original, accelerated = twin(lm_model(head).train())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (original, accelerated)]
    for step in range(30):
        ids, mask, labels = _batch(head, side="left" if step % 2 else "right", seed=step, batch=4,
                                   length=12)
        losses = []
        for model, opt in zip((original, accelerated), opts):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)


class _CausalDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=10):
        ids, mask = padded_batch(VOCAB, batch=n, length=length, seed=9)
        self.rows = [dict(input_ids=i, attention_mask=m, labels=i.masked_fill(m == 0, -100))
                     for i, m in zip(ids, mask)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_gradient_accumulation_passes_num_items_in_batch(tmp_path):
    """Trainer hands GPT-2 ``num_items_in_batch`` (its forward takes **kwargs): same losses."""
    histories = []
    for accelerate in (False, True):
        model = lm_model("GPT2LMHeadModel").train()
        if accelerate:
            fastpatch.accelerate(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(accelerate)), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3, logging_steps=1,
            report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_CausalDataset())
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        histories.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    assert len(histories[0]) == 4
    for a, b in zip(*histories):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), histories


# --------------------------------------------------------------------- drop-in / revert
@pytest.mark.parametrize("head", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_state_dict_save_pretrained_and_revert(head, tmp_path):
    model = lm_model(head)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    fastpatch.accelerate(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert type(model).__name__ == head
    model.save_pretrained(tmp_path)
    vanilla = getattr(transformers, head).from_pretrained(tmp_path)
    assert vanilla.config.architectures == [head]
    ids, mask, labels = _batch(head)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_close_relative(vanilla(input_ids=ids, attention_mask=mask, labels=labels).loss, expected, 1e-5)
    fastpatch.revert(model)
    assert type(model) is getattr(transformers, head)
    assert "_loss_function" not in vars(model)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    assert not any(hasattr(m, "_fastpatch") for m in model.modules())
    assert_close_relative(model(input_ids=ids, attention_mask=mask, labels=labels).loss, expected, 1e-5)


def test_report_lists_the_embeddings_and_the_loss():
    model = fastpatch.accelerate(lm_model("RobertaForMaskedLM"))
    rep = fastpatch.report(model)
    assert rep.replaced["roberta.embeddings"] == "FusedRobertaEmbeddings"
    assert len(rep.replaced) == 3 and not rep.skipped
    text = str(rep)
    assert "roberta.embeddings" in text and "note: loss: RobertaForMaskedLM" in text


def test_reaccelerate_keeps_one_fused_root():
    model = fastpatch.accelerate(lm_model("BertForMaskedLM"))
    cls = type(model)
    fastpatch.accelerate(model)
    assert type(model) is cls and isinstance(model, FusedLossHead)
    assert any(note.startswith("loss:") for note in fastpatch.report(model).notes)
    fastpatch.revert(model)
    assert type(model) is transformers.BertForMaskedLM


def test_torch_compile_of_masked_lm_with_labels():
    original, accelerated = twin(lm_model("BertForMaskedLM"))
    ids, mask, labels = _batch("BertForMaskedLM")
    compiled = torch.compile(accelerated, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    expected = original(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_relative(out.loss.detach(), expected.loss.detach(), 1e-5, "loss")
    assert_close_relative(out.logits.detach(), expected.logits.detach(), 1e-5, "logits")


# -------------------------------------------------------------------------------- GPU
HALF = [torch.float16, torch.bfloat16]


def _grads(model, loss):
    loss.backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["Bert", "Roberta"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 127), (1, 8192)])
@pytest.mark.parametrize("hidden", [64, 771, 8192])
def test_cuda_embeddings_half_within_factor_of_torch(family, dtype, shape, hidden):
    torch.manual_seed(0)
    module = getattr(transformers.models, family.lower())
    embeddings = getattr(getattr(module, f"modeling_{family.lower()}"), f"{family}Embeddings")
    base = embeddings(config(family, hidden_size=hidden, max_position_embeddings=8200,
                             vocab_size=1000)).cuda()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, shape, generator=g)
    ids[:, : shape[1] // 3] = FAMILIES[family]  # left padding
    ids = ids.cuda()
    weights = torch.randn((*shape, hidden), generator=g).cuda().double()

    def run(m):
        out = m(input_ids=ids)
        return out.double(), _grads(m, (out.double() * weights).sum())

    reference = run(copy.deepcopy(base).double())
    plain = run(copy.deepcopy(base).to(dtype))
    holder = torch.nn.Module()
    holder.embeddings = copy.deepcopy(base).to(dtype)
    fastpatch.accelerate(holder)
    assert type(holder.embeddings).__name__.startswith("Fused")
    fused = run(holder.embeddings)
    assert_within_factor_of_torch(fused[0], plain[0], reference[0], f"output {dtype}")
    for name, grad in reference[1].items():
        assert_within_factor_of_torch(fused[1][name], plain[1][name], grad, f"grad of {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("head", LM_HEADS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_lm_heads_half_within_factor_of_torch(head, dtype):
    base = lm_model(head).cuda()
    ids, mask, labels = (t.cuda() for t in _batch(head, side="left", batch=4, length=61))

    def run(m):
        loss = _loss(head, ids, mask, labels)(m)
        return loss.double(), _grads(m, loss)

    reference = run(copy.deepcopy(base).double())
    plain = run(copy.deepcopy(base).to(dtype))
    fused_model = fastpatch.accelerate(copy.deepcopy(base).to(dtype))
    fused = run(fused_model)
    expected_dtype = torch.float32 if head in LOSS_FUNCTION_HEADS else dtype  # ForCausalLMLoss upcasts
    assert _loss(head, ids, mask, labels)(fused_model).dtype == expected_dtype
    # a scalar rounded to ``dtype`` by both: one rounding of slack, however lucky eager was
    assert_within_factor_of_torch(fused[0], plain[0], reference[0], f"loss {dtype}",
                                  floor=torch.finfo(dtype).eps)
    for name, grad in reference[1].items():
        if name.endswith("key.bias") or name.endswith("c_attn.bias"):
            continue  # exact gradient zero (shifts every score of a row): rounding noise only
        assert_within_factor_of_torch(fused[1][name], plain[1][name], grad, f"grad of {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_cuda_bf16_autocast_dtypes_and_values_match_eager(head):
    """fp32 master weights under bf16 autocast: same output dtypes as eager (LayerNorm and
    cross-entropy are fp32 ops there), values by the 2-4x rule against fp32."""
    base = lm_model(head).cuda()
    ids, mask, labels = (t.cuda() for t in _batch(head, batch=4, length=61))
    reference = base(input_ids=ids, attention_mask=mask, labels=labels)
    fused_model = fastpatch.accelerate(copy.deepcopy(base))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = base(input_ids=ids, attention_mask=mask, labels=labels)
        fused = fused_model(input_ids=ids, attention_mask=mask, labels=labels)
        if head == "BertForMaskedLM":
            emb_plain = base.bert.embeddings(input_ids=ids)
            emb_fused = fused_model.bert.embeddings(input_ids=ids)
            assert emb_fused.dtype == emb_plain.dtype
    assert fused.loss.dtype == plain.loss.dtype == torch.float32
    assert_within_factor_of_torch(fused.loss.double(), plain.loss.double(), reference.loss.double(),
                                  "loss under autocast")


@pytest.mark.cuda
def test_cuda_bf16_model_autocast_embedding_dtype_matches_eager():
    """bf16 tables under CUDA autocast: eager's LayerNorm returns fp32, so does the fused one."""
    original, accelerated = embeddings_twin("Bert")
    original, accelerated = original.cuda().bfloat16(), accelerated.cuda().bfloat16()
    ids = torch.randint(3, VOCAB, (2, 9), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert accelerated(input_ids=ids).dtype == original(input_ids=ids).dtype == torch.float32


@pytest.mark.cuda
def test_cuda_compile_and_graph_capture_of_fused_embeddings():
    original, accelerated = embeddings_twin("Roberta")
    original, accelerated = original.cuda(), accelerated.cuda()
    ids, _ = padded_batch(VOCAB, batch=4, length=33, side="left", pad_id=1)
    ids = ids.cuda()
    expected = original(input_ids=ids).detach()
    compiled = torch.compile(accelerated, fullgraph=True)
    assert_close_relative(compiled(input_ids=ids).detach(), expected, 1e-5, "compiled output")
    with torch.no_grad():
        static = ids.clone()
        accelerated(input_ids=static)  # warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = accelerated(input_ids=static)
        static.copy_(torch.flip(ids, dims=[0]))
        graph.replay()
        assert_close_relative(out, original(input_ids=static), 1e-5, "graph replay")
