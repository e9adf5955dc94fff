"""``lightseq-train``, ``lightseq-generate``, ``lightseq-interactive``: fairseq's own commands.

Each runs fairseq's ``cli_main`` (``fairseq_cli.train`` / ``generate`` / ``interactive``) with
every flag the user gave, plus:

* ``--user-dir`` pointing at fastpatch's module (``ls_transformer*``, ``ls_adam``,
  ``ls_label_smoothed_cross_entropy``), unless the user passes a ``--user-dir`` of their own;
* every model fairseq builds accelerated with ``fastpatch.accelerate`` (plain
  ``--arch transformer_*`` too, and models loaded from checkpoints for generation), the report
  in the log;
* for generation, fairseq's ``SequenceGenerator`` (its beam search, sampling, prefixes, shrinking
  batch) over fastpatch's decoding engine where the model allows (static KV cache, CUDA-graph
  decode steps; see :mod:`.engine`; ``FASTPATCH_FAIRSEQ_ENGINE=0`` keeps fairseq's decoder loop
  over the fused layers);
* fairseq's checkpoints loadable under torch >= 2.6 (its pickled types allow-listed; safe loading
  stays on);
* ``--bf16`` on GPUs: fairseq 0.12 sets ``--tpu`` whenever ``--bf16`` is given (bf16 was a TPU
  feature when it was written), so ``fairseq-train --bf16`` on a GPU dies in ``Trainer`` asking
  for an XLA device. The commands clear that implied flag unless ``--tpu`` was given.

``lightseq-train --demo`` runs the bundled demo instead (see :mod:`.demo`). Without the console
scripts installed: ``python -m fastpatch.integrations.fairseq.cli train|generate|interactive ...``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from typing import List, Optional, Sequence

from . import USER_DIR, hooks

logger = logging.getLogger("fastpatch.fairseq")


@contextlib.contextmanager
def command_line(argv: List[str]):
    """Run a fairseq ``cli_main`` (which reads ``sys.argv``) on ``argv``, restoring it after."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@contextlib.contextmanager
def bf16_without_implied_tpu(argv: Sequence[str]):
    """Within the block, ``options.parse_args_and_arch`` leaves ``tpu`` off for ``--bf16``
    unless ``--tpu`` is among ``argv`` (see the module docstring)."""
    from fairseq import options

    original = options.parse_args_and_arch
    explicit_tpu = _given(argv, "--tpu")

    @functools.wraps(original)
    def parse_args_and_arch(*args, **kwargs):
        parsed = original(*args, **kwargs)
        if getattr(parsed, "bf16", False) and not explicit_tpu:
            parsed.tpu = False
        return parsed

    options.parse_args_and_arch = parse_args_and_arch
    try:
        yield
    finally:
        options.parse_args_and_arch = original


def _run(fairseq_module: str, prog: str, argv: Optional[Sequence[str]], *, engine: bool = False) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = importlib.import_module(fairseq_module)
    from .registry import register

    register()  # in this process as well: the user may bring their own --user-dir
    if _given(argv, "--user-dir"):
        logger.warning("%s: using your --user-dir; fastpatch's modules are registered in this "
                       "process only, so for multi-GPU runs call "
                       "fastpatch.integrations.fairseq.registry.register() from your user dir", prog)
    else:
        argv = ["--user-dir", USER_DIR] + argv
    generators = hooks.generators_on_engine() if engine else contextlib.nullcontext()
    with hooks.accelerate_built_models(), generators, bf16_without_implied_tpu(argv), \
            command_line([prog] + argv):
        command.cli_main()


def train(argv: Optional[Sequence[str]] = None) -> None:
    """``fairseq-train`` with fused layers; ``--demo`` runs the bundled demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in args:
        from .demo import main as demo_main

        args.remove("--demo")
        demo_main(args)
        return
    _run("fairseq_cli.train", "lightseq-train", args)


def generate(argv: Optional[Sequence[str]] = None) -> None:
    """``fairseq-generate`` with the fused model, decoding on the engine where it can."""
    _run("fairseq_cli.generate", "lightseq-generate", argv, engine=True)


def interactive(argv: Optional[Sequence[str]] = None) -> None:
    """``fairseq-interactive`` with the fused model, decoding on the engine where it can."""
    _run("fairseq_cli.interactive", "lightseq-interactive", argv, engine=True)


_COMMANDS = {"train": train, "generate": generate, "interactive": interactive}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        sys.exit(f"usage: python -m fastpatch.integrations.fairseq.cli "
                 f"{{{','.join(_COMMANDS)}}} [fairseq arguments]")
    _COMMANDS[sys.argv[1]](sys.argv[2:])
