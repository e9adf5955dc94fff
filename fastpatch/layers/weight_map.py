"""Declarative name maps between a fused module's parameters and a framework's layout.

A :class:`WeightMap` is a list of entries ``fused name <- source names (+ transform)``, e.g.
``qkv_weight <- self_attn.{q,k,v}_proj.weight (concat along dim 0)`` or, for GPT-2's ``Conv1D``,
``qkv_weight <- attn.c_attn.weight (transpose)``. The same entries run both ways, so a fused
module can be built from a framework layer's weights, write its weights back into that layer,
and present the framework's ``state_dict`` keys (see :meth:`WeightMap.attach`): checkpoints stay
ordinary framework checkpoints (DESIGN principle 2).

The maps of the layouts fastpatch knows (fairseq/BART, HF BERT, HF GPT-2) are at the bottom;
they are plain name lists, no framework is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import LayerConfig


# ------------------------------------------------------------------------------- transforms
class Transform:
    """How source tensors become one fused tensor, and back."""

    def to_fused(self, tensors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def to_source(self, fused: Tensor, count: int) -> List[Tensor]:
        """The ``count`` source tensors, as new tensors (never views of ``fused``: views of one
        storage look like tied weights to ``save_pretrained`` and safetensors)."""
        raise NotImplementedError


class Identity(Transform):
    def to_fused(self, tensors):
        (t,) = tensors
        return t

    def to_source(self, fused, count):
        return [fused]

    def __repr__(self):
        return "identity"


@dataclass(frozen=True)
class Concat(Transform):
    """Sources concatenated along ``dim``; written back as equal chunks (q/k/v, k/v)."""

    dim: int = 0

    def to_fused(self, tensors):
        return torch.cat(list(tensors), dim=self.dim)

    def to_source(self, fused, count):
        if fused.shape[self.dim] % count:
            raise ValueError(f"cannot split dim {self.dim} of size {fused.shape[self.dim]} "
                             f"into {count} equal parts")
        return [c.clone() for c in fused.chunk(count, dim=self.dim)]

    def __repr__(self):
        return f"concat(dim={self.dim})"


class Transpose(Transform):
    """A 2-D weight stored ``[in, out]`` (GPT-2's Conv1D) against ``nn.Linear``'s ``[out, in]``."""

    def to_fused(self, tensors):
        (t,) = tensors
        return t.t()

    def to_source(self, fused, count):
        return [fused.t().contiguous()]

    def __repr__(self):
        return "transpose"


IDENTITY = Identity()
CONCAT = Concat(0)
TRANSPOSE = Transpose()


@dataclass(frozen=True)
class Entry:
    """``target`` (a fused parameter name) built from ``sources`` by ``transform``."""

    target: str
    sources: Tuple[str, ...]
    transform: Transform = IDENTITY

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        if len(self.sources) != 1 and not isinstance(self.transform, Concat):
            raise ValueError(f"entry {self.target!r}: {len(self.sources)} sources need a Concat "
                             f"transform, got {self.transform!r}")


SourceLike = Union[nn.Module, Mapping[str, Tensor]]


def _state_of(source: SourceLike) -> Mapping[str, Tensor]:
    return source.state_dict() if isinstance(source, nn.Module) else source


class WeightMap:
    """Entries mapping fused parameter names to source names, usable in both directions."""

    def __init__(self, entries: Iterable[Entry]):
        self.entries: Tuple[Entry, ...] = tuple(entries)
        targets = [e.target for e in self.entries]
        sources = [s for e in self.entries for s in e.sources]
        for kind, names in (("fused", targets), ("source", sources)):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"weight map names the {kind} key(s) {duplicates} twice")

    def __repr__(self):
        lines = [f"  {e.target} <- {', '.join(e.sources)} [{e.transform!r}]" for e in self.entries]
        return "WeightMap(\n" + "\n".join(lines) + "\n)"

    @property
    def fused_keys(self) -> Tuple[str, ...]:
        return tuple(e.target for e in self.entries)

    @property
    def source_keys(self) -> Tuple[str, ...]:
        return tuple(s for e in self.entries for s in e.sources)

    # ---------------------------------------------------------------- state-dict conversions
    def to_fused(self, source_state: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
        """Fused-layout tensors from a source-layout state dict (keys under ``prefix``)."""
        missing = [prefix + s for s in self.source_keys if prefix + s not in source_state]
        if missing:
            raise KeyError(f"source state is missing {missing}")
        return {e.target: e.transform.to_fused([source_state[prefix + s] for s in e.sources])
                for e in self.entries}

    def to_source(self, fused_state: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
        """Source-layout tensors (keys under ``prefix``) from a fused-layout state dict."""
        missing = [prefix + t for t in self.fused_keys if prefix + t not in fused_state]
        if missing:
            raise KeyError(f"fused state is missing {missing}")
        out = {}
        for e in self.entries:
            pieces = e.transform.to_source(fused_state[prefix + e.target], len(e.sources))
            out.update({prefix + s: p for s, p in zip(e.sources, pieces)})
        return out

    # ------------------------------------------------------------------- module operations
    @torch.no_grad()
    def load_into(self, fused: nn.Module, source: SourceLike) -> nn.Module:
        """Copies ``source``'s weights (a module or a state dict) into ``fused``; returns it.

        Shapes must match exactly; the copy converts dtype and device to the fused module's.
        """
        params = dict(fused.named_parameters())
        unmapped = sorted(set(params) - set(self.fused_keys))
        if unmapped:
            raise KeyError(f"the weight map has no entry for the fused parameter(s) {unmapped}")
        for name, value in self.to_fused(_state_of(source)).items():
            if name not in params:
                raise KeyError(f"the fused module has no parameter {name!r}")
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(f"{name}: source gives shape {tuple(value.shape)}, the fused "
                                 f"module has {tuple(target.shape)}")
            target.copy_(value)
        return fused

    @torch.no_grad()
    def write_back(self, fused: nn.Module, source: nn.Module) -> nn.Module:
        """Copies ``fused``'s current weights into ``source`` (in its layout); returns ``source``."""
        tensors = dict(source.named_parameters())
        tensors.update(dict(source.named_buffers()))
        for name, value in self.to_source(dict(fused.named_parameters())).items():
            if name not in tensors:
                raise KeyError(f"the source module has no tensor {name!r}")
            if tensors[name].shape != value.shape:
                raise ValueError(f"{name}: fused gives shape {tuple(value.shape)}, the source "
                                 f"module has {tuple(tensors[name].shape)}")
            tensors[name].copy_(value)
        return source

    def attach(self, fused: nn.Module) -> nn.Module:
        """Makes ``fused.state_dict()`` use the source keys and layout and ``load_state_dict``
        accept them (fused keys are accepted too), also when ``fused`` is nested in a model.

        The parameters themselves stay fused, so optimizers and autograd are unaffected.
        """
        fused.register_state_dict_post_hook(_SourceKeysOnSave(self))
        fused.register_load_state_dict_pre_hook(_FusedKeysOnLoad(self))
        fused.weight_map = self
        return fused


class _SourceKeysOnSave:
    """``state_dict`` post-hook: fused entries -> source entries (a class, so models pickle)."""

    def __init__(self, weight_map: WeightMap):
        self.weight_map = weight_map

    def __call__(self, module, state, prefix, local_metadata):
        keys = [prefix + k for k in self.weight_map.fused_keys]
        if not all(k in state for k in keys):
            return  # e.g. a parametrization or wrapper renamed them: leave them as they are
        fused_state = {k: state.pop(prefix + k).detach() for k in self.weight_map.fused_keys}
        for name, value in self.weight_map.to_source(fused_state).items():
            state[prefix + name] = value


class _FusedKeysOnLoad:
    """``load_state_dict`` pre-hook: source entries -> fused entries, when all are present."""

    def __init__(self, weight_map: WeightMap):
        self.weight_map = weight_map

    def __call__(self, module, state, prefix, *args):
        keys = [prefix + s for s in self.weight_map.source_keys]
        if not all(k in state for k in keys):
            return  # fused keys, or an incomplete state: load_state_dict reports what is missing
        converted = self.weight_map.to_fused(state, prefix)
        for key in keys:
            del state[key]
        state.update({prefix + k: v for k, v in converted.items()})


# --------------------------------------------------------------------- known source layouts
def _attention_entries(cfg: LayerConfig, fused: str, q: str, k: str, v: str, out: str,
                       norm: str, cross: bool) -> List[Entry]:
    if cross:
        entries = [Entry(f"{fused}_q_weight", f"{q}.weight"),
                   Entry(f"{fused}_kv_weight", (f"{k}.weight", f"{v}.weight"), CONCAT)]
        if cfg.qkv_bias:
            entries += [Entry(f"{fused}_q_bias", f"{q}.bias"),
                        Entry(f"{fused}_kv_bias", (f"{k}.bias", f"{v}.bias"), CONCAT)]
    else:
        entries = [Entry(f"{fused}_weight", (f"{q}.weight", f"{k}.weight", f"{v}.weight"), CONCAT)]
        if cfg.qkv_bias:
            entries.append(Entry(f"{fused}_bias", (f"{q}.bias", f"{k}.bias", f"{v}.bias"), CONCAT))
    out_name = "cross_out" if cross else "attn_out"
    entries.append(Entry(f"{out_name}_weight", f"{out}.weight"))
    if cfg.attn_out_bias:
        entries.append(Entry(f"{out_name}_bias", f"{out}.bias"))
    norm_name = "cross_norm" if cross else "attn_norm"
    entries += [Entry(f"{norm_name}_weight", f"{norm}.weight"),
                Entry(f"{norm_name}_bias", f"{norm}.bias")]
    return entries


def _ffn_entries(cfg: LayerConfig, fc1: str, fc2: str, norm: str,
                 transform: Transform = IDENTITY) -> List[Entry]:
    entries = [Entry("fc1_weight", f"{fc1}.weight", transform),
               Entry("fc2_weight", f"{fc2}.weight", transform)]
    if cfg.fc1_bias:
        entries.append(Entry("fc1_bias", f"{fc1}.bias"))
    if cfg.fc2_bias:
        entries.append(Entry("fc2_bias", f"{fc2}.bias"))
    return entries + [Entry("ffn_norm_weight", f"{norm}.weight"),
                      Entry("ffn_norm_bias", f"{norm}.bias")]


def fairseq_layer_map(cfg: LayerConfig) -> WeightMap:
    """fairseq's ``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (``cfg.cross_attention``
    selects the decoder's ``encoder_attn``), which BART, mBART and Marian in HF share by name."""
    entries = _attention_entries(cfg, "qkv", "self_attn.q_proj", "self_attn.k_proj",
                                 "self_attn.v_proj", "self_attn.out_proj", "self_attn_layer_norm",
                                 cross=False)
    if cfg.cross_attention:
        entries += _attention_entries(cfg, "cross", "encoder_attn.q_proj", "encoder_attn.k_proj",
                                      "encoder_attn.v_proj", "encoder_attn.out_proj",
                                      "encoder_attn_layer_norm", cross=True)
    return WeightMap(entries + _ffn_entries(cfg, "fc1", "fc2", "final_layer_norm"))


def hf_bert_layer_map(cfg: LayerConfig) -> WeightMap:
    """Hugging Face ``BertLayer`` (and RoBERTa, XLM-R, ELECTRA: same names)."""
    if cfg.cross_attention:
        raise ValueError("cross_attention: the BERT layer map covers encoder layers only")
    entries = _attention_entries(cfg, "qkv", "attention.self.query", "attention.self.key",
                                 "attention.self.value", "attention.output.dense",
                                 "attention.output.LayerNorm", cross=False)
    return WeightMap(entries + _ffn_entries(cfg, "intermediate.dense", "output.dense",
                                            "output.LayerNorm"))


def hf_gpt2_block_map(cfg: LayerConfig) -> WeightMap:
    """Hugging Face ``GPT2Block``: ``Conv1D`` weights are ``[in, out]``, hence the transposes."""
    if cfg.cross_attention:
        raise ValueError("cross_attention: the GPT-2 block map does not cover add_cross_attention")
    entries = [Entry("qkv_weight", "attn.c_attn.weight", TRANSPOSE),
               Entry("attn_out_weight", "attn.c_proj.weight", TRANSPOSE),
               Entry("attn_norm_weight", "ln_1.weight"), Entry("attn_norm_bias", "ln_1.bias")]
    if cfg.qkv_bias:
        entries.append(Entry("qkv_bias", "attn.c_attn.bias"))
    if cfg.attn_out_bias:
        entries.append(Entry("attn_out_bias", "attn.c_proj.bias"))
    return WeightMap(entries + _ffn_entries(cfg, "mlp.c_fc", "mlp.c_proj", "ln_2", TRANSPOSE))
