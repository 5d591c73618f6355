"""Autotuning once per power-of-two bucket of token counts (splitlora_kernels.ops.lora_linear).

Training pads each batch to its own longest sequence, so nearly every step brings a new token
count; the tile picked for one count must serve the counts of its bucket instead of a full autotune
(every config compiled and timed) per count. These tests drive the launcher's slow path with a
stand-in tuner and kernel, so they run without a GPU."""
import importlib
import types

import pytest

L = importlib.import_module("splitlora_kernels.ops.lora_linear")
pytestmark = pytest.mark.skipif(L._TRITON_IMPORT_ERROR is not None, reason="triton is not installed")


_N_PTRS = 6  # the row pass's pointer arguments (in, proj, l, out, up, bias)


class _Tuner:
    def __init__(self):
        self.tuned = []  # the token count of each tuning

    def __getitem__(self, grid_fn):
        def tune(*args):
            self.tuned.append(args[_N_PTRS + L._FREE_SCALARS["rowpass"]])  # M: after the pointers and free scalars
            self.best_config = types.SimpleNamespace(all_kwargs=lambda: {"BLOCK_M": 64})
        return tune


class _Kernel:
    arg_names = L._RAW_KERNELS["rowpass"].arg_names

    def __init__(self):
        self.metas = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.metas.append(meta)
            return None  # nothing compiled: the launcher registers no fast path
        return launch


@pytest.fixture
def stand_ins(monkeypatch):
    tuner, kernel = _Tuner(), _Kernel()
    monkeypatch.setenv("SPLITLORA_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(L, "_tuner", lambda name, dev: tuner)
    monkeypatch.setitem(L._RAW_KERNELS, "rowpass", kernel)
    monkeypatch.setattr(L, "_TUNED", {})
    monkeypatch.setattr(L, "_TUNED_BUCKETS", {})
    return tuner, kernel


def _launch(m, k=768, n=2304):
    ptrs = (object(),) * _N_PTRS  # only their number matters to the slow path
    scalars = (0, 0.0, 1.0, 2.0, m, k, n, 4) + (1,) * 11  # seed, p, drop scale, scaling, M, K, N, R, strides
    flags = ("f",)
    key = ("rowpass", 0, flags, scalars[L._FREE_SCALARS["rowpass"]:], ("dt",) * _N_PTRS, (0,) * _N_PTRS)
    L._launch_slow("rowpass", key, 0, lambda meta: (1,), ptrs, scalars, flags)


def test_token_counts_of_one_bucket_share_one_tuning(stand_ins):
    tuner, kernel = stand_ins
    for m in (480, 300, 512, 257, 480):  # all in the bucket (256, 512]
        _launch(m)
    assert tuner.tuned == [480]
    assert len(kernel.metas) == 4 and all(meta["BLOCK_M"] == 64 for meta in kernel.metas)


def test_each_bucket_and_each_other_shape_is_tuned_once(stand_ins):
    tuner, _ = stand_ins
    for m in (480, 600, 1024, 1025, 700, 16, 3):
        _launch(m)
    _launch(480, k=1024)  # another layer shape: its own tuning
    assert tuner.tuned == [480, 600, 1025, 16, 480]


@pytest.mark.parametrize("n, bucket", [(1, 16), (16, 16), (17, 32), (480, 512), (512, 512), (513, 1024),
                                       (8192, 8192)])
def test_token_bucket_is_the_next_power_of_two(n, bucket):
    assert L._token_bucket(n) == bucket
