"""The privacy tests train tiny models too: one torch thread, as in tests/trainer, and its helpers."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
