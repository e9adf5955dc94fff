"""Test configuration: the ``cuda`` marker and shared numerical helpers.

``cuda``-marked tests need a GPU and the built kernels; CI has neither, so they are skipped
there with that reason and run by ``benchmarks/run_gpu.sh`` on the GPU machine.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (run on the GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run by benchmarks/run_gpu.sh on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The CPU tests run many small ops, for which one intra-op thread is fastest (and keeps a
    shared CI machine responsive); the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
