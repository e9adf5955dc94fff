"""The training entry DeepSpeed's launcher runs: fairseq training inside a DeepSpeed engine.

    deepspeed [launcher options] <this file> DATA-BIN --user-dir <fastpatch's fairseq user dir> \\
        --arch ls_transformer_wmt_en_de ... --deepspeed_config ds_config.json

(``lightseq-deepspeed DATA-BIN ...`` fills in this file and the user dir; see :mod:`.cli`.)

It takes fairseq's own training arguments (``fairseq-train``'s parser: task, model, criterion,
data, checkpoint and logging options), plus ``--deepspeed_config`` (required), ``--deepspeed`` (accepted,
ignored), ``--local_rank`` (passed by the launcher) and ``--no-fastpatch``. The DeepSpeed config is
read and checked first (:mod:`.config`), the fairseq arguments against it next, before torch
distributed, the data or the model are touched. Then fairseq's own ``train.main`` runs with
:class:`~.trainer.DeepSpeedTrainer` as its trainer: fairseq sets up the task, builds the model
(accelerated by ``fastpatch.accelerate`` as under ``lightseq-train``; ``--no-fastpatch`` keeps
fairseq's layers, for comparisons) and criterion, and trains with its iterators, logging and
checkpoint conventions.

Precision and ZeRO come from the config (fairseq's ``--fp16``/``--bf16`` are refused, to have one
source of truth). The optimizer is the config's ``optimizer`` section, or else fairseq's
``--optimizer`` (``ls_adam``, ``adam``, ...) with fairseq's ``--lr``/``--lr-scheduler``; giving
both is an error, as is a config that sets the learning rate next to an explicit ``--lr``.

Started without a launcher (``python fairseq_train.py ...``), it runs as a single process.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # Run as a file by DeepSpeed's launcher: Python put this directory first on sys.path, where
    # config.py and checkpoint.py would shadow any top-level modules of those names.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

from fastpatch.integrations.deepspeed import EXAMPLE_CONFIG  # noqa: E402
from fastpatch.integrations.deepspeed.config import (DeepSpeedConfigError,  # noqa: E402
                                                     engine_config, load_config)

PROG = "lightseq-deepspeed"
logger = logging.getLogger("fastpatch.deepspeed")


class UsageError(ValueError):
    """fairseq arguments that do not go with a DeepSpeed launch (or with its config)."""


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def config_path(argv: Sequence[str]) -> str:
    """The ``--deepspeed_config`` (or DeepSpeed's older ``--deepscale_config``) of ``argv``."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--deepspeed_config")
    pre.add_argument("--deepscale_config")
    known, _ = pre.parse_known_args(list(argv))
    path = known.deepspeed_config or known.deepscale_config
    if not path:
        raise UsageError(f"--deepspeed_config is required: the DeepSpeed JSON config (ZeRO stage, "
                         f"fp16/bf16, optionally optimizer and scheduler); example: {EXAMPLE_CONFIG}")
    return path


# fairseq options a DeepSpeed launch replaces or cannot honour: (attribute, default, message)
_REFUSED = (
    ("fp16", False, "--fp16: precision comes from the DeepSpeed config: set \"fp16\": {\"enabled\": true}"),
    ("memory_efficient_fp16", False, "--memory-efficient-fp16: precision comes from the DeepSpeed "
                                     "config: set \"fp16\": {\"enabled\": true}"),
    ("bf16", False, "--bf16: precision comes from the DeepSpeed config: set \"bf16\": {\"enabled\": true}"),
    ("memory_efficient_bf16", False, "--memory-efficient-bf16: precision comes from the DeepSpeed "
                                     "config: set \"bf16\": {\"enabled\": true}"),
    ("amp", False, "--amp: precision comes from the DeepSpeed config (fp16 or bf16 section)"),
    ("tpu", False, "--tpu: a DeepSpeed launch runs on GPUs (or on the CPU with --cpu)"),
    ("store_ema", False, "--store-ema is not supported by the DeepSpeed launch"),
    ("use_bmuf", False, "--use-bmuf is not supported by the DeepSpeed launch"),
    ("zero_sharding", "none", "--zero-sharding: set zero_optimization.stage in the DeepSpeed config"),
    ("ddp_backend", None, None),  # checked below: only fully_sharded is refused
    ("model_parallel_size", 1, "--model-parallel-size > 1 is not supported by the DeepSpeed launch"),
    ("pipeline_model_parallel", False, "--pipeline-model-parallel is not supported by the DeepSpeed launch"),
    ("quantization_config_path", None, "--quantization-config-path is not supported by the DeepSpeed launch"),
)


def check_fairseq_args(args: argparse.Namespace, argv: Sequence[str], config: Dict[str, Any],
                       path: str) -> None:
    """Raises :class:`UsageError` for fairseq arguments that conflict with a DeepSpeed launch."""
    for attribute, default, message in _REFUSED:
        if message is not None and getattr(args, attribute, default) not in (default, None):
            raise UsageError(message)
    if getattr(args, "ddp_backend", None) == "fully_sharded":
        raise UsageError("--ddp-backend fully_sharded: DeepSpeed's ZeRO replaces FSDP "
                         "(zero_optimization in the DeepSpeed config)")
    if _given(argv, "--distributed-world-size") or _given(argv, "--world-size"):
        raise UsageError("--distributed-world-size: the DeepSpeed launcher decides the processes "
                         "(--num_gpus, --num_nodes, --include)")
    if len(set(args.update_freq)) > 1:
        raise UsageError(f"--update-freq {','.join(map(str, args.update_freq))}: per-epoch values "
                         "are not supported by the DeepSpeed launch; give one value")
    if args.no_fastpatch and args.arch.startswith("ls_"):
        raise UsageError(f"--no-fastpatch with --arch {args.arch}: ls_* architectures are fastpatch's "
                         f"fused modules; use --arch {args.arch[3:]} to train fairseq's layers")
    if "optimizer" in config:
        kind = config["optimizer"]["type"]
        if args.optimizer is not None:
            raise UsageError(f"{path} defines an optimizer ({kind}) and --optimizer {args.optimizer} "
                             "is given: keep one (without the config's section, fairseq's "
                             "--optimizer, e.g. ls_adam, is passed to DeepSpeed)")
        if _given(argv, "--lr"):
            raise UsageError(f"--lr: the learning rate is optimizer.params.lr in {path}")
    elif args.optimizer is None:
        raise UsageError(f"no optimizer: give --optimizer (e.g. ls_adam) or an \"optimizer\" "
                         f"section in {path}")
    if ("optimizer" in config or "scheduler" in config) and _given(argv, "--lr-scheduler"):
        raise UsageError(f"--lr-scheduler {args.lr_scheduler}: the DeepSpeed config {path} manages "
                         "the learning rate (its optimizer or scheduler section); drop one of them")


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """fairseq's training arguments plus DeepSpeed's, checked; returns ``(args, config)`` with the
    config ready for ``deepspeed.initialize``. Raises :class:`DeepSpeedConfigError` or
    :class:`UsageError`; fairseq's own argument errors exit with status 2 as under fairseq-train."""
    argv = list(argv)
    path = config_path(argv)
    config = load_config(path)  # before importing fairseq or DeepSpeed: errors come fast

    import deepspeed
    from fairseq import options

    parser = options.get_training_parser()
    deepspeed.add_config_arguments(parser)
    group = parser.add_argument_group("fastpatch")
    group.add_argument("--no-fastpatch", action="store_true",
                       help="train fairseq's own layers (no fastpatch.accelerate), for comparisons")
    args = options.parse_args_and_arch(parser, input_args=argv)
    check_fairseq_args(args, argv, config, path)
    return args, engine_config(config, path, update_freq=args.update_freq[0],
                               clip_norm=args.clip_norm, clip_norm_given=_given(argv, "--clip-norm"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_defaults() -> None:
    """Without a launcher (no RANK/WORLD_SIZE in the environment): a world of one process."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


@contextlib.contextmanager
def _fairseq_trainer(module, trainer_factory):
    """fairseq's ``train.main`` constructs ``Trainer(cfg, task, model, criterion, quantizer)`` by
    the module-level name; within the block that name is the DeepSpeed trainer."""
    original = module.Trainer
    module.Trainer = trainer_factory
    try:
        yield
    finally:
        module.Trainer = original


def run(args: argparse.Namespace, config: Dict[str, Any]) -> None:
    """Initializes torch distributed through DeepSpeed and runs fairseq's training loop."""
    _single_process_defaults()
    import deepspeed
    import fairseq_cli.train as fairseq_train
    import torch
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fastpatch.integrations.fairseq import hooks
    from fastpatch.integrations.deepspeed.trainer import DeepSpeedTrainer

    deepspeed.init_distributed(auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", args.device_id))
    if not args.cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    cfg = convert_namespace_to_omegaconf(args)
    cfg.distributed_training.distributed_world_size = deepspeed.comm.get_world_size()
    cfg.distributed_training.distributed_rank = deepspeed.comm.get_rank()
    cfg.distributed_training.device_id = local_rank
    if cfg.distributed_training.distributed_rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # as fairseq's distributed_init: rank 0 logs
    accelerate = contextlib.nullcontext() if args.no_fastpatch else hooks.accelerate_built_models()
    with _fairseq_trainer(fairseq_train, functools.partial(DeepSpeedTrainer, ds_config=config)), accelerate:
        fairseq_train.main(cfg)


def _fairseq_logging() -> None:
    """fairseq-train's log format (its module configures it on import, but DeepSpeed, imported
    first, would otherwise have installed Python's default one)."""
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stdout,
                        level=os.environ.get("LOGLEVEL", "INFO").upper())


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _fairseq_logging()
    if "--cpu" in argv:
        # DeepSpeed picks its accelerator when first imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        args, config = parse_args(argv)
    except (DeepSpeedConfigError, UsageError) as exc:
        sys.exit(f"{PROG}: error: {exc}")
    run(args, config)


def _exit_process_group() -> None:
    """Destroys torch distributed's process group before the worker exits: one left alive keeps
    NCCL's watchdog thread running at interpreter exit, and torch 2.11 then aborts the finished
    worker (SIGABRT, "terminate called without an active exception"), which the launcher
    reports as a failed run. Only the launched script does this; in-process callers of
    :func:`main` may run again in the same process group."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    finally:
        _exit_process_group()
