"""Trainer tests run tiny models, where one torch thread beats two (no fork/join per op, and no
slowdown when the cores are shared)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
