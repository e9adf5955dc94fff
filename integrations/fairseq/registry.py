"""What the ``--user-dir`` module does when fairseq imports it."""
from __future__ import annotations


def register() -> None:
    """Registers ``ls_transformer`` (+ ``ls_<arch>`` twins), ``ls_label_smoothed_cross_entropy``
    and ``ls_adam`` with fairseq, allow-lists fairseq's checkpoint types for ``torch.load``, and,
    in a worker of a ``lightseq-*`` command, accelerates every model fairseq builds.

    Idempotent: fairseq's registries are process-wide and refuse duplicates, and these modules
    register when first imported.
    """
    from . import criterion, models, optimizer  # noqa: F401  (registration on import)
    from .checkpoints import allow_fairseq_checkpoints
    from .hooks import install_if_requested

    allow_fairseq_checkpoints()
    install_if_requested()
