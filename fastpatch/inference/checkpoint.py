"""The exported file set: ``model.safetensors`` (weights) + ``config.json`` (shape, decoding).

Weights use fastpatch's own names and ``nn.Linear`` layouts (``layers.3.attn.qkv.weight`` is
``[3H, H]``), not any framework's, so loading needs neither transformers nor fairseq, and one
engine serves checkpoints from several frameworks. ``config.json``::

    {"format": "fastpatch-inference", "format_version": 1, "architecture": "gpt",
     "model": {...architecture fields...}, "generation": {...GenerationOptions...},
     "source": "transformers.GPT2LMHeadModel"}

Loading checks every tensor against the shapes the config implies and names the first one that
is missing, unexpected or of the wrong shape.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

FORMAT = "fastpatch-inference"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # the only dependency of the file format besides torch
        raise ImportError("fastpatch.inference reads and writes weights with the 'safetensors' "
                          "package: pip install safetensors") from exc
    return safetensors.torch


class ModelSpec:
    """Base of the engines' frozen dataclass specs (``BertSpec``, ``GptSpec``,
    ``TransformerSpec``): the JSON round trip of ``config.json``'s ``model`` section."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model fields {unknown} in config.json")
        return cls(**d)


def validate_spec(spec, positive_ints: Tuple[str, ...]) -> None:
    """Shared checks of a model spec (``BertSpec``, ``GptSpec``, ``TransformerSpec``): the named
    fields are positive ints, heads divide the hidden size, the activation has a fused kernel
    (stored back in its canonical name; specs are frozen dataclasses)."""
    from ..ops.activations import canonical_activation

    for name in positive_ints:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be a positive int, got {value!r}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"model.hidden_size ({spec.hidden_size}) must be divisible by "
                         f"model.num_heads ({spec.num_heads})")
    if canonical_activation(spec.activation) is None:
        raise ValueError(f"model.activation {spec.activation!r} has no fused kernel")
    object.__setattr__(spec, "activation", canonical_activation(spec.activation))


def check_tensors(expected: Mapping[str, Tuple[int, ...]], tensors: Mapping[str, Tensor],
                  where: str) -> None:
    """``tensors`` must be exactly the names of ``expected``, with those shapes, one floating
    dtype and one device; raises ``ValueError`` naming the first offending tensor."""
    for name, shape in expected.items():  # in model order: the first bad tensor is reported
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"{where}: tensor {name!r} is missing (expected shape {list(shape)})")
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{where}: tensor {name!r} must be a floating-point tensor")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, but the "
                             f"config implies {list(shape)}")
    for name in tensors:
        if name not in expected:
            raise ValueError(f"{where}: unexpected tensor {name!r} (not part of this architecture)")
    first_name = next(iter(expected))
    first = tensors[first_name]
    for name in expected:
        tensor = tensors[name]
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(f"{where}: tensor {name!r} is {tensor.dtype} on {tensor.device} but "
                             f"{first_name!r} is {first.dtype} on {first.device}")


def save(path: str, architecture: str, model: dict, generation: dict, tensors: Mapping[str, Tensor],
         source: str) -> None:
    """Write the file set into directory ``path`` (created if needed; files overwritten)."""
    os.makedirs(path, exist_ok=True)
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, architecture=architecture,
                  model=model, generation=generation, source=source)
    # safetensors refuses views and shared storage (tied or transposed weights): own copies
    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    _safetensors().save_file(owned, os.path.join(path, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1)


def load(path: str, architecture: str, *, device: Optional[torch.device] = None,
         dtype: Optional[torch.dtype] = None) -> Tuple[dict, Dict[str, Tensor], dict]:
    """``(model config, tensors, generation options)`` of the file set in directory ``path``.

    Args:
        architecture: what the caller can run ("gpt", "bert"); another one is a ``ValueError``.
        device: where the tensors go (default: CUDA if available, else CPU).
        dtype: cast floating tensors to it (default: as stored).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: export a model with fastpatch.export(model, path)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a fastpatch export (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {config.get('format_version')!r}; "
                         f"this fastpatch reads version {FORMAT_VERSION}")
    if config.get("architecture") != architecture:
        raise ValueError(f"{path} holds a {config.get('architecture')!r} model, not {architecture!r}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    tensors = _safetensors().load_file(weights_path, device=str(device))
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    return config["model"], tensors, config.get("generation", {})
