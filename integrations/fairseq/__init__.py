"""fairseq integration: layer adapters for ``fastpatch.accelerate``, the ``--user-dir`` module
(``ls_transformer*`` models, ``ls_label_smoothed_cross_entropy``, ``ls_adam``) and the
``lightseq-train`` / ``lightseq-generate`` / ``lightseq-interactive`` commands.

Nothing here imports fairseq until it is used: ``adapters()`` is called by ``accelerate`` only
when fairseq is already imported, and the commands import it when they run.
"""
import os

#: the directory to pass as fairseq's ``--user-dir`` (the lightseq-* commands add it themselves)
USER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_dir", "fastpatch_fairseq")


def adapters():
    """The adapters for fairseq's transformer encoder and decoder layers."""
    from .decoder_layer import DecoderLayerAdapter
    from .encoder_layer import EncoderLayerAdapter

    return [EncoderLayerAdapter(), DecoderLayerAdapter()]
