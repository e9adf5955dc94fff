"""Checkpoints of a DeepSpeed run in fairseq's format.

A fairseq checkpoint holds the model's full state dict under ``"model"``. Under DeepSpeed the
authoritative weights of an fp16/bf16 run are the fp32 master copies inside the optimizer
(partitioned across ranks by ZeRO 1/2), not the half-precision module parameters; fairseq's own
fp16 checkpoints store the rounded weights. :func:`consolidated_fp32_state_dict` gathers the fp32
masters, so a checkpoint loses nothing and is exactly what an fp32 ``fairseq-train`` would write.

The optimizer and DeepSpeed scheduler states stay partitioned: :func:`save_engine_state` writes
them with DeepSpeed's own ``save_checkpoint`` under ``<save_dir>/deepspeed/<tag>``, and the
fairseq checkpoint records the tag. Only the latest tag is kept (its size is that of the optimizer
state); restoring an older fairseq checkpoint restores the model and resets the optimizer.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, Optional

import torch

logger = logging.getLogger("fastpatch.deepspeed")

#: key of ``extra_state`` naming DeepSpeed's checkpoint: ``{"dir": ..., "tag": ...}``, the
#: directory relative to the fairseq checkpoint's own directory
EXTRA_STATE_KEY = "deepspeed"
ENGINE_DIR = "deepspeed"
_TAG_PREFIX = "update_"


def _fp16_optimizer_masters(optimizer) -> Dict[int, torch.Tensor]:
    """id(param) -> fp32 master of DeepSpeed's stage-0 fp16/bf16 optimizers, which keep flat or
    per-parameter fp32 copies without linking them to the parameters."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    masters = {}
    if hasattr(optimizer, "fp32_groups_flat"):
        for params, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in params:
                masters[id(p)] = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
    elif hasattr(optimizer, "fp32_groups"):
        for params, copies in zip(groups, optimizer.fp32_groups):
            masters.update({id(p): c for p, c in zip(params, copies)})
    return masters


def consolidated_fp32_state_dict(engine) -> Dict[str, torch.Tensor]:
    """``engine.module.state_dict()`` with every parameter as its full fp32 master value and
    floating buffers in fp32, on the CPU, keys and order unchanged.

    Collective under ZeRO 1/2 (each master is all-reduced from its partitions): call it on every
    rank. Raises ``RuntimeError`` if a half-precision parameter has no master copy in the engine's
    optimizer (an optimizer wrapper this function does not know).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    stage0_masters = _fp16_optimizer_masters(engine.optimizer)
    full: Dict[int, torch.Tensor] = {}
    values: Dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in full:
            master = safe_get_full_fp32_param(p)  # ZeRO 1/2 and the bf16 optimizer link masters
            if master is None:
                master = stage0_masters.get(id(p))
            if master is None:
                if p.dtype != torch.float32:
                    raise RuntimeError(
                        f"no fp32 master weight found for {name} ({p.dtype}) in "
                        f"{type(engine.optimizer).__name__}: cannot write an fp32 checkpoint")
                master = p.detach()
            full[id(p)] = master.detach().to("cpu", torch.float32, copy=True)
        values[name] = full[id(p)]
    state = module.state_dict()
    return {key: values[key] if key in values
            else (value.to("cpu", torch.float32) if value.is_floating_point() else value.cpu())
            for key, value in state.items()}


def save_engine_state(engine, save_dir: str, num_updates: int, is_master: bool) -> Dict[str, str]:
    """DeepSpeed's checkpoint (optimizer partitions, scheduler, loss scaler) under
    ``<save_dir>/deepspeed/update_<n>``; collective. Older tags are removed by the master rank.
    Returns the ``extra_state`` entry that points at it."""
    directory = os.path.join(save_dir, ENGINE_DIR)
    tag = f"{_TAG_PREFIX}{num_updates}"
    engine.save_checkpoint(directory, tag=tag)
    if is_master:
        for name in os.listdir(directory):
            if name.startswith(_TAG_PREFIX) and name != tag:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return {"dir": ENGINE_DIR, "tag": tag}


def engine_state_location(checkpoint_path: str, extra_state: Dict) -> Optional[tuple]:
    """``(directory, tag)`` of the DeepSpeed state a fairseq checkpoint points at, or None when it
    has none or it is gone (logged)."""
    entry = (extra_state or {}).get(EXTRA_STATE_KEY)
    if not entry:
        return None
    directory = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), entry["dir"])
    if not os.path.isdir(os.path.join(directory, entry["tag"])):
        logger.warning("%s points at DeepSpeed state %s/%s, which is gone (only the latest save is "
                       "kept)", checkpoint_path, directory, entry["tag"])
        return None
    return directory, entry["tag"]
