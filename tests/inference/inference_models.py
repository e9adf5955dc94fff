"""Tiny random Hugging Face models and prompt batches for the inference-engine tests.

``initializer_range`` is raised from GPT-2's 0.02 so that the random models have peaked,
varied next-token distributions (and sometimes produce EOS): with 0.02 every prompt decodes to
one repeated token, which would make "identical tokens" a weak check.
"""
import torch

EOS, PAD = 2, 0


def gpt2(vocab_size=101, n_layer=2, n_embd=64, n_head=4, n_positions=128, seed=0, **overrides):
    import transformers

    kwargs = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                  n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.3)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()


def bert(vocab_size=99, num_hidden_layers=2, hidden_size=48, num_attention_heads=4, seed=0, **overrides):
    import transformers

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, intermediate_size=80,
                  max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, type_vocab_size=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**kwargs)).eval()


def left_padded(vocab_size, batch=4, length=7, seed=0, lengths=None):
    """``(input_ids, attention_mask)``: row ``b`` has ``lengths[b]`` tokens at the right end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=g)
    if lengths is None:
        lengths = [max(1, length - 2 * b) for b in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, length - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def right_aligned(ids, mask):
    """The same prompts right-padded (tokens first, padding after)."""
    order = torch.argsort(1 - mask, dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def make_eos_likely(model, delta=2.0):
    """Shift the final LayerNorm's bias along EOS's embedding: its logit rises by ``delta``, so
    rows end with EOS at different steps (GPT-2 ties the head to the token embedding)."""
    with torch.no_grad():
        w = model.transformer.wte.weight[EOS]
        model.transformer.ln_f.bias += delta * w / w.norm() ** 2
    return model


def bart(vocab_size=97, layers=2, d_model=64, heads=4, seed=0, eos_bias=0.0, **overrides):
    """A tiny BART; ``init_std`` 1.0 keeps its random decoder from repeating one token, and
    ``eos_bias`` (added to EOS's logit) makes sentences end at different steps."""
    import transformers

    kwargs = dict(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=96,
                  decoder_ffn_dim=96, max_position_embeddings=100, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, init_std=1.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(**kwargs)).eval()
    with torch.no_grad():
        model.final_logits_bias[0, EOS] += eos_bias
    return model


def right_padded(vocab_size, batch=3, length=9, seed=0, pad=1):
    """Source sentences of different lengths, padded on the right (BART's pad id is 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, max(1, length - 3 * b):] = 0
    return ids.masked_fill(mask == 0, pad), mask
