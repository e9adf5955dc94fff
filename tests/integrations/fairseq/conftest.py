"""Fixtures of the fairseq integration tests."""
import pytest


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """fastpatch's bundled corpus, binarized by fairseq-preprocess."""
    pytest.importorskip("fairseq")
    from fairseq_helpers import preprocess

    from fastpatch.integrations.fairseq.demo import preprocess_args

    destdir = str(tmp_path_factory.mktemp("fairseq") / "data-bin")
    preprocess(preprocess_args(destdir))
    return destdir
