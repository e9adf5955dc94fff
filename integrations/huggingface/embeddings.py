"""BERT- and RoBERTa-shaped embedding modules of transformers 5, through one fused kernel.

``dropout(LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]))``
runs as ``fastpatch.ops.transformer_embedding`` on the module's own tables and LayerNorm
parameters (in-place class swap, as the layer adapters). Two position rules exist:

* BERT, ELECTRA (``BertEmbeddings`` and its copies): ``position_ids`` default to the module's
  ``position_ids`` buffer sliced at ``[cache_length, cache_length + L)`` (``cache_length`` was
  ``past_key_values_length`` in earlier 5.x releases);
* RoBERTa, XLM-R, CamemBERT, Data2VecText (``RobertaEmbeddings`` and copies): fairseq's
  padding-aware numbering, ``(cumsum(ids != pad) + cache_length) * (ids != pad) + pad``.

Default ``token_type_ids`` are read from the module's ``token_type_ids`` buffer at the
positions (zeros unless someone wrote into it), exactly as transformers does.

GPT-2 has no embedding module (``GPT2Model.forward`` adds ``wte`` and ``wpe`` inline, with no
LayerNorm), so there is nothing to swap there and GPT-2 keeps its own embedding code.

Calls the kernel does not cover run the original forward: ``inputs_embeds``, position or token
type ids that do not have the ``[B, L]`` / ``[1, L]`` shape, tables of mixed dtypes.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
from torch import nn

from fastpatch.adapters import FUSED_ATTR, LayerAdapter
from fastpatch.ops import fairseq_positions, transformer_embedding

BERT_EMBEDDINGS = ("BertEmbeddings", "ElectraEmbeddings")
ROBERTA_EMBEDDINGS = ("RobertaEmbeddings", "XLMRobertaEmbeddings", "CamembertEmbeddings",
                      "Data2VecTextEmbeddings")

# The forwards the fused one reproduces; another signature means another transformers release
# whose semantics were not checked. Later 5.x releases renamed ``past_key_values_length`` to
# ``cache_length`` (same meaning: the tokens already cached before these).
_FORWARD_ARGS = tuple(("self", "input_ids", "token_type_ids", "position_ids", "inputs_embeds", offset)
                      for offset in ("past_key_values_length", "cache_length"))


@dataclasses.dataclass(frozen=True)
class EmbeddingPlan:
    padding_aware_positions: bool  # RoBERTa's rule (True) or BERT's buffer slice (False)


def _fits(ids: torch.Tensor, batch: int, length: int) -> bool:
    """``ids`` is ``[B, L]``, or broadcasts to it along the batch and/or length dim."""
    return (ids.dim() == 2 and ids.shape[0] in (1, batch) and ids.shape[1] in (1, length)
            and not ids.is_floating_point())


def _output_dtype(table: torch.Tensor) -> torch.dtype:
    """Eager's dtype: CUDA autocast runs ``layer_norm`` in fp32, so half tables give fp32 there;
    CPU autocast keeps the input's dtype."""
    if (table.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            and table.dtype in (torch.float16, torch.bfloat16)):
        return torch.float32
    return table.dtype


class FusedTransformerEmbeddings:
    """Fused forward of BERT/RoBERTa embeddings; the original forward remains the fallback."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                cache_length=0, past_key_values_length=None):
        if past_key_values_length is not None:  # the argument's name before cache_length
            cache_length = past_key_values_length
        plan: EmbeddingPlan = getattr(self, FUSED_ATTR)
        word, position, token_type, norm = (self.word_embeddings, self.position_embeddings,
                                            self.token_type_embeddings, self.LayerNorm)
        tensors = (word.weight, position.weight, token_type.weight, norm.weight, norm.bias)
        if (input_ids is None or inputs_embeds is not None or input_ids.dim() != 2
                or len({t.dtype for t in tensors if t is not None}) != 1):
            return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)
        batch, length = input_ids.shape
        positions = position_ids
        if positions is None:
            if plan.padding_aware_positions:
                positions = fairseq_positions(input_ids, self.padding_idx)
                if cache_length:
                    positions = positions + cache_length * input_ids.ne(self.padding_idx)
            else:
                positions = self.position_ids[:, cache_length:length + cache_length]
        types = token_type_ids
        if types is None and _fits(positions, batch, length):
            if hasattr(self, "token_type_ids"):
                # transformers' rule: the buffer (zeros unless written to) read at the positions
                buffered = self.token_type_ids.to(positions.device).expand(positions.shape[0], -1)
                types = torch.gather(buffered, dim=1, index=positions).expand(batch, length)
            else:
                types = torch.zeros((batch, length), dtype=torch.long, device=input_ids.device)
        if types is None or not (_fits(positions, batch, length) and _fits(types, batch, length)):
            return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)
        out = transformer_embedding(
            input_ids, word.weight, position_ids=positions, position_weight=position.weight,
            padding_idx=position.padding_idx, token_type_ids=types,
            token_type_weight=token_type.weight, ln_weight=norm.weight, ln_bias=norm.bias,
            eps=norm.eps, p=self.dropout.p, training=self.dropout.training,
            token_padding_idx=word.padding_idx)
        return out.to(_output_dtype(word.weight))


def _embedding_knob(name: str, table) -> Optional[str]:
    if not isinstance(table, nn.Embedding):
        return f"{name} is {type(table).__name__}, not nn.Embedding"
    if type(table).forward is not nn.Embedding.forward:
        # the fused kernel reads .weight; an overridden forward (an adapter, a scaled or
        # quantised table) computes something else from it
        return f"{name} is {type(table).__name__}, whose forward overrides nn.Embedding's"
    if table.max_norm is not None:
        return f"{name}.max_norm={table.max_norm} (renormalises rows in place)"
    if table.scale_grad_by_freq:
        return f"{name}.scale_grad_by_freq=True"
    if table.sparse:
        return f"{name}.sparse=True (sparse gradients)"
    return None


class TransformerEmbeddingsAdapter(LayerAdapter):
    name = "huggingface.embeddings"
    fused_mixin = FusedTransformerEmbeddings

    def applies_to(self, module: nn.Module) -> bool:
        return type(module).__name__ in BERT_EMBEDDINGS + ROBERTA_EMBEDDINGS

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        args = tuple(inspect.signature(type(module).forward).parameters)
        if args not in _FORWARD_ARGS:
            return (f"{type(module).__name__}.forward{args} is not the transformers 5 signature "
                    "fastpatch reproduces")
        kind = getattr(module, "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            return f"position_embedding_type={kind!r} (relative positions)"
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            reason = _embedding_knob(name, getattr(module, name, None))
            if reason is not None:
                return reason
        if module.token_type_embeddings.padding_idx is not None:
            return "token_type_embeddings.padding_idx is set (the fused kernel has none for types)"
        norm = getattr(module, "LayerNorm", None)
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None \
                or type(norm).forward is not nn.LayerNorm.forward:
            return "LayerNorm is not an affine nn.LayerNorm"
        if tuple(norm.normalized_shape) != (module.word_embeddings.embedding_dim,):
            return f"LayerNorm.normalized_shape={tuple(norm.normalized_shape)} is not the hidden size"
        if not isinstance(getattr(module, "dropout", None), nn.Dropout):
            return "dropout is not nn.Dropout"
        if type(module).__name__ in ROBERTA_EMBEDDINGS and module.padding_idx is None:
            return "padding_idx is None (RoBERTa positions need the pad id)"
        return None

    def prepare(self, module: nn.Module) -> EmbeddingPlan:
        return EmbeddingPlan(padding_aware_positions=type(module).__name__ in ROBERTA_EMBEDDINGS)
