"""``lightseq-deepspeed``: DeepSpeed's launcher with fastpatch's training entry and fairseq user dir.

    lightseq-deepspeed [DeepSpeed launcher options] DATA-BIN [fairseq options] --deepspeed_config CFG

is ``deepspeed [launcher options] <ENTRY> DATA-BIN [fairseq options] --user-dir <USER_DIR>
--deepspeed_config CFG`` (the user dir is added unless you pass your own). Launcher options
(``--num_gpus``, ``--num_nodes``, ``--hostfile``, ``--include``, ``--master_port``, ...) come
before the data directory, as in DeepSpeed's own syntax.

Without launcher options, on a machine with at most one GPU, the entry runs directly in this
process (a single-process DeepSpeed run needs no launcher). Without the console script:
``python -m fastpatch.integrations.deepspeed.cli ...``.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

from fastpatch.integrations.deepspeed import ENTRY
from fastpatch.integrations.fairseq import USER_DIR

USAGE = ("usage: lightseq-deepspeed [DeepSpeed launcher options] DATA-BIN [fairseq-train options] "
         "--deepspeed_config CONFIG.json")


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(launcher options, training arguments)``: DeepSpeed's own parser says where its options
    end (the first positional, the data directory, starts the training arguments)."""
    from deepspeed.launcher import runner

    argv = list(argv)
    parsed = runner.parse_args(argv)
    start = len(argv) - len(parsed.user_args) - 1
    return argv[:start], argv[start:]


def command(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(launcher options, entry arguments)`` with fastpatch's user dir added."""
    launcher, training = split_argv(argv)
    if not any(a == "--user-dir" or a.startswith("--user-dir=") for a in training):
        training += ["--user-dir", USER_DIR]
    return launcher, training


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 2)[2].strip())
        return
    launcher, training = command(argv)
    if not launcher and _local_gpus() <= 1:
        from fastpatch.integrations.deepspeed.fairseq_train import main as train

        train(training)
        return
    from deepspeed.launcher import runner

    runner.main(launcher + [ENTRY] + training)


if __name__ == "__main__":
    main()
