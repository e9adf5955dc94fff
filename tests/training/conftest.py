"""The tests here run many small ops, for which one intra-op thread is fastest (and keeps a
shared CI machine responsive); the previous setting is restored afterwards."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
