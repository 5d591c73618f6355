"""Round trips of splitlora.codec on the CPU: error bound, exact zeros, edge shapes, sizes."""
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_testutil import (
    DTYPES,
    QUANT_BITS,
    activations,
    expected_group_scales,
    packet_scales,
    roundtrip_error_bound,
)
from splitlora import codec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_round_to_nearest_error_is_at_most_half_a_step(dtype, bits, group_size):
    x = activations((7, 301), dtype, seed=bits * 1000 + group_size)
    packet = codec.compress(x, bits, group_size)
    y = codec.decompress(packet)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    scales = packet_scales(packet)
    # The stored scales are exactly absmax / qmax, computed here independently.
    assert torch.equal(scales, expected_group_scales(x, bits, group_size))
    worst = roundtrip_error_bound(x, y, scales, group_size)
    # Not vacuous: on random data some element lands close to half a step from its code.
    assert worst > 0.3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_stochastic_error_is_below_one_step(dtype, bits):
    x = activations((5, 200), dtype, seed=bits)
    g = torch.Generator().manual_seed(bits)
    packet = codec.compress(x, bits, 64, stochastic=True, generator=g)
    assert codec.packet_info(packet).stochastic
    y = codec.decompress(packet)
    scales = packet_scales(packet)
    assert torch.equal(scales, expected_group_scales(x, bits, 64))
    worst = roundtrip_error_bound(x, y, scales, 64, steps=1.0)
    assert worst > 0.5  # stochastic rounding does round away from the nearest code sometimes


@pytest.mark.parametrize("dtype", DTYPES)
def test_bits16_is_a_bfloat16_passthrough(dtype):
    x = activations((33, 17), dtype, seed=3)
    packet = codec.compress(x, 16)
    assert packet.numel() == 96 + 2 * x.numel()
    y = codec.decompress(packet)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x.to(torch.bfloat16).to(dtype))


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_all_zero_groups_come_back_as_exact_zeros(bits, stochastic):
    x = activations((4, 256), torch.float32, seed=bits)
    x[1] = 0.0  # groups 4..7 of size 64
    x[3, :64] = -0.0
    y = codec.decompress(codec.compress(x, bits, 64, stochastic=stochastic))
    assert torch.equal(y[1], torch.zeros(256))
    assert torch.equal(y[3, :64], torch.zeros(64))
    assert not torch.equal(y[0], torch.zeros(256))


def test_all_zero_tensor():
    x = torch.zeros(3, 100, dtype=torch.bfloat16)
    packet = codec.compress(x, 4, 32)
    assert torch.equal(packet_scales(packet), torch.zeros(10))  # ceil(300 / 32) groups
    assert torch.equal(codec.decompress(packet), x)


@pytest.mark.parametrize(
    "shape",
    [(0,), (3, 0, 5), (), (1,), (63,), (64,), (65,), (2, 3, 37), (129,), (4, 1, 1, 16)],
    ids=str,
)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_edge_shapes(shape, bits):
    x = activations(shape, torch.float32, seed=len(shape))
    packet = codec.compress(x, bits, 64)
    assert packet.dtype == torch.uint8 and packet.dim() == 1
    assert packet.numel() == codec.packed_size(shape, bits, 64) == codec.packed_size(x.numel(), bits, 64)
    info = codec.packet_info(packet)
    assert info.shape == tuple(shape) and info.numel == x.numel() and info.bits == bits
    y = codec.decompress(packet)
    assert y.shape == x.shape and y.dtype == x.dtype
    if bits == 16:
        assert torch.equal(y, x.bfloat16().float())
    elif x.numel():
        roundtrip_error_bound(x, y, packet_scales(packet), 64)


@pytest.mark.parametrize("bits, stochastic", [(2, False), (2, True), (8, False), (8, True), (16, False)])
def test_non_contiguous_input_gives_the_packet_of_its_contiguous_copy(bits, stochastic):
    base = activations((40, 70), torch.bfloat16, seed=5)
    for view in (base.t(), base[::3, 1::2], base[:, 5:]):
        assert not view.is_contiguous()
        a = codec.compress(view, bits, 32, stochastic=stochastic, generator=torch.Generator().manual_seed(1))
        b = codec.compress(view.contiguous(), bits, 32, stochastic=stochastic, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert codec.decompress(a).shape == view.shape


def test_input_that_requires_grad_is_fine():
    x = activations((8, 64), torch.float32, seed=9).requires_grad_()
    y = codec.decompress(codec.compress(x))
    assert not y.requires_grad and y.shape == x.shape


def test_packet_info_describes_the_packet():
    x = activations((3, 5, 7), torch.float16, seed=2)
    packet = codec.compress(x, 4, 16, stochastic=True)
    info = codec.packet_info(packet)
    assert info.version == 1 and info.dtype == torch.float16 and info.shape == (3, 5, 7)
    assert info.bits == 4 and info.group_size == 16 and info.numel == 105 and info.stochastic
    assert info.num_groups == 7 and info.scale_bytes == 32 and info.code_bytes == 7 * 8
    assert info.packet_bytes == packet.numel() == 96 + 32 + 56


def test_packed_size_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        codec.packed_size(10, 3, 64)
    with pytest.raises(ValueError, match="group_size"):
        codec.packed_size(10, 8, 48)
    with pytest.raises(ValueError, match="non-negative"):
        codec.packed_size((2, -1), 8, 64)
    with pytest.raises(ValueError):
        codec.packed_size(-5, 8, 64)


def test_each_call_logs_its_backend_at_debug_level(caplog):
    x = activations((4, 64), torch.float32)
    with caplog.at_level(logging.DEBUG, logger="splitlora.codec"):
        codec.decompress(codec.compress(x, 8))
    backend = codec.backend_for("cpu")
    messages = [r.getMessage() for r in caplog.records if r.name == "splitlora.codec"]
    assert any(m.startswith("compress") and f"backend={backend}" in m for m in messages)
    assert any(m.startswith("decompress") and f"backend={backend}" in m for m in messages)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 70), min_size=0, max_size=3),
    group_size=st.sampled_from([16, 32, 64, 128, 512, 4096]),
    bits=st.sampled_from(QUANT_BITS),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip_bound(shape, group_size, bits, dtype, magnitude, seed):
    if dtype == torch.float16 and magnitude >= 1e3:
        magnitude = 10.0  # outliers of 20x would overflow float16 itself
    x = activations(shape, dtype, seed=seed, scale=magnitude)
    packet = codec.compress(x, bits, group_size)
    assert packet.numel() == codec.packed_size(tuple(shape), bits, group_size)
    y = codec.decompress(packet)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel():
        scales = packet_scales(packet)
        assert torch.equal(scales, expected_group_scales(x, bits, group_size))
        roundtrip_error_bound(x, y, scales, group_size)
