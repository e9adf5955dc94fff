"""Fixtures of the DeepSpeed integration tests (the bundled corpus, as the fairseq tests use it)."""
import os
import sys

import pytest

# fairseq_helpers (in-process fairseq commands, recorded losses) is shared with the fairseq tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fairseq"))


@pytest.fixture(scope="session")
def ds_data_bin(tmp_path_factory):
    """fastpatch's bundled corpus, binarized by fairseq-preprocess."""
    pytest.importorskip("fairseq")
    pytest.importorskip("deepspeed")
    from fairseq_helpers import preprocess

    from fastpatch.integrations.fairseq.demo import preprocess_args

    destdir = str(tmp_path_factory.mktemp("deepspeed") / "data-bin")
    preprocess(preprocess_args(destdir))
    return destdir
