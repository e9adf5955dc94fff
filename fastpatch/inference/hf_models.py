"""Hugging Face models -> the engines' tensors and specs (no transformers import needed here).

The tensors are views of the model's own parameters (GPT-2's ``Conv1D`` weights ``[in, out]``
become transposed views in ``nn.Linear`` layout), except BERT's query/key/value, which the
engine wants as one ``[3H, H]`` matrix and are concatenated once. ``fastpatch.accelerate``
keeps parameters and names, so accelerated and vanilla models map the same way.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ..ops.activations import canonical_activation
from .options import GenerationOptions

# GenerationConfig fields the engine implements, mapped to GenerationOptions fields.
_GENERATION_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                      "num_return_sequences", "length_penalty", "early_stopping", "eos_token_id",
                      "pad_token_id", "forced_bos_token_id", "forced_eos_token_id")


def _p(t: Tensor) -> Tensor:
    return t.detach()


def generation_options(generation_config) -> GenerationOptions:
    """The decoding options a ``GenerationConfig`` sets (unset fields keep HF's defaults)."""
    values = {}
    for name in _GENERATION_FIELDS:
        value = getattr(generation_config, name, None)
        if value is not None:
            values[name] = value
    return GenerationOptions().replace(**values)


def gpt2_tensors(model) -> Tuple["GptSpec", Dict[str, Tensor], GenerationOptions]:  # noqa: F821
    """``(spec, tensors, decoding options)`` of a ``GPT2LMHeadModel`` (or bare ``GPT2Model``)."""
    from .gpt import GptSpec

    body = getattr(model, "transformer", model)
    if type(body).__name__ != "GPT2Model" or not hasattr(body, "h"):
        raise TypeError(f"expected a transformers GPT2LMHeadModel or GPT2Model, got {type(model).__name__}")
    config = body.config
    if getattr(config, "add_cross_attention", False):
        raise ValueError("config.add_cross_attention: GPT-2 with cross-attention is not supported")
    activation = canonical_activation(config.activation_function)
    if activation is None:
        raise ValueError(f"config.activation_function={config.activation_function!r} has no fused kernel")
    head_dim = config.n_embd // config.n_head
    scales = []
    for i in range(config.n_layer):
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        scales.append(scale)
    head = getattr(model, "lm_head", None)
    tied = head is None or head.weight.data_ptr() == body.wte.weight.data_ptr()
    spec = GptSpec(vocab_size=body.wte.weight.shape[0], max_positions=body.wpe.weight.shape[0],
                   hidden_size=config.n_embd, num_layers=config.n_layer, num_heads=config.n_head,
                   ffn_size=body.h[0].mlp.c_fc.weight.shape[1], activation=activation,
                   layer_norm_eps=config.layer_norm_epsilon, attention_scales=tuple(scales),
                   tie_word_embeddings=tied)
    t = {"embed.tokens": _p(body.wte.weight), "embed.positions": _p(body.wpe.weight)}
    for i, block in enumerate(body.h):
        p = f"layers.{i}."
        t.update({
            p + "ln1.weight": _p(block.ln_1.weight), p + "ln1.bias": _p(block.ln_1.bias),
            p + "attn.qkv.weight": _p(block.attn.c_attn.weight).t(), p + "attn.qkv.bias": _p(block.attn.c_attn.bias),
            p + "attn.out.weight": _p(block.attn.c_proj.weight).t(), p + "attn.out.bias": _p(block.attn.c_proj.bias),
            p + "ln2.weight": _p(block.ln_2.weight), p + "ln2.bias": _p(block.ln_2.bias),
            p + "ffn.fc1.weight": _p(block.mlp.c_fc.weight).t(), p + "ffn.fc1.bias": _p(block.mlp.c_fc.bias),
            p + "ffn.fc2.weight": _p(block.mlp.c_proj.weight).t(), p + "ffn.fc2.bias": _p(block.mlp.c_proj.bias),
        })
    t.update({"final_ln.weight": _p(body.ln_f.weight), "final_ln.bias": _p(body.ln_f.bias)})
    if not tied:
        t["lm_head.weight"] = _p(head.weight)
    generation = getattr(model, "generation_config", None)
    options = generation_options(generation) if generation is not None else GenerationOptions()
    return spec, t, options


def bert_tensors(model) -> Tuple["BertSpec", Dict[str, Tensor]]:  # noqa: F821
    """``(spec, tensors)`` of a ``BertModel`` (or a ``BertFor...`` model's ``.bert``)."""
    from .bert import BertSpec

    body = getattr(model, "bert", model)
    if type(body).__name__ != "BertModel":
        raise TypeError(f"expected a transformers BertModel (or BertFor... model), got {type(model).__name__}")
    config = body.config
    if getattr(config, "is_decoder", False):
        raise ValueError("config.is_decoder: BERT as a decoder is not supported")
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(f"config.position_embedding_type={config.position_embedding_type!r} "
                         "(relative positions) is not supported")
    activation = canonical_activation(config.hidden_act)
    if activation is None:
        raise ValueError(f"config.hidden_act={config.hidden_act!r} has no fused kernel")
    emb = body.embeddings
    layers = body.encoder.layer
    spec = BertSpec(vocab_size=emb.word_embeddings.weight.shape[0],
                    max_positions=emb.position_embeddings.weight.shape[0],
                    type_vocab_size=emb.token_type_embeddings.weight.shape[0],
                    hidden_size=config.hidden_size, num_layers=len(layers),
                    num_heads=config.num_attention_heads,
                    ffn_size=layers[0].intermediate.dense.weight.shape[0], activation=activation,
                    layer_norm_eps=config.layer_norm_eps, pooler=body.pooler is not None)
    t = {"embed.tokens": _p(emb.word_embeddings.weight), "embed.positions": _p(emb.position_embeddings.weight),
         "embed.token_types": _p(emb.token_type_embeddings.weight),
         "embed.ln.weight": _p(emb.LayerNorm.weight), "embed.ln.bias": _p(emb.LayerNorm.bias)}
    for i, layer in enumerate(layers):
        p, sa = f"layers.{i}.", layer.attention.self
        t.update({
            p + "attn.qkv.weight": torch.cat([_p(sa.query.weight), _p(sa.key.weight), _p(sa.value.weight)]),
            p + "attn.qkv.bias": torch.cat([_p(sa.query.bias), _p(sa.key.bias), _p(sa.value.bias)]),
            p + "attn.out.weight": _p(layer.attention.output.dense.weight),
            p + "attn.out.bias": _p(layer.attention.output.dense.bias),
            p + "ln1.weight": _p(layer.attention.output.LayerNorm.weight),
            p + "ln1.bias": _p(layer.attention.output.LayerNorm.bias),
            p + "ffn.fc1.weight": _p(layer.intermediate.dense.weight),
            p + "ffn.fc1.bias": _p(layer.intermediate.dense.bias),
            p + "ffn.fc2.weight": _p(layer.output.dense.weight), p + "ffn.fc2.bias": _p(layer.output.dense.bias),
            p + "ln2.weight": _p(layer.output.LayerNorm.weight), p + "ln2.bias": _p(layer.output.LayerNorm.bias),
        })
    if body.pooler is not None:
        t.update({"pooler.weight": _p(body.pooler.dense.weight), "pooler.bias": _p(body.pooler.dense.bias)})
    return spec, t


def bart_tensors(model) -> Tuple["TransformerSpec", Dict[str, Tensor], GenerationOptions]:  # noqa: F821
    """``(spec, tensors, decoding options)`` of a ``BartForConditionalGeneration``."""
    from .transformer import TransformerSpec

    body = getattr(model, "model", None)
    if type(model).__name__ != "BartForConditionalGeneration" or type(body).__name__ != "BartModel":
        raise TypeError(f"expected a transformers BartForConditionalGeneration, got {type(model).__name__}")
    config = model.config
    activation = canonical_activation(config.activation_function)
    if activation is None:
        raise ValueError(f"config.activation_function={config.activation_function!r} has no fused kernel")
    encoder, decoder = body.encoder, body.decoder
    tokens = body.shared
    tied = model.lm_head.weight.data_ptr() == tokens.weight.data_ptr()
    spec = TransformerSpec(
        vocab_size=tokens.weight.shape[0], max_positions=encoder.embed_positions.weight.shape[0],
        position_offset=encoder.embed_positions.offset, hidden_size=config.d_model,
        encoder_layers=len(encoder.layers), decoder_layers=len(decoder.layers),
        num_heads=config.encoder_attention_heads, ffn_size=config.encoder_ffn_dim, activation=activation,
        layer_norm_eps=encoder.layernorm_embedding.eps, embed_scale=float(getattr(tokens, "embed_scale", 1.0)),
        decoder_start_token_id=config.decoder_start_token_id, tie_word_embeddings=tied)
    if (config.decoder_attention_heads != config.encoder_attention_heads
            or config.decoder_ffn_dim != config.encoder_ffn_dim
            or decoder.embed_positions.weight.shape != encoder.embed_positions.weight.shape):
        raise ValueError("encoder and decoder of different shapes are not supported")

    def qkv(attn):
        return (torch.cat([_p(attn.q_proj.weight), _p(attn.k_proj.weight), _p(attn.v_proj.weight)]),
                torch.cat([_p(attn.q_proj.bias), _p(attn.k_proj.bias), _p(attn.v_proj.bias)]))

    t = {"embed.tokens": _p(tokens.weight), "final_logits_bias": _p(model.final_logits_bias).view(-1)}
    for side, stack in (("encoder", encoder), ("decoder", decoder)):
        t.update({f"{side}.positions": _p(stack.embed_positions.weight),
                  f"{side}.embed_ln.weight": _p(stack.layernorm_embedding.weight),
                  f"{side}.embed_ln.bias": _p(stack.layernorm_embedding.bias)})
    for i, layer in enumerate(encoder.layers):
        p = f"encoder.layers.{i}."
        w, b = qkv(layer.self_attn)
        t.update({p + "attn.qkv.weight": w, p + "attn.qkv.bias": b,
                  p + "attn.out.weight": _p(layer.self_attn.out_proj.weight),
                  p + "attn.out.bias": _p(layer.self_attn.out_proj.bias),
                  p + "ln1.weight": _p(layer.self_attn_layer_norm.weight),
                  p + "ln1.bias": _p(layer.self_attn_layer_norm.bias),
                  p + "ffn.fc1.weight": _p(layer.fc1.weight), p + "ffn.fc1.bias": _p(layer.fc1.bias),
                  p + "ffn.fc2.weight": _p(layer.fc2.weight), p + "ffn.fc2.bias": _p(layer.fc2.bias),
                  p + "ln2.weight": _p(layer.final_layer_norm.weight), p + "ln2.bias": _p(layer.final_layer_norm.bias)})
    for i, layer in enumerate(decoder.layers):
        p, cross = f"decoder.layers.{i}.", layer.encoder_attn
        w, b = qkv(layer.self_attn)
        t.update({p + "self_attn.qkv.weight": w, p + "self_attn.qkv.bias": b,
                  p + "self_attn.out.weight": _p(layer.self_attn.out_proj.weight),
                  p + "self_attn.out.bias": _p(layer.self_attn.out_proj.bias),
                  p + "ln1.weight": _p(layer.self_attn_layer_norm.weight),
                  p + "ln1.bias": _p(layer.self_attn_layer_norm.bias),
                  p + "cross_attn.q.weight": _p(cross.q_proj.weight), p + "cross_attn.q.bias": _p(cross.q_proj.bias),
                  p + "cross_attn.kv.weight": torch.cat([_p(cross.k_proj.weight), _p(cross.v_proj.weight)]),
                  p + "cross_attn.kv.bias": torch.cat([_p(cross.k_proj.bias), _p(cross.v_proj.bias)]),
                  p + "cross_attn.out.weight": _p(cross.out_proj.weight),
                  p + "cross_attn.out.bias": _p(cross.out_proj.bias),
                  p + "ln2.weight": _p(layer.encoder_attn_layer_norm.weight),
                  p + "ln2.bias": _p(layer.encoder_attn_layer_norm.bias),
                  p + "ffn.fc1.weight": _p(layer.fc1.weight), p + "ffn.fc1.bias": _p(layer.fc1.bias),
                  p + "ffn.fc2.weight": _p(layer.fc2.weight), p + "ffn.fc2.bias": _p(layer.fc2.bias),
                  p + "ln3.weight": _p(layer.final_layer_norm.weight), p + "ln3.bias": _p(layer.final_layer_norm.bias)})
    if not tied:
        t["lm_head.weight"] = _p(model.lm_head.weight)
    generation = getattr(model, "generation_config", None)
    options = generation_options(generation) if generation is not None else GenerationOptions()
    return spec, t, options
