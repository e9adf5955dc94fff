"""LSTransformer against a plain-PyTorch encoder-decoder (fairseq-style layers from
tests/layers/plain_layers.py, LightSeq's embedding written here) from the same init: a 50-step
training run on a copy task, incremental decoding, greedy and beam-search generation."""
import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpatch.layers import fairseq_layer_map
from fastpatch.training import LSAdam, LSCrossEntropyLayer, LSTransformer
from fastpatch.training.engine import ls_transformer_tensors
from layers.plain_layers import FairseqDecoderLayer, FairseqEncoderLayer, randomize_
from numerics import assert_close_relative, assert_within_factor_of_torch

VOCAB, PAD, EOS = 24, 1, 2
H, HEADS, FFN = 32, 4, 64


def sinusoid(positions, dim):
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float, device=positions.device)
                     * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PlainTransformer(nn.Module):
    """LightSeq's Transformer in plain PyTorch: sqrt(H)-scaled token embedding plus a sinusoid
    of the number of non-pad tokens before each token (offset by the decoding step), fairseq
    layers, a final LayerNorm on each side, and the output projection tied to the target
    embedding."""

    def __init__(self, pre_ln, activation="relu", layers=2):
        super().__init__()
        kw = dict(normalize_before=pre_ln, activation=activation)
        self.src_embed = nn.Embedding(VOCAB, H, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(VOCAB, H, padding_idx=PAD)
        self.encoder_layers = nn.ModuleList(FairseqEncoderLayer(H, HEADS, FFN, **kw)
                                            for _ in range(layers))
        self.decoder_layers = nn.ModuleList(FairseqDecoderLayer(H, HEADS, FFN, **kw)
                                            for _ in range(layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(H), nn.LayerNorm(H)

    def embed(self, table, tokens, start=0):
        real = tokens.ne(PAD).long()
        positions = torch.cumsum(real, 1) - real + start
        x = math.sqrt(H) * table(tokens)
        return x + sinusoid(positions.to(x.device), H).to(device=x.device, dtype=x.dtype)

    def encode(self, src):
        mask = src.eq(PAD)
        x = self.embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, tgt, enc, mask):
        x = self.embed(self.tgt_embed, tgt)
        for layer in self.decoder_layers:
            x = layer(x, enc, mask)
        return self.decoder_norm(x) @ self.tgt_embed.weight.t()

    def forward(self, src, tgt):
        return self.decode(tgt, *self.encode(src))


def config(pre_ln, activation="relu", layers=2, dropout=0.0):
    return LSTransformer.get_config(
        max_batch_tokens=64, max_seq_len=8,  # hints only: the batches below exceed them
        hidden_size=H, intermediate_size=FFN, nhead=HEADS, attn_prob_dropout_ratio=dropout,
        activation_dropout_ratio=dropout, hidden_dropout_ratio=dropout, pre_layer_norm=pre_ln,
        activation_fn=activation, fp16=False, local_rank=-1, vocab_size=VOCAB, padding_idx=PAD,
        num_encoder_layer=layers, num_decoder_layer=layers)


def fused_copy_of(plain, pre_ln, activation="relu"):
    model = LSTransformer(config(pre_ln, activation, len(plain.encoder_layers)))
    with torch.no_grad():
        model.encoder.embed_tokens.embeddings.copy_(plain.src_embed.weight)
        model.decoder.embed_tokens.embeddings.copy_(plain.tgt_embed.weight)
        for fused_norm, plain_norm in ((model.encoder.layer_norm, plain.encoder_norm),
                                       (model.decoder.layer_norm, plain.decoder_norm)):
            fused_norm.load_state_dict(plain_norm.state_dict())
    for fused, source in zip([*model.encoder.layers, *model.decoder.layers],
                             [*plain.encoder_layers, *plain.decoder_layers]):
        fairseq_layer_map(fused.config).load_into(fused, source)
    return model


def copy_batch(generator, batch=8, max_len=9):
    """Source: random tokens, right-padded; target: the same tokens then EOS; decoder input:
    EOS (fairseq's BOS) then the tokens."""
    lengths = torch.randint(2, max_len, (batch,), generator=generator)
    src = torch.full((batch, max_len), PAD)
    for i, n in enumerate(lengths.tolist()):
        src[i, :n] = torch.randint(3, VOCAB, (n,), generator=generator)
    target = torch.full((batch, max_len + 1), PAD)
    prev = torch.full((batch, max_len + 1), PAD)
    for i, n in enumerate(lengths.tolist()):
        target[i, :n], target[i, n] = src[i, :n], EOS
        prev[i, 0], prev[i, 1:n + 1] = EOS, src[i, :n]
    return src, prev, target


def fairseq_loss(logits, target, epsilon):
    """fairseq's label_smoothed_nll_loss, summed over non-pad targets."""
    lprobs = F.log_softmax(logits.float(), dim=-1).view(-1, logits.shape[-1])
    target = target.reshape(-1, 1)
    nll = -lprobs.gather(1, target)
    smooth = -lprobs.sum(1, keepdim=True)
    pad = target.eq(PAD)
    nll, smooth = nll.masked_fill(pad, 0.0).sum(), smooth.masked_fill(pad, 0.0).sum()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return (1 - epsilon - eps_i) * nll + eps_i * smooth


def train_both(pre_ln, steps=50, seed=0):
    torch.manual_seed(seed)
    plain = PlainTransformer(pre_ln)
    fused = fused_copy_of(plain, pre_ln)
    criterion = LSCrossEntropyLayer(LSCrossEntropyLayer.get_config(
        max_batch_tokens=64, padding_idx=PAD, epsilon=0.1, fp16=False, local_rank=-1))
    opt_fused = LSAdam(fused.parameters(), lr=3e-3, weight_decay=0.01)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.01)
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        src, prev, target = copy_batch(data)
        loss_fused, _ = criterion(fused(src, prev), target)
        loss_plain = fairseq_loss(plain(src, prev), target, 0.1)
        for loss, opt in ((loss_fused, opt_fused), (loss_plain, opt_plain)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append((loss_fused.item(), loss_plain.item(), target.ne(PAD).sum().item()))
    return fused, plain, losses


@pytest.fixture(scope="module", params=[False, True], ids=["post-ln", "pre-ln"])
def trained(request):
    return train_both(request.param)


def test_fifty_training_steps_match_the_plain_model(trained):
    _, _, losses = trained
    for step, (fused, plain, _) in enumerate(losses):
        assert abs(fused - plain) <= 1e-4 * abs(plain), f"step {step}: {fused} vs {plain}"
    per_token = [plain / tokens for _, plain, tokens in losses]
    assert sum(per_token[-5:]) < 0.5 * sum(per_token[:5]), "the loss did not go down"


def test_forward_and_gradients_match_before_training():
    torch.manual_seed(1)
    plain = PlainTransformer(True, activation="gelu")
    fused = fused_copy_of(plain, True, activation="gelu")
    src, prev, target = copy_batch(torch.Generator().manual_seed(1))
    out_fused, out_plain = fused(src, prev), plain(src, prev)
    assert_close_relative(out_fused, out_plain, 1e-5, "logits")
    fairseq_loss(out_fused, target, 0.0).backward()
    fairseq_loss(out_plain, target, 0.0).backward()
    assert_close_relative(fused.decoder.embed_tokens.embeddings.grad, plain.tgt_embed.weight.grad,
                          1e-5, "tied embedding grad")
    assert_close_relative(fused.encoder.embed_tokens.embeddings.grad, plain.src_embed.weight.grad,
                          1e-5, "source embedding grad")
    for fused_layer, plain_layer in zip(fused.decoder.layers, plain.decoder_layers):
        expected = fairseq_layer_map(fused_layer.config).to_fused(
            {n: p.grad for n, p in plain_layer.named_parameters()})
        for name, p in fused_layer.named_parameters():
            assert_close_relative(p.grad, expected[name], 1e-5, f"decoder grad {name}")


def test_lightseq_style_incremental_decoding_equals_full_decoding(trained):
    fused, _, _ = trained
    fused.eval()
    src, _, _ = copy_batch(torch.Generator().manual_seed(5), batch=3)  # padded sources
    prev = torch.randint(3, VOCAB, (3, 6))  # unpadded targets (LightSeq numbers positions
    prev[:, 0] = EOS                        # by non-pad tokens, incrementally by step)
    with torch.no_grad():
        encoder_out, mask = fused.encoder(src)
        assert encoder_out.shape == (src.shape[1], 3, H)  # LightSeq's [S, B, H]
        full = fused.decoder(prev, encoder_out, mask)
        cache = {}
        steps = [fused.decoder(prev[:, :t + 1], encoder_out, mask, cache) for t in range(6)]
        assert set(cache) == {0, 1} and cache[0]["dec_self_k"].shape == (3, HEADS, 6, H // HEADS)
        # beam-search style reorder that drops a row, then one more step
        order = torch.tensor([2, 0])
        fused.decoder.reorder_cache(cache, order)
        nxt = torch.cat([prev[order], torch.full((2, 1), 5)], dim=1)
        last = fused.decoder(nxt, encoder_out[:, order], mask[order], cache)
        reference = fused.decoder(nxt, encoder_out[:, order], mask[order])
    assert_close_relative(torch.cat(steps, dim=1), full, 1e-5, "incremental vs full")
    assert_close_relative(last[:, -1], reference[:, -1], 1e-5, "after reorder")
    fused.train()


# ----------------------------------------------------------------------------------- generation
@torch.no_grad()
def plain_greedy(plain, src, max_len):
    """Greedy decoding recomputing the whole prefix at every step."""
    enc, mask = plain.encode(src)
    out = []
    for row in range(src.shape[0]):
        prefix = [EOS]
        for _ in range(max_len):
            lprobs = F.log_softmax(plain.decode(torch.tensor([prefix]), enc[row:row + 1],
                                                mask[row:row + 1])[0, -1], -1)
            lprobs[PAD] = -math.inf
            prefix.append(int(lprobs.argmax()))
            if prefix[-1] == EOS:
                break
        out.append(prefix[1:])
    return out


@torch.no_grad()
def plain_beam(plain, src, beam, max_len, length_penalty):
    """Beam search as fairseq does it, one sentence at a time, recomputing prefixes."""
    enc, mask = plain.encode(src)
    results = []
    for row in range(src.shape[0]):
        beams = [([EOS], 0.0)]
        finished = []
        for step in range(max_len):
            candidates = []
            for b, (prefix, score) in enumerate(beams):
                lprobs = F.log_softmax(plain.decode(torch.tensor([prefix]), enc[row:row + 1],
                                                    mask[row:row + 1])[0, -1], -1)
                lprobs[PAD] = -math.inf
                if step == max_len - 1:
                    only_eos = torch.full_like(lprobs, -math.inf)
                    only_eos[EOS] = lprobs[EOS]
                    lprobs = only_eos
                for token in range(VOCAB):
                    candidates.append((score + lprobs[token].item(), b, token))
            candidates.sort(key=lambda c: -c[0])
            next_beams = []
            for rank, (score, b, token) in enumerate(candidates[:2 * beam]):
                if score == -math.inf:
                    break
                if token == EOS:
                    if rank < beam and len(finished) < beam:
                        finished.append((score / (step + 1) ** length_penalty,
                                         beams[b][0][1:] + [EOS]))
                elif len(next_beams) < beam:
                    next_beams.append((beams[b][0] + [token], score))
            if len(finished) >= beam:
                break
            beams = next_beams
        results.append(sorted(finished, key=lambda f: -f[0]))
    return results


@pytest.fixture(scope="module")
def random_pair():
    """A random model whose hypotheses stop at different steps (EOS made a bit more likely), so
    finished sentences leave the batch at different times."""
    torch.manual_seed(3)
    plain = randomize_(PlainTransformer(True), scale=0.3)
    with torch.no_grad():
        plain.tgt_embed.weight[EOS] *= 1.2
    return fused_copy_of(plain, True).eval(), plain.eval()


def test_greedy_generation_matches_plain_greedy(random_pair):
    fused, plain = random_pair
    src, _, _ = copy_batch(torch.Generator().manual_seed(11), batch=6)
    tokens, scores = fused.generate(src, EOS, max_len=12)
    expected = plain_greedy(plain, src, 12)
    assert len({len(h) for h in expected}) > 1, "rows should finish at different steps"
    for row, hyp in enumerate(expected):
        assert tokens[row, :len(hyp)].tolist() == hyp
        assert (tokens[row, len(hyp):] == PAD).all()
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("beam, length_penalty", [(2, 1.0), (3, 0.6), (4, 1.0)])
def test_beam_search_matches_plain_beam_search(random_pair, beam, length_penalty):
    fused, plain = random_pair
    src, _, _ = copy_batch(torch.Generator().manual_seed(11), batch=6)
    tokens, scores = fused.generate(src, EOS, beam_size=beam, max_len=10,
                                    length_penalty=length_penalty, nbest=beam)
    expected = plain_beam(plain, src, beam, 10, length_penalty)
    lengths = set()
    for row, hyps in enumerate(expected):
        assert len(hyps) == beam
        for j, (score, hyp) in enumerate(hyps):
            lengths.add(len(hyp))
            assert tokens[row, j, :len(hyp)].tolist() == hyp, (row, j)
            assert (tokens[row, j, len(hyp):] == PAD).all()
            assert abs(scores[row, j].item() - score) <= 1e-4 * max(1.0, abs(score))
    assert len(lengths) > 1, "hypotheses should end at different steps"
    best, best_scores = fused.generate(src, EOS, beam_size=beam, max_len=10,
                                       length_penalty=length_penalty)
    assert torch.equal(best, tokens[:, 0, :best.shape[1]]) and torch.equal(best_scores, scores[:, 0])


def test_beam_search_forces_eos_at_max_len_and_checks_arguments(random_pair):
    fused, _ = random_pair
    src, _, _ = copy_batch(torch.Generator().manual_seed(13), batch=2)
    tokens, _ = fused.generate(src, EOS, beam_size=2, max_len=2)
    assert tokens.shape[1] <= 2 and (tokens == EOS).any(dim=1).all()
    for kwargs, name in ((dict(beam_size=VOCAB), "beam_size"), (dict(max_len=0), "max_len"),
                         (dict(beam_size=2, nbest=3), "nbest")):
        with pytest.raises(ValueError, match=name):
            fused.generate(src, EOS, **kwargs)
    with pytest.raises(ValueError, match="eos_idx"):
        fused.generate(src, VOCAB)



def test_beam_search_with_room_for_eos_only(random_pair):
    """max_len=1: the beams are still identical, so each sentence ends with one hypothesis, EOS,
    scored by EOS's log-probability after BOS; further n-best entries are padding at -inf."""
    fused, _ = random_pair
    src, _, _ = copy_batch(torch.Generator().manual_seed(13), batch=3)
    tokens, scores = fused.generate(src, EOS, beam_size=3, max_len=1, nbest=2)
    assert tokens.shape == (3, 2, 1)
    assert (tokens[:, 0, 0] == EOS).all() and (tokens[:, 1, 0] == PAD).all()
    from fastpatch.training.generation import start_decoding

    with torch.no_grad():
        state = start_decoding(fused, src, max_rows=3, max_steps=1, use_engine=False)
        eos_after_bos = state.next_log_probs(torch.full((3,), EOS))[:, EOS]
    assert torch.allclose(scores[:, 0], eos_after_bos, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(scores[:, 0]).all() and torch.isneginf(scores[:, 1]).all()

# ------------------------------------------------------------------------- the decoding engine
def test_generate_from_threads_gives_the_sequential_results_and_the_model_still_copies():
    """``LSTransformer.generate`` holds the model (its engine's caches, the train/eval flag) for
    one call at a time; the lock it keeps does not stop ``copy.deepcopy``."""
    import copy

    from concurrency import run_in_threads

    model = eos_likely_model(True)
    sources = [copy_batch(torch.Generator().manual_seed(20 + i), batch=2 + i)[0] for i in range(4)]
    kwargs = [dict(), dict(beam_size=3)] * 2
    expected = [model.generate(src, EOS, max_len=10, use_engine=True, **kw)[0]
                for src, kw in zip(sources, kwargs)]

    def work(i):
        for _ in range(3):
            got = model.generate(sources[i], EOS, max_len=10, use_engine=True, **kwargs[i])[0]
            assert torch.equal(got, expected[i]), i

    run_in_threads(work, len(sources))
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(sources[0], EOS, max_len=10, use_engine=True)[0], expected[0])


def eos_likely_model(pre_ln, eos_boost=1.2, seed=3):
    """A random model whose hypotheses stop at different steps (see ``random_pair``)."""
    torch.manual_seed(seed)
    plain = randomize_(PlainTransformer(pre_ln), scale=0.3)
    with torch.no_grad():
        plain.tgt_embed.weight[EOS] *= eos_boost
    return fused_copy_of(plain, pre_ln).eval()


def mixed_padding_batch(seed, batch=6, max_len=9):
    """Padded sources, right-padded rows and (every other row) left-padded ones."""
    src, _, _ = copy_batch(torch.Generator().manual_seed(seed), batch=batch, max_len=max_len)
    for row in range(0, batch, 2):
        n = int(src[row].ne(PAD).sum())
        src[row] = torch.cat([src[row, n:], src[row, :n]])
    assert src.eq(PAD).any()
    return src


@pytest.fixture
def row_counts(monkeypatch):
    """The row counts the engine's decoding state is reordered to, per search."""
    from fastpatch.training import generation

    counts = []
    reorder = generation.EngineDecoding.reorder
    monkeypatch.setattr(generation.EngineDecoding, "reorder",
                        lambda self, index: (counts.append(index.shape[0]), reorder(self, index))[1])
    return counts


def assert_same_search(a, b, tolerance=1e-5):
    assert torch.equal(a[0], b[0]), "tokens differ"
    assert (a[1] - b[1]).abs().le(tolerance * b[1].abs().clamp(min=1)).all(), (a[1], b[1])


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-ln", "pre-ln"])
def test_engine_greedy_and_beam_search_equal_the_layers(pre_ln, row_counts):
    from fastpatch.training.engine import engine_of

    model = eos_likely_model(pre_ln, eos_boost=1.5)
    src = mixed_padding_batch(11, batch=8)
    layers = model.generate(src, EOS, max_len=12, use_engine=False)
    assert engine_of(model) is None
    engine = model.generate(src, EOS, max_len=12, use_engine=True)
    assert_same_search(engine, layers)
    assert engine_of(model) is not None and not engine_of(model).use_cuda_graph  # eager on the CPU
    lengths = layers[0].ne(PAD).sum(dim=1)
    assert len(set(lengths.tolist())) > 1 and lengths.min() < 12, "rows should finish at different steps"
    assert row_counts and row_counts[-1] < src.shape[0], "the greedy batch should shrink"

    row_counts.clear()
    options = dict(beam_size=4, nbest=2, length_penalty=0.6, max_len=12)
    layers = model.generate(src, EOS, use_engine=False, **options)
    engine = model.generate(src, EOS, use_engine=True, **options)
    assert layers[0].shape[:2] == (src.shape[0], 2)
    assert_same_search(engine, layers)
    assert row_counts[0] == 4 * src.shape[0] and len(set(row_counts)) > 2, \
        f"sentences should finish at different steps: rows {row_counts}"
    best = model.generate(src, EOS, use_engine=True, beam_size=4, length_penalty=0.6, max_len=12)
    assert torch.equal(best[0], engine[0][:, 0, :best[0].shape[1]]) and torch.equal(best[1], engine[1][:, 0])


def test_engine_follows_the_layers_reference_search(random_pair):
    """The engine against the plain model's prefix-recomputing beam search (not only the layers)."""
    fused, plain = random_pair
    src, _, _ = copy_batch(torch.Generator().manual_seed(11), batch=6)
    tokens, scores = fused.generate(src, EOS, beam_size=3, max_len=10, length_penalty=0.6, nbest=3,
                                    use_engine=True)
    for row, hyps in enumerate(plain_beam(plain, src, 3, 10, 0.6)):
        for j, (score, hyp) in enumerate(hyps):
            assert tokens[row, j, :len(hyp)].tolist() == hyp, (row, j)
            assert abs(scores[row, j].item() - score) <= 1e-4 * max(1.0, abs(score))


def _no_fc1_bias(model):
    layer = model.decoder.layers[1]
    layer.config = layer.config.replace(fc1_bias=False)
    layer.fc1_bias = None
    return "fc1_bias=False"


def _narrow_encoder(model):
    """An encoder of width 16 under a decoder of width 32 (its cross-attention reads width 16)."""
    from fastpatch.layers import TransformerDecoderLayer
    from fastpatch.training import LSTransformerEmbeddingLayer, LSTransformerEncoder

    narrow = LSTransformer.get_config(hidden_size=16, intermediate_size=FFN, nhead=HEADS,
                                      hidden_dropout_ratio=0.0, vocab_size=VOCAB, padding_idx=PAD,
                                      pre_layer_norm=model.config.pre_layer_norm, num_encoder_layer=2,
                                      num_decoder_layer=2)
    model.encoder = LSTransformerEncoder(narrow, LSTransformerEmbeddingLayer(narrow))
    for i, old in enumerate(model.decoder.layers):
        model.decoder.layers[i] = TransformerDecoderLayer(old.config.replace(encoder_hidden_size=16))
    randomize_(model, scale=0.3)
    return "encoder output of width 16"


def _final_norm_eps(model):
    model.decoder.layer_norm.eps = 1e-6
    return "eps=1e-06"


@pytest.mark.parametrize("break_it", [_no_fc1_bias, _narrow_encoder, _final_norm_eps],
                         ids=["bias-off", "encoder-width", "final-norm-eps"])
def test_engine_refuses_what_it_cannot_honour(break_it, caplog):
    model = eos_likely_model(True)
    reason = break_it(model)
    model.eval()
    src = mixed_padding_batch(11)
    with pytest.raises(ValueError, match=f"use_engine=True.*{reason}"):
        model.generate(src, EOS, max_len=8, use_engine=True)
    layers = model.generate(src, EOS, max_len=8, use_engine=False)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        default = model.generate(src, EOS, max_len=8)
    assert any("runs the fused layers" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert_same_search(default, layers, 0.0)
    from fastpatch.training.engine import engine_of

    assert engine_of(model) is None


def test_engine_refuses_an_activation_without_a_kernel_and_bad_arguments():
    model = eos_likely_model(False)
    object.__setattr__(model.encoder.layers[0].config, "activation", "tanh")  # frozen: forced
    with pytest.raises(ValueError, match="activation 'tanh'"):
        model.generate(mixed_padding_batch(1), EOS, max_len=4, use_engine=True)
    with pytest.raises(ValueError, match="use_engine"):
        eos_likely_model(False).generate(mixed_padding_batch(1), EOS, max_len=4, use_engine=1)


def test_default_on_the_cpu_runs_the_layers(caplog):
    from fastpatch.training.engine import engine_of

    model = eos_likely_model(False)
    with caplog.at_level(logging.INFO, logger="fastpatch"):
        model.generate(mixed_padding_batch(1), EOS, max_len=4)
    assert any("runs the fused layers: the parameters are on cpu" in r.getMessage() for r in caplog.records)
    assert engine_of(model) is None


def test_engine_is_kept_and_rebuilt_when_parameters_change():
    from fastpatch.training.engine import MIN_POSITIONS, engine_of

    model = eos_likely_model(True)
    src = mixed_padding_batch(11)
    search = lambda m: m.generate(src, EOS, beam_size=2, max_len=10, use_engine=True)  # noqa: E731
    reference = lambda m: m.generate(src, EOS, beam_size=2, max_len=10, use_engine=False)  # noqa: E731
    search(model)
    first = engine_of(model)
    search(model)
    assert engine_of(model) is first, "an unchanged model keeps its engine"

    with torch.no_grad():  # in place (an optimizer step): the engine reads the parameters
        model.decoder.layers[0].fc1_weight.mul_(1.5)
        model.encoder.embed_tokens.embeddings.mul_(0.8)
    assert_same_search(search(model), reference(model))
    assert engine_of(model) is first

    layer = model.decoder.layers[1]  # replaced
    layer.qkv_weight = nn.Parameter(0.3 * torch.randn_like(layer.qkv_weight))
    assert_same_search(search(model), reference(model))
    assert engine_of(model) is not first
    second = engine_of(model)

    # untied output projection: the engine reads it as its own LM head
    model.decoder.output_projection.weight = nn.Parameter(model.decoder.embed_tokens.embeddings.detach() * 1.1)
    assert_same_search(search(model), reference(model))
    assert engine_of(model) is not second and not engine_of(model).spec.tie_word_embeddings

    model.double()  # moved / cast
    result = search(model)
    assert engine_of(model).dtype == torch.float64
    assert_same_search(result, reference(model))

    # a source longer than the sinusoid tables grows them; shorter calls keep the larger engine
    long_src = torch.randint(3, VOCAB, (1, MIN_POSITIONS + 10))
    long = model.generate(long_src, EOS, max_len=3, use_engine=True)
    assert engine_of(model).spec.max_positions == 2 * MIN_POSITIONS
    assert_same_search(long, model.generate(long_src, EOS, max_len=3, use_engine=False))
    grown = engine_of(model)
    search(model)
    assert engine_of(model) is grown


def test_spec_pre_ln_needs_the_final_layer_norm():
    from fastpatch.inference.transformer import TransformerSpec

    spec, _ = ls_transformer_tensors(eos_likely_model(True))
    assert spec.normalize_before and spec.final_layer_norm
    with pytest.raises(ValueError, match="final_layer_norm"):
        dataclasses.replace(spec, final_layer_norm=False)
    assert dataclasses.replace(spec, normalize_before=False, final_layer_norm=False)  # BART's
    # config.json written before the field existed: pre-LN implied the final LayerNorms
    old = {k: v for k, v in spec.to_dict().items() if k != "final_layer_norm"}
    assert TransformerSpec.from_dict(old) == spec


def test_copies_of_the_model_do_not_carry_the_engine():
    import pickle

    from fastpatch.training.engine import engine_of

    model = eos_likely_model(False)
    src = mixed_padding_batch(5)
    expected = model.generate(src, EOS, max_len=8, use_engine=True)
    assert engine_of(model) is not None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert engine_of(twin) is None
        assert_same_search(twin.generate(src, EOS, max_len=8, use_engine=True), expected, 0.0)
        assert engine_of(twin) is not engine_of(model)
        assert engine_of(twin).t["embed.tokens"].data_ptr() == twin.decoder.embed_tokens.embeddings.data_ptr()


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_logits_training_and_generation(dtype):
    torch.manual_seed(0)
    plain32 = PlainTransformer(True).cuda()
    fused = fused_copy_of(plain32, True).cuda().to(dtype)
    plain = copy.deepcopy(plain32).to(dtype)
    src, prev, target = (t.cuda() for t in copy_batch(torch.Generator().manual_seed(0), 64, 30))
    assert_within_factor_of_torch(fused(src, prev).float(), plain(src, prev).float(),
                                  plain32(src, prev), "logits")
    criterion = LSCrossEntropyLayer(LSCrossEntropyLayer.get_config(padding_idx=PAD, epsilon=0.1))
    optimizer = LSAdam(fused.parameters(), lr=1e-3)
    for _ in range(5):
        loss, _ = criterion(fused(src, prev), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    for beam in (1, 4):
        tokens, scores = fused.generate(src[:8], EOS, beam_size=beam, max_len=16)
        assert tokens.shape[0] == 8 and torch.isfinite(scores).all()
        assert ((tokens >= 0) & (tokens < VOCAB)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-ln", "pre-ln"])
def test_cuda_engine_graphs_match_the_layers_and_the_eager_engine(pre_ln, caplog):
    """fp16: the engine (default on CUDA: graph-replayed steps) gives the fused layers' tokens for
    most sentences (the arithmetic differs, so a near tie may go the other way), and its graph
    replays are bitwise its eager steps, also while the batch shrinks."""
    from fastpatch.training.engine import engine_of

    model = eos_likely_model(pre_ln, eos_boost=1.5).cuda().half()
    src = mixed_padding_batch(0, batch=64, max_len=30).cuda()
    for options in (dict(max_len=40), dict(beam_size=4, max_len=40, length_penalty=0.6)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastpatch"):
            graphs = model.generate(src, EOS, **options)
        assert any("runs on the decoding engine" in r.getMessage() for r in caplog.records)
        engine = engine_of(model)
        assert engine.use_cuda_graph
        layers = model.generate(src, EOS, use_engine=False, **options)
        length = max(graphs[0].shape[1], layers[0].shape[1])
        pad = lambda t: F.pad(t, (0, length - t.shape[1]), value=PAD)  # noqa: E731
        same = (pad(graphs[0]) == pad(layers[0])).all(dim=1)
        assert same.float().mean() >= 0.9, f"{int(same.sum())}/64 sentences identical ({options})"
        assert graphs[0].ne(PAD).sum(dim=1).unique().numel() > 1, "sentences should end at different steps"
        engine.use_cuda_graph = False
        try:
            eager = model.generate(src, EOS, use_engine=True, **options)
        finally:
            engine.use_cuda_graph = True
        assert engine_of(model) is engine
        assert torch.equal(eager[0], graphs[0]) and torch.equal(eager[1], graphs[1]), options
