"""accelerate() on BART-shaped encoder-decoders (BART, Marian, mBART and their twins) against the
originals: padded parity of outputs and every gradient, training, generate() through
``EncoderDecoderCache``, checkpoints, revert and the reported knobs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastpatch  # noqa: E402
from helpers import assert_same_outputs_and_grads, padded_batch, twin  # noqa: E402
from numerics import assert_close_relative, assert_within_factor_of_torch  # noqa: E402

VOCAB, PAD, BOS, EOS = 101, 1, 0, 2
POST_LN = ["Bart", "PLBart", "Marian", "BlenderbotSmall"]
PRE_LN = ["MBart", "Blenderbot", "Pegasus", "M2M100"]
# Generation tests use larger weights: at the default init_std a tiny random model repeats
# one token. (Parity tests keep the default: larger weights make fp32 itself noisier than 1e-5.)
SHARP = dict(init_std=0.2)


def config(family="Bart", **overrides):
    """A tiny config: odd head size (40 / 4 heads), dropout off, long positions."""
    kwargs = dict(vocab_size=VOCAB, d_model=40, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=72,
                  decoder_ffn_dim=72, max_position_embeddings=600, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
                  bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
                  forced_eos_token_id=None)
    kwargs.update(overrides)
    return getattr(transformers, f"{family}Config")(**kwargs)


def model(cls_name, family=None, **overrides):
    family = family or next(f for f in sorted(POST_LN + PRE_LN, key=len, reverse=True)
                            if cls_name.startswith(f))
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config(family, **overrides)).eval()


def seq2seq_batch(side="right", batch=3, src_len=11, tgt_len=9, seed=0):
    """Encoder ids/mask padded on ``side``, decoder ids/mask padded on the other side."""
    ids, mask = padded_batch(VOCAB, batch=batch, length=src_len, side=side, pad_id=PAD, seed=seed)
    other = "left" if side == "right" else "right"
    dec, dec_mask = padded_batch(VOCAB, batch=batch, length=tgt_len, side=other, pad_id=PAD,
                                 seed=seed + 100)
    return ids, mask, dec, dec_mask


def _with_eos(ids, mask):
    """One EOS per row on its last token, as the sequence classification head requires."""
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return ids.scatter(1, last[:, None], EOS)


def _run(name, ids, mask, dec, dec_mask):
    """The output of one head as one tensor, padded positions zeroed."""
    def run(m):
        if name.endswith("ForCausalLM"):
            return m(input_ids=dec, attention_mask=dec_mask).logits * dec_mask[..., None]
        if name.endswith("ForSequenceClassification"):
            return m(input_ids=_with_eos(ids, mask), attention_mask=mask).logits
        out = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask)
        if name.endswith("Model") and not name.endswith("MTModel"):
            return torch.cat([out.last_hidden_state * dec_mask[..., None],
                              out.encoder_last_hidden_state * mask[..., None]], dim=1)
        return out.logits * dec_mask[..., None]

    return run


def _replaced(m):
    rep = fastpatch.report(m)
    return len(rep.replaced), len(rep.skipped)


HEADS = ["BartModel", "BartForConditionalGeneration", "BartForSequenceClassification",
         "BartForCausalLM", "MarianMTModel", "MBartForConditionalGeneration"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_heads_match_original(head, side):
    original, accelerated = twin(model(head))
    assert _replaced(accelerated) == ((2, 0) if head.endswith("ForCausalLM") else (4, 0))
    assert_same_outputs_and_grads(original, accelerated, _run(head, *seq2seq_batch(side)))


@pytest.mark.parametrize("family", ["PLBart", "BlenderbotSmall", "Blenderbot", "Pegasus", "M2M100"])
def test_other_bart_shaped_families(family):
    head = f"{family}ForConditionalGeneration"
    original, accelerated = twin(model(head, family))
    assert _replaced(accelerated) == (4, 0), str(fastpatch.report(accelerated))
    assert_same_outputs_and_grads(original, accelerated, _run(head, *seq2seq_batch("left")))


@pytest.mark.parametrize("head,length", [("BartForConditionalGeneration", 1),
                                         ("BartForConditionalGeneration", 2),
                                         ("BartForConditionalGeneration", 129),
                                         ("BartForConditionalGeneration", 512),
                                         ("MBartForConditionalGeneration", 1),
                                         ("MBartForConditionalGeneration", 512)])
def test_lengths(head, length):
    original, accelerated = twin(model(head))
    batch = seq2seq_batch("right", batch=2, src_len=length, tgt_len=length, seed=length)
    assert_same_outputs_and_grads(original, accelerated, _run(head, *batch))


@pytest.mark.parametrize("family", ["Bart", "MBart"])
def test_eager_attention_masks(family):
    head = f"{family}ForConditionalGeneration"
    m = model(head)
    m.set_attn_implementation("eager")
    original, accelerated = twin(m)
    assert _replaced(accelerated) == (4, 0)
    assert_same_outputs_and_grads(original, accelerated, _run(head, *seq2seq_batch("left")))


@pytest.mark.parametrize("family", ["Bart", "MBart"])
def test_decoder_layer_with_2d_padding_masks_as_flash_attention_passes_them(family):
    """flash-attention implementations hand the layers [B, S] masks (1 = token) and rely on the
    attention's causal flag; the fused layer reads them as the 4D masks SDPA gets."""
    m = model(f"{family}ForConditionalGeneration")
    original = m.model.decoder.layers[0]
    fused = copy.deepcopy(m)
    fastpatch.accelerate(fused)
    fused = fused.model.decoder.layers[0]
    _, src_mask, _, tgt_mask = seq2seq_batch("left", tgt_len=9, src_len=11)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 40, generator=g, requires_grad=True)
    memory = torch.randn(3, 11, 40, generator=g, requires_grad=True)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    self_4d = causal[None, None] & tgt_mask.bool()[:, None, None, :]
    cross_4d = src_mask.bool()[:, None, None, :]
    keep = tgt_mask[..., None]
    expected = original(x, self_4d, memory, encoder_attention_mask=cross_4d) * keep
    got = fused(x, tgt_mask, memory, encoder_attention_mask=src_mask) * keep
    assert_close_relative(got, expected, 1e-5, "output")
    w = torch.randn(expected.shape, generator=g)
    grads_a = torch.autograd.grad((expected * w).sum(), (x, memory))
    grads_b = torch.autograd.grad((got * w).sum(), (x, memory))
    for a, b, what in zip(grads_a, grads_b, ("x", "memory")):
        assert_close_relative(b, a, 1e-5, f"grad of {what}")


def test_hidden_states_and_attentions_are_still_collected():
    m = model("BartForConditionalGeneration")
    m.set_attn_implementation("eager")  # sdpa returns no attention probabilities at all
    original, accelerated = twin(m)
    ids, mask, dec, dec_mask = seq2seq_batch("right")
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                  decoder_attention_mask=dec_mask, output_hidden_states=True)
    a = original(**kwargs, output_attentions=True)
    b = accelerated(**kwargs, output_attentions=True)
    for key in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions",
                "decoder_attentions", "cross_attentions"):
        assert len(getattr(a, key)) == len(getattr(b, key)) > 0, key
        for ta, tb in zip(getattr(a, key), getattr(b, key)):
            assert_close_relative(tb, ta, 1e-5, key)
    # requested through the config, as transformers' output recorder also reads it
    accelerated.config.output_attentions = True
    c = accelerated(**kwargs)
    assert len(c.cross_attentions) == 2
    assert_close_relative(c.cross_attentions[1], a.cross_attentions[1], 1e-5, "cross attention")
    # without attentions, hidden states come from the fused layers
    d = accelerated(**kwargs, output_attentions=False)
    assert d.cross_attentions is None or len(d.cross_attentions) == 0
    for ta, tb in zip(a.decoder_hidden_states, d.decoder_hidden_states):
        assert_close_relative(tb, ta, 1e-5, "decoder hidden state")


def _original_attention_calls(m):
    """Counts calls of the original attention modules (the fused layers never make any)."""
    calls = []
    for name, module in m.named_modules():
        if type(module).__name__.endswith("Attention"):
            module.register_forward_hook(lambda *_, n=name: calls.append(n))
    return calls


@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "MBartForConditionalGeneration",
                                  "MarianMTModel"])
def test_greedy_generation_identical_with_padded_batch(head):
    original, accelerated = twin(model(head, **SHARP))
    calls = _original_attention_calls(accelerated)
    ids, mask = padded_batch(VOCAB, batch=3, length=9, side="right", pad_id=PAD, seed=5)
    # no_repeat_ngram_size=1 makes every step's choice depend on more than a repeated argmax
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  no_repeat_ngram_size=1)
    a = original.generate(ids, **kwargs)
    b = accelerated.generate(ids, **kwargs)
    assert a.shape[1] == 13
    assert torch.equal(a, b)
    assert not calls


def test_generation_with_a_decoder_prompt_and_static_cache():
    """A decoder prompt of several tokens is prefilled in one step; with a static cache SDPA's
    mask-free top-left causal attention over the empty cache slots must be reproduced."""
    original, accelerated = twin(model("BartForConditionalGeneration", **SHARP))
    ids, mask = padded_batch(VOCAB, batch=3, length=9, side="right", pad_id=PAD, seed=6)
    prompt = torch.tensor([[EOS, BOS, 7, 8]] * 3)
    for cache in ("dynamic", "static"):
        kwargs = dict(attention_mask=mask, decoder_input_ids=prompt, max_new_tokens=6,
                      min_new_tokens=6, do_sample=False, cache_implementation=cache)
        expected = original.generate(ids, **kwargs)
        assert torch.equal(accelerated.generate(ids, **kwargs), expected), cache


@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "MBartForConditionalGeneration"])
def test_beam_search_identical_hypotheses_and_scores(head):
    original, accelerated = twin(model(head, **SHARP))
    calls = _original_attention_calls(accelerated)
    ids, mask = padded_batch(VOCAB, batch=2, length=8, side="left", pad_id=PAD, seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, num_beams=4, do_sample=False,
                  num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    a = original.generate(ids, **kwargs)
    b = accelerated.generate(ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores, rtol=1e-4, atol=1e-4)
    assert not calls


@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "MBartForConditionalGeneration"])
def test_training_parity_30_adamw_steps(head):
    original, accelerated = twin(model(head).train())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (original, accelerated)]
    for step in range(30):
        ids, mask, labels, label_mask = seq2seq_batch("right", batch=4, src_len=13, tgt_len=10,
                                                      seed=step)
        labels = labels.masked_fill(label_mask == 0, -100)
        losses = []
        for m, opt in zip((original, accelerated), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)


def test_gradient_checkpointing_still_works():
    original, accelerated = twin(model("BartForConditionalGeneration").train())
    for m in (original, accelerated):
        m.gradient_checkpointing_enable()
    assert_same_outputs_and_grads(original, accelerated,
                                  _run("BartForConditionalGeneration", *seq2seq_batch("left")))


def test_layerdrop_is_honoured_by_the_parent_loop():
    original, accelerated = twin(model("BartForConditionalGeneration", encoder_layers=4,
                                       decoder_layers=4, encoder_layerdrop=0.5,
                                       decoder_layerdrop=0.5).train())
    ids, mask, dec, dec_mask = seq2seq_batch("right")

    def hidden(m, seed):
        torch.manual_seed(seed)
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask).encoder_last_hidden_state

    for seed in range(3):
        assert_close_relative(hidden(accelerated, seed), hidden(original, seed), 1e-5,
                              f"seed {seed}")
    assert not torch.equal(hidden(accelerated, 0), hidden(accelerated, 1))


def test_dropout_training_mode_reproducible():
    m = fastpatch.accelerate(model("BartForConditionalGeneration", dropout=0.1,
                                   attention_dropout=0.1, activation_dropout=0.1).train())
    ids, mask, dec, dec_mask = seq2seq_batch("right")

    def logits():
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask).logits

    torch.manual_seed(5)
    a = logits()
    torch.manual_seed(5)
    b = logits()
    assert torch.equal(a, b) and not torch.equal(a, logits())
    m.eval()
    assert torch.equal(logits(), logits())


@pytest.mark.parametrize("family", ["Bart", "MBart"])
def test_encoder_fp16_clamp(family):
    """Encoder layers clamp fp16 outputs to +-(max - 1000): pre-LN ones on every call, post-LN
    ones once a value overflowed (here through a LayerNorm weight large enough to overflow)."""
    m = model(f"{family}ForConditionalGeneration").half()
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0)).half()
    if family == "MBart":
        x[0, 0, 0] = 65000.0  # the residual stream carries it to the output
    else:
        with torch.no_grad():
            m.model.encoder.layers[0].final_layer_norm.weight.fill_(3e4)
    original = m.model.encoder.layers[0]
    fused = fastpatch.accelerate(copy.deepcopy(m)).model.encoder.layers[0]
    expected, got = original(x, None), fused(x, None)
    limit = torch.tensor(torch.finfo(torch.float16).max - 1000).half()  # 64504 rounds to 64512
    assert expected.abs().max() == got.abs().max() == limit
    assert_close_relative(got.float(), expected.float(), 2e-3)


def test_state_dict_keys_save_pretrained_roundtrip_and_revert(tmp_path):
    m = model("BartForConditionalGeneration")
    keys = {k: v.shape for k, v in m.state_dict().items()}
    fastpatch.accelerate(m)
    assert {k: v.shape for k, v in m.state_dict().items()} == keys
    ids, mask, dec, dec_mask = seq2seq_batch("right")
    run = _run("BartForConditionalGeneration", ids, mask, dec, dec_mask)
    expected = run(m)
    m.save_pretrained(tmp_path)
    vanilla = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert vanilla.config.architectures == ["BartForConditionalGeneration"]
    assert not any(type(x).__name__.startswith("Fused") for x in vanilla.modules())
    assert_close_relative(run(vanilla), expected, 1e-5)
    # a vanilla checkpoint loads into an accelerated model
    other = fastpatch.accelerate(transformers.BartForConditionalGeneration(config()).eval())
    other.load_state_dict(vanilla.state_dict())
    assert_close_relative(run(other), expected, 1e-5)
    fastpatch.revert(m)
    bart = transformers.models.bart.modeling_bart
    assert type(m.model.encoder.layers[0]) is bart.BartEncoderLayer
    assert type(m.model.decoder.layers[0]) is bart.BartDecoderLayer
    assert_close_relative(run(m), expected, 1e-5)
    assert not fastpatch.report(m).replaced


def test_attention_implementation_switched_after_accelerate():
    original, accelerated = twin(model("BartForConditionalGeneration"))
    for m in (original, accelerated):
        m.set_attn_implementation("eager")
    assert_same_outputs_and_grads(original, accelerated,
                                  _run("BartForConditionalGeneration", *seq2seq_batch("left")))


def test_unsupported_layers_are_reported_and_strict_raises():
    m = model("BartForConditionalGeneration", activation_function="quick_gelu")
    fastpatch.accelerate(m)
    rep = fastpatch.report(m)
    assert not rep.replaced and len(rep.skipped) == 4
    assert all("activation_function" in reason for reason in rep.skipped.values())
    assert "activation_function" in str(rep)
    with pytest.raises(fastpatch.UnsupportedModelError, match="activation_function"):
        fastpatch.accelerate(model("BartForConditionalGeneration", activation_function="tanh"),
                             strict=True)


def test_unsupported_attention_implementation_and_wrapped_projections_are_reported():
    m = model("BartForConditionalGeneration")
    m.config._attn_implementation = "flex_attention"  # BlockMask masks
    fastpatch.accelerate(m)
    assert all("flex_attention" in r for r in fastpatch.report(m).skipped.values())
    m = model("MBartForConditionalGeneration")
    lora_like = torch.nn.Sequential(m.model.decoder.layers[1].encoder_attn.k_proj)
    m.model.decoder.layers[1].encoder_attn.k_proj = lora_like
    fastpatch.accelerate(m)
    rep = fastpatch.report(m)
    assert len(rep.replaced) == 3
    assert "nn.Linear" in rep.skipped["model.decoder.layers.1"]


# ------------------------------------------------------------------------------------- GPU
HALF = [torch.float16, torch.bfloat16]
WIDE = dict(d_model=256, encoder_attention_heads=8, decoder_attention_heads=8,
            encoder_ffn_dim=1024, decoder_ffn_dim=1024, init_std=0.02)


def _loss_and_grads(m, batch):
    ids, mask, dec, dec_mask = batch
    logits = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
               decoder_attention_mask=dec_mask).logits
    target = dec.masked_fill(dec_mask == 0, -100)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten()).backward()
    # a key bias shifts every score of a row equally: its exact gradient is zero, and the
    # relative error of rounding noise says nothing
    return ((logits * dec_mask[..., None]).double(),
            {n: p.grad.double() for n, p in m.named_parameters()
             if p.grad is not None and not n.endswith("k_proj.bias")})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "MBartForConditionalGeneration"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cuda_half_precision_within_factor_of_torch(dtype, head, side):
    base = model(head, **WIDE).cuda()
    batch = [t.cuda() for t in seq2seq_batch(side, batch=6, src_len=67, tgt_len=45)]
    reference = _loss_and_grads(copy.deepcopy(base).double(), batch)
    plain = _loss_and_grads(copy.deepcopy(base).to(dtype), batch)
    fused_model = fastpatch.accelerate(copy.deepcopy(base).to(dtype))
    assert fastpatch.report(fused_model).fully_accelerated
    fused = _loss_and_grads(fused_model, batch)
    assert_within_factor_of_torch(fused[0], plain[0], reference[0], f"logits {dtype}")
    for name, grad in reference[1].items():
        assert_within_factor_of_torch(fused[1][name], plain[1][name], grad, f"grad of {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("length", [1, 8192])
def test_cuda_lengths_bf16(length):
    """One token to 8192 tokens; the reference is fp32 (an fp64 one would run SDPA's math
    backend and hold every [8192, 8192] score matrix for the backward)."""
    base = model("BartForConditionalGeneration", max_position_embeddings=8200, encoder_layers=1,
                 decoder_layers=1, **WIDE).cuda()
    batch = [t.cuda() for t in seq2seq_batch("right", batch=2, src_len=length, tgt_len=length)]
    reference = _loss_and_grads(copy.deepcopy(base), batch)
    plain = _loss_and_grads(copy.deepcopy(base).bfloat16(), batch)
    fused = _loss_and_grads(fastpatch.accelerate(copy.deepcopy(base).bfloat16()), batch)
    assert_within_factor_of_torch(fused[0], plain[0], reference[0], f"logits, length {length}")
    for name, grad in reference[1].items():
        assert_within_factor_of_torch(fused[1][name], plain[1][name], grad, f"grad of {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "MBartForConditionalGeneration"])
def test_cuda_greedy_and_beam_generation_fp32(head):
    """Same tokens as the original on the GPU in fp32; SDPA may pick another backend for the
    fused layers' masks, so a flip is allowed only at a near-tie of the original's scores."""
    original, accelerated = twin(model(head, **SHARP).cuda())
    ids, mask = (t.cuda() for t in padded_batch(VOCAB, batch=4, length=15, side="right",
                                                pad_id=PAD, seed=9))
    kwargs = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    a, b = original.generate(ids, **kwargs), accelerated.generate(ids, **kwargs)
    for row in range(ids.shape[0]):
        diff = (a.sequences[row] != b.sequences[row]).nonzero()
        if len(diff):
            step = diff[0].item() - 1  # sequences start with the decoder start token
            scores = a.scores[step][row]
            gap = scores[a.sequences[row, step + 1]] - scores[b.sequences[row, step + 1]]
            assert gap.abs().item() < 1e-4, f"row {row} differs at step {step} (gap {gap.item()})"
    beams = dict(attention_mask=mask, max_new_tokens=10, num_beams=4, do_sample=False,
                 output_scores=True, return_dict_in_generate=True)
    a, b = original.generate(ids, **beams), accelerated.generate(ids, **beams)
    same = (a.sequences == b.sequences).all(dim=1)
    assert same.float().mean().item() >= 0.75
    torch.testing.assert_close(b.sequences_scores[same], a.sequences_scores[same], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.cuda
def test_cuda_torch_compile_and_bf16_autocast_training_step():
    m = fastpatch.accelerate(model("BartForConditionalGeneration", **WIDE).cuda().train())
    batch = seq2seq_batch("left", batch=4, src_len=33, tgt_len=21)
    ids, mask, dec, dec_mask = (t.cuda() for t in batch)
    labels = dec.masked_fill(dec_mask == 0, -100)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    m.eval()
    compiled = torch.compile(m)
    with torch.no_grad():
        eager = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        traced = compiled(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close_relative(traced, eager, 1e-4, "compiled logits")
