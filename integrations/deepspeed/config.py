"""Reading and checking the DeepSpeed JSON config of a fairseq launch, before anything heavy starts.

:func:`load_config` reads the file and refuses, with the file and the problem named
(:class:`DeepSpeedConfigError`), what this launch cannot run:

* a missing, unreadable or non-JSON file, duplicate keys (DeepSpeed refuses them too, later);
* ZeRO stage 3: it partitions the parameters themselves and gathers each one in hooks around the
  ``forward`` of the module that owns it. fastpatch's fused layers read the weights of their child
  modules directly (q/k/v concatenated into one projection per call) without calling those
  children, so the hooks would not run and the layers would see empty shards. Stages 0, 1 and 2
  keep every parameter whole on every rank and work unchanged;
* fp16 and bf16 both enabled, apex ``amp``, and ``"auto"`` values (only the Hugging Face Trainer
  fills those in).

:func:`engine_config` then adapts a checked config to fairseq's batching: fairseq batches by tokens
(``--max-tokens``) and accumulates ``--update-freq`` batches per update, so DeepSpeed's
sentence-based batch sizes do not apply. It sets one "micro batch" per fairseq batch and
``gradient_accumulation_steps`` to ``--update-freq`` (DeepSpeed only uses them for bookkeeping
here: the training loop marks the accumulation boundary itself).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Tuple

logger = logging.getLogger("fastpatch.deepspeed")

SUPPORTED_ZERO_STAGES = (0, 1, 2)
# keys describing batches in sentences; fairseq's --max-tokens / --batch-size decide instead
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config this launch cannot use; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"DeepSpeed config {path}: {problem}")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_config(path: str) -> Dict[str, Any]:
    """The checked config in ``path`` (a dict); raises :class:`DeepSpeedConfigError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeepSpeedConfigError(path, "no such file")
    if os.path.isdir(path):
        raise DeepSpeedConfigError(path, "is a directory, not a JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise DeepSpeedConfigError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DeepSpeedConfigError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        config = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(
            path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except _DuplicateKey as exc:
        raise DeepSpeedConfigError(path, f"key {exc.args[0]!r} appears twice in one object") from exc
    check_config(config, path)
    return config


def _auto_values(node: Any, where: str = "") -> List[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items()
                for p in _auto_values(value, f"{where}.{key}" if where else str(key))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in _auto_values(value, f"{where}[{i}]")]
    return [where] if node == "auto" else []


def _section(config: Dict[str, Any], key: str, path: str) -> Dict[str, Any]:
    section = config.get(key, {})
    if not isinstance(section, dict):
        raise DeepSpeedConfigError(path, f"{key!r} must be an object, got {json.dumps(section)}")
    return section


def _enabled(config: Dict[str, Any], key: str, path: str) -> bool:
    enabled = _section(config, key, path).get("enabled", False)
    if not isinstance(enabled, bool):
        raise DeepSpeedConfigError(path, f"{key}.enabled must be true or false, got {json.dumps(enabled)}")
    return enabled


def zero_stage(config: Dict[str, Any], path: str = "<config>") -> int:
    """The ZeRO stage of a config (0 without a ``zero_optimization`` section)."""
    zero = config.get("zero_optimization", {})
    if isinstance(zero, bool):
        raise DeepSpeedConfigError(path, 'zero_optimization must be an object such as {"stage": 1}, '
                                         f"got {json.dumps(zero)}")
    stage = _section(config, "zero_optimization", path).get("stage", 0)
    if stage == 3:
        raise DeepSpeedConfigError(
            path, "ZeRO stage 3 is not supported: it partitions the parameters and gathers each one "
                  "in hooks around the forward of the module that owns it, and fastpatch's fused "
                  "layers read their children's weights directly, so those hooks would not run. "
                  "Use stage 0, 1 or 2 (stage 2 partitions gradients and optimizer states).")
    if isinstance(stage, bool) or stage not in SUPPORTED_ZERO_STAGES:
        raise DeepSpeedConfigError(path, f"zero_optimization.stage must be 0, 1 or 2, got {json.dumps(stage)}")
    return stage


def check_config(config: Any, path: str = "<config>") -> None:
    """Raises :class:`DeepSpeedConfigError` for what this launch cannot run (see the module doc)."""
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(path, f"must be a JSON object, got a {type(config).__name__}")
    auto = _auto_values(config)
    if auto:
        raise DeepSpeedConfigError(
            path, f"{', '.join(auto)} {'is' if len(auto) == 1 else 'are'} \"auto\": only the Hugging "
                  "Face Trainer fills in \"auto\" values; give a value")
    zero_stage(config, path)
    if "bf16" in config and "bfloat16" in config:
        raise DeepSpeedConfigError(path, 'both "bf16" and its alias "bfloat16" are given: keep one')
    bf16_key = "bfloat16" if "bfloat16" in config else "bf16"
    if _enabled(config, "fp16", path) and _enabled(config, bf16_key, path):
        raise DeepSpeedConfigError(path, f"fp16.enabled and {bf16_key}.enabled are both true: "
                                         "enable one precision")
    if _enabled(config, "amp", path):
        raise DeepSpeedConfigError(path, "amp (NVIDIA apex) is not supported: use the fp16 or bf16 "
                                         "section")
    for key in ("optimizer", "scheduler"):
        if key in config:
            section = _section(config, key, path)
            if not isinstance(section.get("type"), str):
                raise DeepSpeedConfigError(path, f'{key}.type must name the DeepSpeed {key} '
                                                 f'(e.g. "AdamW"), got {json.dumps(section.get("type"))}')
    clip = config.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise DeepSpeedConfigError(path, f"gradient_clipping must be a number >= 0, got {json.dumps(clip)}")


def precision(config: Dict[str, Any]) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` (of a checked config)."""
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    if config.get("bf16", config.get("bfloat16", {})).get("enabled", False):
        return "bf16"
    return "fp32"


def engine_config(config: Dict[str, Any], path: str, *, update_freq: int, clip_norm: float,
                  clip_norm_given: bool) -> Dict[str, Any]:
    """The config passed to ``deepspeed.initialize`` (a copy): batch bookkeeping from fairseq's
    ``--update-freq``; ``gradient_clipping`` from ``--clip-norm`` unless the config sets it
    (DeepSpeed's own default would clip at 1.0, fairseq's ``--clip-norm`` defaults to no clipping;
    an explicit ``--clip-norm`` that disagrees with the config is an error); and
    ``data_types.buffer_dtype`` set to the fp16/bf16 precision (fairseq models expect their
    buffers cast with the parameters); and ``zero_allow_untested_optimizer`` when fairseq's
    ``--optimizer`` (e.g. ``ls_adam``) is passed to DeepSpeed as the client optimizer under ZeRO
    (DeepSpeed only vouches for its own list)."""
    config = copy.deepcopy(config)
    given = config.get("gradient_accumulation_steps")
    if given is not None and given != update_freq:
        raise DeepSpeedConfigError(
            path, f"gradient_accumulation_steps is {json.dumps(given)} but --update-freq is "
                  f"{update_freq}: fairseq's --update-freq decides how many batches make one update; "
                  "make them equal or drop the key")
    for key in _BATCH_KEYS:
        if key in config:
            logger.warning("%s: ignoring %s=%s: fairseq's --max-tokens/--batch-size and "
                           "--update-freq decide the batches", path, key, config.pop(key))
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = update_freq
    if "gradient_clipping" not in config:
        config["gradient_clipping"] = clip_norm
    elif clip_norm_given and config["gradient_clipping"] != clip_norm:
        raise DeepSpeedConfigError(
            path, f"gradient_clipping is {json.dumps(config['gradient_clipping'])} but --clip-norm is "
                  f"{clip_norm}: give one of them")
    half = precision(config)
    if half != "fp32":
        # fairseq's --fp16/--bf16 cast the whole model, buffers included (its sinusoidal positions
        # take their dtype from a buffer); DeepSpeed >= 0.19 casts only parameters unless told
        _section(config, "data_types", path)  # an object, if given
        config.setdefault("data_types", {}).setdefault("buffer_dtype", half)
    if "optimizer" not in config and zero_stage(config, path) > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    return config
