"""Holds ``fastpatch_fairseq``, the directory passed to fairseq as ``--user-dir`` (fairseq imports
it as a top-level module named after the directory, so it lives alone here)."""
