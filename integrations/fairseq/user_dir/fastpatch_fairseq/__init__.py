"""fairseq ``--user-dir`` entry point of fastpatch.

fairseq imports this directory as the top-level module ``fastpatch_fairseq``; the registration
itself lives in ``fastpatch.integrations.fairseq`` so that it exists once per process.
"""
from fastpatch.integrations.fairseq.registry import register

register()
