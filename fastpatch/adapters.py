"""The contract between ``accelerate`` and the per-framework adapters in ``integrations/``.

An adapter recognises one kind of layer (``BertLayer``, ``GPT2Block``, fairseq's
``TransformerEncoderLayer``...), says why a given instance cannot be accelerated (a knob the
fused layer cannot honour), and accelerates it **in place**: the module keeps its submodules and
``nn.Parameter`` objects, and its class becomes a subclass of the original whose ``forward`` runs
the fused ops. Because nothing is copied or renamed:

* ``state_dict()`` keys and layouts are the original ones (checkpoints load both ways);
* an optimizer, DDP or ZeRO holding the parameters keeps working;
* ``isinstance`` checks, output recorders and gradient-checkpointing wrappers of the framework
  still see their own class;
* ``revert`` only restores the class.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional

from torch import nn

FUSED_ATTR = "_fastpatch"  # per-instance state of an accelerated module (its fused plan)


class LayerAdapter:
    """Base class of the adapters. Subclasses set ``fused_mixin`` and implement the three hooks."""

    #: short name shown in reports, e.g. "huggingface.bert_layer"
    name: str = ""
    #: class placed before the original in the accelerated module's MRO; defines ``forward``
    fused_mixin: type = object

    def applies_to(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def unsupported_reason(self, module: nn.Module, path: str) -> Optional[str]:
        """Why this instance cannot be accelerated (names the knob), or None if it can."""
        raise NotImplementedError

    def prepare(self, module: nn.Module):
        """Per-instance state for the fused forward (configuration, views of the parameters)."""
        raise NotImplementedError

    def accelerate(self, module: nn.Module) -> None:
        state = self.prepare(module)
        original = type(module)
        module.__class__ = fused_subclass(self.fused_mixin, original)
        setattr(module, FUSED_ATTR, state)


@functools.lru_cache(maxsize=None)
def fused_subclass(mixin: type, original: type, keep_name: bool = False) -> type:
    """``class Fused<Original>(mixin, original)``, created once per pair.

    ``keep_name`` keeps the original class name, for a model's root class: transformers writes
    ``type(model).__name__`` into the saved config's ``architectures``.

    Instances pickle (``copy.deepcopy``, multiprocessing) as "this mixin over this
    original class" plus their state, so a loading process with fastpatch installed rebuilds the
    same accelerated module; the generated class itself is not importable by name.
    """
    name = original.__name__ if keep_name else f"Fused{original.__name__}"
    cls = type(name, (mixin, original), {"__module__": mixin.__module__,
                                         "_fastpatch_original_class": original,
                                         "_fastpatch_mixin": mixin,
                                         "_fastpatch_keep_name": keep_name,
                                         "__reduce_ex__": _reduce_accelerated})
    _share_output_recording(original, cls)
    return cls


def _reduce_accelerated(module: nn.Module, protocol):
    cls = type(module)
    mixin = cls._fastpatch_mixin
    # a mixin generated per original class says how to generate it again
    mixin_ref = getattr(mixin, "_fastpatch_rebuild", mixin)
    # object.__getstate__ exists from Python 3.11 on; before, an instance's state is its __dict__
    state = module.__getstate__() if hasattr(module, "__getstate__") else module.__dict__
    return (_new_accelerated, (mixin_ref, cls._fastpatch_original_class, cls._fastpatch_keep_name),
            state)


def _new_accelerated(mixin_ref, original: type, keep_name: bool) -> nn.Module:
    mixin = mixin_ref[0](*mixin_ref[1]) if isinstance(mixin_ref, tuple) else mixin_ref
    cls = fused_subclass(mixin, original, keep_name)
    return cls.__new__(cls)


def _share_output_recording(original: type, cls: type) -> None:
    """transformers 5 looks up what a model may record (``output_hidden_states``...) in a
    registry keyed by the model's class name, filled when the model is built: a swapped root
    class gets the original's entry, or it would return no hidden states."""
    import sys

    capturing = sys.modules.get("transformers.utils.output_capturing")
    registry = getattr(capturing, "_CAN_RECORD_REGISTRY", None)
    if not isinstance(registry, dict):
        return
    flags = dict.get(registry, str(original))
    if flags is not None:
        dict.__setitem__(registry, str(cls), flags)


def bypassed_submodule(module: nn.Module, expected: Dict[str, type]) -> Optional[str]:
    """Why a fused forward that reads the weights of ``module``'s submodules directly would be
    wrong, or None.

    ``expected`` maps dotted submodule names to the class whose computation the fused op
    reproduces (``nn.Linear``, ``nn.LayerNorm``, transformers' ``Conv1D``). A submodule of
    another class (a LoRA or quantised wrapper) or a subclass that overrides ``forward`` computes
    something the fused op would silently drop.
    """
    for name, base in expected.items():
        sub = module.get_submodule(name)
        if not isinstance(sub, base) or type(sub).forward is not base.forward:
            found = f"{type(sub).__module__}.{type(sub).__qualname__}"
            return (f"{name} is {found}, not a plain {base.__module__}.{base.__qualname__} "
                    "(adapter-wrapped or quantised: the fused layer would bypass its forward)")
    return None


def is_accelerated(module: nn.Module) -> bool:
    return hasattr(type(module), "_fastpatch_original_class")


def revert_module(module: nn.Module) -> None:
    """Give ``module`` back its original class; its parameters were never moved."""
    module.__class__ = type(module)._fastpatch_original_class
    module.__dict__.pop(FUSED_ATTR, None)


def available_adapters() -> List[LayerAdapter]:
    """Adapters of the frameworks already imported by the caller (none is imported here)."""
    import sys

    adapters: List[LayerAdapter] = []
    if "transformers" in sys.modules:
        from fastpatch.integrations.huggingface import adapters as hf

        adapters += hf()
    if "fairseq" in sys.modules:
        from fastpatch.integrations.fairseq import adapters as fs

        adapters += fs()
    return adapters


def first_match(adapters: Iterable[LayerAdapter], module: nn.Module) -> Optional[LayerAdapter]:
    return next((a for a in adapters if a.applies_to(module)), None)
