"""Trainer tests run tiny models: one torch thread for each (tests/conftest.py, one_torch_thread)."""
import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
