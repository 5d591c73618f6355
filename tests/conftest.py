"""Shared test fixtures: GPU skipping and the location of ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, and triton.jit reads this
# variable when a kernel is decorated: set it before any test module imports a kernel file.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SPLITLORA_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "e2e").is_dir():
        pytest.skip(f"shared data not found at {path} (set SPLITLORA_DATA to the folder holding e2e/)")
    return path


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models run faster so (no fork/join per op, and no
    slowdown when the cores are shared). The folders that train tiny models use it for every test
    (their conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
