"""accelerate() on fairseq transformers against the originals: outputs and gradients on padded
batches, incremental decoding step by step with reorder and shrinking batches, fairseq's
SequenceGenerator (beam, sampling, prefix, alignment), and the knobs that are reported."""
import copy

import pytest
import torch

pytest.importorskip("fairseq")

import fastpatch  # noqa: E402
from fairseq_helpers import dictionary, padded_pair, transformer  # noqa: E402
from numerics import assert_close_relative  # noqa: E402

TOL = 1e-5


def twin(model):
    return model, fastpatch.accelerate(copy.deepcopy(model))


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


CONFIGS = {
    "post_ln_relu": {},
    "pre_ln_gelu": dict(encoder_normalize_before=True, decoder_normalize_before=True,
                        activation_fn="gelu"),
    "gelu_accurate_odd_ffn": dict(activation_fn="gelu_accurate", encoder_ffn_embed_dim=37,
                                  decoder_ffn_embed_dim=37),
    "wider_encoder": dict(encoder_embed_dim=48, encoder_attention_heads=3, decoder_embed_dim=32),
    "pre_ln_final_norms_shared": dict(encoder_normalize_before=True, decoder_normalize_before=True,
                                      share_all_embeddings=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_and_grads_match_padded_batches(name):
    d = dictionary()
    original, fused = twin(transformer(d, **CONFIGS[name]))
    report = fastpatch.report(fused)
    assert report.fully_accelerated and len(report.replaced) == 4, str(report)
    src, lengths, prev, target = padded_pair(d)
    outputs = []
    for model in (original, fused):
        logits, extra = model(src, lengths, prev)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=d.pad())
        loss.backward()
        outputs.append((logits, extra["attn"][0]))
    assert_close_relative(outputs[1][0], outputs[0][0], TOL, "logits")
    assert_close_relative(outputs[1][1], outputs[0][1], TOL, "alignment attention")
    expected = grads(original)
    got = grads(fused)
    assert got.keys() == expected.keys()
    for key in expected:
        if key.endswith("k_proj.bias"):
            # softmax is invariant to the key bias: its gradient is 0 up to rounding noise, and a
            # relative error of noise means nothing
            assert got[key].abs().max() < 1e-6, f"grad of {key} should be ~0"
            continue
        assert_close_relative(got[key], expected[key], 2 * TOL, f"grad of {key}")


def test_state_dict_is_fairseqs_and_revert_restores_classes():
    d = dictionary()
    original, fused = twin(transformer(d))
    assert list(fused.state_dict()) == list(original.state_dict())
    classes = [type(m).__name__ for m in original.modules()]
    fastpatch.revert(fused)
    assert [type(m).__name__ for m in fused.modules()] == classes


def test_encoder_attn_mask_and_no_padding():
    """The encoder layer's optional attn_mask (1 = masked, fairseq's -1e8 fill) and a batch
    without padding (the encoder passes encoder_padding_mask=None then)."""
    d = dictionary()
    original, fused = twin(transformer(d))
    x = torch.randn(6, 2, 32)
    mask = torch.zeros(6, 6)
    mask[:, 4:] = 1
    for layer_pair in zip(original.encoder.layers, fused.encoder.layers):
        a, b = (layer(x, encoder_padding_mask=None, attn_mask=mask) for layer in layer_pair)
        assert_close_relative(b, a, TOL, "encoder layer with attn_mask")
        bool_mask = mask.bool()
        a, b = (layer(x, None, attn_mask=bool_mask) for layer in layer_pair)
        assert_close_relative(b, a, TOL, "encoder layer with bool attn_mask")


def _decode_steps(model, src, lengths, prev, reorders):
    """Logits of incremental decoding, one token at a time, reordering the state as asked."""
    model.eval()
    encoder_out = model.encoder(src, lengths)
    state = {}
    steps = []
    for t in range(prev.shape[1]):
        if t in reorders:
            order = reorders[t]
            model.decoder.reorder_incremental_state_scripting(state, order)
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
            prev = prev.index_select(0, order)
        logits, extra = model.decoder(prev[:, : t + 1], encoder_out, incremental_state=state)
        steps.append((logits, extra["attn"][0]))
    return steps


@pytest.mark.parametrize("pre_ln", [False, True])
def test_incremental_decoding_with_reorder_and_shrinking_batch(pre_ln):
    d = dictionary()
    original, fused = twin(transformer(d, encoder_normalize_before=pre_ln,
                                       decoder_normalize_before=pre_ln))
    src, lengths, prev, _ = padded_pair(d, batch=4, tgt_len=6)
    prev = prev.masked_fill(prev.eq(d.pad()), d.nspecial)  # decoding never feeds padding
    # a beam-style permutation with repeats, then a shrink to 2 rows (finished sentences)
    reorders = {2: torch.tensor([1, 1, 0, 3]), 4: torch.tensor([3, 0])}
    with torch.no_grad():
        expected = _decode_steps(original, src, lengths, prev, reorders)
        got = _decode_steps(fused, src, lengths, prev, reorders)
    for t, ((la, aa), (lb, ab)) in enumerate(zip(expected, got)):
        assert_close_relative(lb, la, TOL, f"logits at step {t}")
        assert_close_relative(ab, aa, TOL, f"attention at step {t}")


@pytest.mark.parametrize("case", ["beam4", "beam4_nbest2_lenpen", "greedy", "sampling", "prefix"])
def test_sequence_generator_hypotheses_identical(case):
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    d = dictionary()
    original, fused = twin(transformer(d))
    src, lengths, _, _ = padded_pair(d, batch=3)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    kwargs = dict(beam_size=4, max_len_b=10, min_len=2)
    prefix = None
    if case == "beam4_nbest2_lenpen":
        kwargs.update(len_penalty=0.6)
    elif case == "greedy":
        kwargs.update(beam_size=1)
    elif case == "sampling":
        kwargs.update(beam_size=2, search_strategy=search.Sampling(d, sampling_topk=5))
    elif case == "prefix":
        prefix = torch.randint(d.nspecial, len(d), (3, 2))
    results = []
    for model in (original, fused):
        model.eval()
        torch.manual_seed(123)  # sampling draws from the global generator
        generator = SequenceGenerator([model], d, **kwargs)
        results.append(generator.generate([model], sample, prefix_tokens=prefix))
    for sentence, (hyps_a, hyps_b) in enumerate(zip(*results)):
        assert len(hyps_a) == len(hyps_b)
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"], b["tokens"]), f"sentence {sentence}"
            assert abs(float(a["score"]) - float(b["score"])) < 1e-5
            assert_close_relative(b["positional_scores"], a["positional_scores"], TOL, "scores")
            assert_close_relative(b["attention"], a["attention"], TOL, "alignment")


def test_decoder_only_language_model():
    """``transformer_lm``: decoder layers without encoder attention."""
    import argparse

    from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture

    d = dictionary()

    class Task:
        source_dictionary = target_dictionary = d

    args = argparse.Namespace(arch="transformer_lm", decoder_embed_dim=32, decoder_ffn_embed_dim=48,
                              decoder_layers=2, decoder_attention_heads=4, dropout=0.0,
                              tokens_per_sample=64, max_target_positions=64)
    base_lm_architecture(args)
    torch.manual_seed(0)
    original, fused = twin(TransformerLanguageModel.build_model(args, Task()))
    assert len(fastpatch.report(fused).replaced) == 2
    tokens = torch.randint(d.nspecial, len(d), (3, 8))
    tokens[2, 5:] = d.pad()
    a, b = original(tokens)[0], fused(tokens)[0]
    assert_close_relative(b, a, TOL, "language model logits")


def test_dropout_is_live_and_retain_dropout_honoured():
    d = dictionary()
    _, fused = twin(transformer(d, dropout=0.3, attention_dropout=0.2, activation_dropout=0.1))
    src, lengths, prev, _ = padded_pair(d)
    fused.train()
    first, second = fused(src, lengths, prev)[0], fused(src, lengths, prev)[0]
    assert not torch.allclose(first, second), "dropout inactive in training"
    fused.eval()
    assert torch.equal(fused(src, lengths, prev)[0], fused(src, lengths, prev)[0])
    for module in fused.modules():
        if type(module).__name__ == "FairseqDropout":
            module.apply_during_inference = True  # what --retain-dropout does
    assert not torch.equal(fused(src, lengths, prev)[0], fused(src, lengths, prev)[0])


def test_dropout_statistics_match_original():
    """Same mean loss over many dropout draws as the original (dropout masks differ)."""
    d = dictionary()
    original, fused = twin(transformer(d, dropout=0.2, attention_dropout=0.1,
                                       activation_dropout=0.1))
    src, lengths, prev, target = padded_pair(d, batch=8, seed=3)
    means = []
    for model in (original, fused):
        model.train()
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(
                model(src, lengths, prev)[0].reshape(-1, len(d)), target.reshape(-1),
                ignore_index=d.pad()) for _ in range(40)]
        means.append(torch.stack(losses))
    a, b = means
    assert abs(a.mean() - b.mean()) < 4 * (a.std() / 40 ** 0.5 + b.std() / 40 ** 0.5)


UNSUPPORTED = {
    "cross_self_attention": (dict(cross_self_attention=True), "decoder", "cross_self_attention"),
    "checkpoint_activations": (dict(checkpoint_activations=True), "encoder",
                               "--checkpoint-activations"),
    "tanh": (dict(activation_fn="tanh"), "encoder", "activation_fn"),
    "quant_noise": (dict(quant_noise_pq=0.1, quant_noise_pq_block_size=8), "encoder", "quant_noise"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_knobs_that_cannot_be_honoured_are_reported(name):
    overrides, where, knob = UNSUPPORTED[name]
    d = dictionary()
    model = fastpatch.accelerate(transformer(d, **overrides))
    skipped = {p: r for p, r in fastpatch.report(model).skipped.items() if p.startswith(where)}
    assert skipped and all(knob in reason for reason in skipped.values()), \
        str(fastpatch.report(model))
    with pytest.raises(fastpatch.UnsupportedModelError, match=knob):
        fastpatch.accelerate(transformer(d, **overrides), strict=True)


def test_add_bias_kv_and_return_fc_are_reported():
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import (TransformerDecoderLayerBase,
                                                   TransformerEncoderLayerBase)

    cfg = TransformerConfig()
    cfg.encoder.embed_dim = cfg.decoder.embed_dim = 16
    cfg.encoder.attention_heads = cfg.decoder.attention_heads = 2
    holder = torch.nn.Module()
    holder.dec = TransformerDecoderLayerBase(cfg, add_bias_kv=True)
    holder.enc = TransformerEncoderLayerBase(cfg, return_fc=True)
    report = fastpatch.report(fastpatch.accelerate(holder))
    assert "add_bias_kv" in report.skipped["dec"]
    assert "return_fc" in report.skipped["enc"]


def test_bart_with_beamable_encoder_attention():
    """BART: same layers, plus ``set_beam_size`` (the cross-attention keeps one key/value row per
    source sentence, not per hypothesis) on SequenceGenerator's path."""
    import argparse

    from fairseq.models.bart import BARTModel
    from fairseq.models.bart.model import bart_base_architecture
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_helpers import DictTask

    d = dictionary()
    args = argparse.Namespace(arch="bart_base", encoder_embed_dim=32, encoder_ffn_embed_dim=48,
                              encoder_layers=2, encoder_attention_heads=4, decoder_embed_dim=32,
                              decoder_ffn_embed_dim=48, decoder_layers=2, decoder_attention_heads=4,
                              dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                              max_source_positions=64, max_target_positions=64)
    bart_base_architecture(args)
    torch.manual_seed(0)
    original, fused = twin(BARTModel.build_model(args, DictTask(d)))
    assert fastpatch.report(fused).fully_accelerated
    src, lengths, prev, _ = padded_pair(d)
    assert_close_relative(fused(src, lengths, prev)[0], original(src, lengths, prev)[0], TOL, "BART")
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    results = []
    for model in (original, fused):
        model.eval()
        results.append(SequenceGenerator([model], d, beam_size=4, max_len_b=10).generate([model], sample))
    assert fused.decoder.layers[0].encoder_attn.beam_size == 4
    for hyps_a, hyps_b in zip(*results):
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"], b["tokens"])
            assert abs(float(a["score"]) - float(b["score"])) < 1e-5


def test_pickle_and_deepcopy_keep_the_model_accelerated():
    import pickle

    d = dictionary()
    model = fastpatch.accelerate(transformer(d).eval())
    src, lengths, prev, _ = padded_pair(d)
    with torch.no_grad():
        want = model(src, lengths, prev)[0]
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert fastpatch.report(twin).replaced == fastpatch.report(model).replaced
        with torch.no_grad():
            assert_close_relative(twin(src, lengths, prev)[0], want, 1e-6, "logits")
