"""fairseq's SequenceGenerator over the decoding engine (EngineEnsemble) against the same
generator over the original model: identical hypotheses, scores within 1e-5 (fp32, CPU, the
engine's eager path), for every search fairseq offers, model variants, padded sources and a
batch that shrinks as sentences finish; what keeps a model or generator off the engine."""
import copy

import pytest
import torch

pytest.importorskip("fairseq")

import fastpatch  # noqa: E402
from fairseq_helpers import dictionary, padded_pair, transformer  # noqa: E402
from numerics import assert_close_relative  # noqa: E402

from fastpatch.inference.transformer import DrivenSession  # noqa: E402
from fastpatch.integrations.fairseq import engine as fairseq_engine  # noqa: E402

TOL = 1e-5

MODELS = {
    "post_ln": {},
    "pre_ln_gelu": dict(encoder_normalize_before=True, decoder_normalize_before=True,
                        activation_fn="gelu"),
    "learned_positions": dict(encoder_learned_pos=True, decoder_learned_pos=True),
    "separate_tables_embedding_ln": dict(layernorm_embedding=True, share_all_embeddings=False),
    "shared_tables_untied_head": dict(share_all_embeddings=False,
                                      share_decoder_input_output_embed=False),
    "no_embed_scale_odd_ffn": dict(no_scale_embedding=True, encoder_ffn_embed_dim=37,
                                   decoder_ffn_embed_dim=37),
}


def _generate(model, d, sample, *, on_engine, prefix=None, seed=123, **kwargs):
    from fairseq.sequence_generator import SequenceGenerator

    model.eval()
    generator = SequenceGenerator([model], d, **kwargs)
    if on_engine:
        generator.model = fairseq_engine.EngineEnsemble(model, generator)
    torch.manual_seed(seed)  # sampling draws from the global generator
    return generator.generate([model], sample, prefix_tokens=prefix)


def assert_same_hypotheses(expected, got):
    assert len(expected) == len(got)
    for sentence, (hyps_a, hyps_b) in enumerate(zip(expected, got)):
        assert len(hyps_a) == len(hyps_b), f"sentence {sentence}"
        for rank, (a, b) in enumerate(zip(hyps_a, hyps_b)):
            what = f"sentence {sentence}, hypothesis {rank}"
            assert torch.equal(a["tokens"], b["tokens"]), what
            score_a, score_b = float(a["score"]), float(b["score"])
            assert score_a == score_b or abs(score_a - score_b) < TOL, what  # -inf: match_source_len
            finite = a["positional_scores"].isfinite()
            assert torch.equal(finite, b["positional_scores"].isfinite()), what
            assert_close_relative(b["positional_scores"][finite], a["positional_scores"][finite], TOL, what)


@pytest.fixture
def shrinks(monkeypatch):
    """Counts the source reorders that dropped rows (finished sentences leaving the batch)."""
    seen = []
    original = DrivenSession.reorder_source

    def reorder_source(self, index):
        if 0 < index.shape[0] < self.source_rows:
            seen.append((self.source_rows, index.shape[0]))
        return original(self, index)

    monkeypatch.setattr(DrivenSession, "reorder_source", reorder_source)
    return seen


@pytest.mark.parametrize("name", MODELS)
def test_beam_search_identical_to_fairseq(name):
    d = dictionary()
    model = transformer(d, **MODELS[name])
    assert fairseq_engine.model_problem(model.eval()) is None
    src, lengths, _, _ = padded_pair(d, batch=4, src_len=9)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    kwargs = dict(beam_size=4, max_len_b=12, min_len=2)
    assert_same_hypotheses(_generate(model, d, sample, on_engine=False, **kwargs),
                           _generate(model, d, sample, on_engine=True, **kwargs))


@pytest.mark.parametrize("name", ["post_ln", "pre_ln_gelu"])
def test_batch_that_shrinks_as_sentences_finish(name, shrinks):
    d = dictionary()
    model = transformer(d, **MODELS[name])
    with torch.no_grad():  # EOS likelier: sentences end at different steps (checked below)
        model.decoder.output_projection.weight[d.eos()] *= 2
    src, lengths, _, _ = padded_pair(d, batch=4, src_len=9)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    kwargs = dict(beam_size=4, max_len_b=12, min_len=2)
    assert_same_hypotheses(_generate(model, d, sample, on_engine=False, **kwargs),
                           _generate(model, d, sample, on_engine=True, **kwargs))
    assert shrinks, "no sentence finished before the others: the shrinking batch went untested"


@pytest.mark.parametrize("case", ["lenpen_unnormalized_unk", "greedy", "sampling_topk", "prefix",
                                  "match_source_len", "no_repeat_ngram", "temperature"])
def test_every_search_option_identical_to_fairseq(case):
    from fairseq import search

    d = dictionary()
    model = transformer(d)
    src, lengths, _, _ = padded_pair(d, batch=3)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    kwargs = dict(beam_size=4, max_len_b=10, min_len=2)
    prefix = None
    if case == "lenpen_unnormalized_unk":
        kwargs.update(len_penalty=0.6, normalize_scores=False, unk_penalty=0.5)
    elif case == "greedy":
        kwargs.update(beam_size=1)
    elif case == "sampling_topk":
        kwargs.update(beam_size=2, search_strategy=search.Sampling(d, sampling_topk=5))
    elif case == "prefix":
        prefix = torch.randint(d.nspecial, len(d), (3, 2))
    elif case == "match_source_len":
        kwargs.update(match_source_len=True, min_len=1)
    elif case == "no_repeat_ngram":
        kwargs.update(no_repeat_ngram_size=2)
    elif case == "temperature":
        kwargs.update(temperature=0.7, search_strategy=search.Sampling(d, sampling_topp=0.9), beam_size=2)
    expected = _generate(model, d, sample, on_engine=False, prefix=prefix, **kwargs)
    assert_same_hypotheses(expected, _generate(model, d, sample, on_engine=True, prefix=prefix, **kwargs))


def test_accelerated_model_and_repeated_calls_reuse_one_engine():
    """An accelerated model (what lightseq-generate loads) maps to the engine as the original
    does; successive batches of other shapes reuse the engine, which follows weight updates."""
    from fairseq.sequence_generator import SequenceGenerator

    d = dictionary()
    original = transformer(d).eval()
    fused = fastpatch.accelerate(copy.deepcopy(original)).eval()
    generator = SequenceGenerator([fused], d, beam_size=3, max_len_b=8)
    generator.model = ensemble = fairseq_engine.EngineEnsemble(fused, generator)
    for batch, src_len in ((2, 5), (5, 11), (2, 5)):
        src, lengths, _, _ = padded_pair(d, batch=batch, src_len=src_len, seed=batch)
        sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
        expected = _generate(original, d, sample, on_engine=False, beam_size=3, max_len_b=8)
        assert_same_hypotheses(expected, generator.generate([fused], sample))
    first = ensemble.engine()
    assert ensemble.engine() is first
    with torch.no_grad():
        for m in (original, fused):
            m.decoder.layers[0].fc1.weight.mul_(1.5)
    assert ensemble.engine() is not first
    src, lengths, _, _ = padded_pair(d, batch=3)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    assert_same_hypotheses(_generate(original, d, sample, on_engine=False, beam_size=3, max_len_b=8),
                           generator.generate([fused], sample))


def test_what_keeps_generation_on_fairseqs_decoder(monkeypatch):
    from fairseq.sequence_generator import SequenceGenerator, SequenceGeneratorWithAlignment

    d = dictionary()
    model = transformer(d).eval()
    monkeypatch.setenv(fairseq_engine.ENV_FLAG, "1")
    assert fairseq_engine.attach(SequenceGenerator([model], d), [model])

    def reason(generator, models):
        return fairseq_engine.engine_problem(generator, models)

    assert "alignment" in reason(SequenceGeneratorWithAlignment([model], d), [model])
    other = transformer(d, seed=1).eval()
    assert "ensemble of 2" in reason(SequenceGenerator([model, other], d), [model, other])
    monkeypatch.setenv(fairseq_engine.ENV_FLAG, "0")
    assert reason(SequenceGenerator([model], d), [model]) == f"{fairseq_engine.ENV_FLAG}=0"
    monkeypatch.delenv(fairseq_engine.ENV_FLAG)
    assert "on cpu" in reason(SequenceGenerator([model], d), [model])
    kept = SequenceGenerator([model], d)
    assert not fairseq_engine.attach(kept, [model])
    assert type(kept.model).__name__ == "EnsembleModel"


@pytest.mark.parametrize("overrides, words", [
    (dict(encoder_normalize_before=True, decoder_normalize_before=True, no_decoder_final_norm=True),
     "final LayerNorm"),
    (dict(encoder_normalize_before=True), "differ in normalize_before"),
    (dict(decoder_output_dim=24), "output dimension"),
    (dict(encoder_embed_dim=48, encoder_attention_heads=3), "differ in embed_dim"),
    (dict(cross_self_attention=True), "cross_self_attention"),
])
def test_models_the_engine_cannot_serve_are_named(overrides, words):
    d = dictionary()
    model = transformer(d, **overrides).eval()
    problem = fairseq_engine.model_problem(model)
    assert problem is not None and words in problem, problem
    with pytest.raises(ValueError, match="cannot run on the decoding engine"):
        fairseq_engine.engine_tensors(model)
    assert "training mode" in fairseq_engine.model_problem(transformer(d).train())


def test_a_search_that_skips_a_step_is_refused():
    d = dictionary()
    model = transformer(d).eval()
    from fairseq.sequence_generator import SequenceGenerator

    ensemble = fairseq_engine.EngineEnsemble(model, SequenceGenerator([model], d, beam_size=2))
    src, lengths, _, _ = padded_pair(d, batch=2)
    encoded = ensemble.reorder_encoder_out(ensemble.forward_encoder({"src_tokens": src}),
                                           torch.tensor([0, 0, 1, 1]))
    tokens = torch.full((4, 2), d.eos())
    with torch.no_grad(), pytest.raises(RuntimeError, match="prefix of 2 tokens after 0 steps"):
        ensemble.forward_decoder(tokens, encoded, [{}])


@pytest.mark.parametrize("name", ["post_ln", "pre_ln_gelu", "separate_tables_embedding_ln"])
def test_export_and_three_line_inference(name, tmp_path):
    """fastpatch.export of a fairseq model, read back by fi.Transformer without fairseq's code:
    greedy tokens identical to greedy decoding with fairseq's own (full-prefix) decoder, on a
    left-padded batch; the export carries fairseq-generate's decoding defaults."""
    import fastpatch.inference as fi

    d = dictionary()
    model = transformer(d, **MODELS[name]).eval()
    src, lengths, _, _ = padded_pair(d, batch=4, src_len=9)
    fastpatch.export(model, tmp_path)
    engine = fi.Transformer(tmp_path, max_batch_size=4, device="cpu")
    options = engine.generation
    assert (options.num_beams, options.eos_token_id, options.min_new_tokens) == (5, (d.eos(),), 1)
    got = engine.generate(src, src.ne(d.pad()), num_beams=1, max_new_tokens=8).tokens
    with torch.no_grad():
        encoded = model.encoder(src, src_lengths=lengths)
        prefix = torch.full((4, 1), d.eos())
        for step in range(8):
            logits = model.decoder(prefix, encoded)[0][:, -1]
            if step == 0:  # fairseq-generate's --min-len 1
                logits[:, d.eos()] = float("-inf")
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)
    expected = prefix[:, 1:]
    ended = expected.eq(d.eos()).cumsum(dim=1) - expected.eq(d.eos()).int() > 0
    assert torch.equal(got, expected.masked_fill(ended, d.pad())[:, : got.shape[1]])
