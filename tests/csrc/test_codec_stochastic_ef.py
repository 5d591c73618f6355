"""Stochastic rounding is unbiased; error feedback keeps the decoded stream on the input stream."""
import io
import math

import pytest
import torch

from codec_testutil import activations, packet_scales, per_element
from splitlora import codec


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased_in_the_mean(bits):
    # 256 elements in 4 groups; each group's absmax is pinned so the scale is the same for all
    # draws, and the other values sit at varied fractions of a step.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, generator=g) * 2 - 1
    x[::64] = 1.0
    draws = 2000
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(256, dtype=torch.float64)
    for _ in range(draws):
        total += codec.decompress(codec.compress(x, bits, 64, stochastic=True, generator=gen)).double()
    mean = total / draws
    scale = per_element(packet_scales(codec.compress(x, bits, 64)), 256, 64).double()
    # One draw is scale * (floor or floor + 1): its standard deviation is at most scale / 2, so
    # the mean of `draws` independent draws has sigma <= scale / (2 sqrt(draws)). Allow 5 sigma
    # per element (false alarm < 256 * 6e-7 for independent draws).
    sigma = scale / (2 * math.sqrt(draws))
    assert ((mean - x.double()).abs() <= 5 * sigma).all()
    # Over all 256 elements together the bias must vanish too (5 sigma of the grand mean).
    assert abs(float((mean - x.double()).mean())) <= 5 * float(sigma.max()) / math.sqrt(256)
    # The test can tell: round to nearest is biased beyond that tolerance on these values.
    nearest = codec.decompress(codec.compress(x, bits, 64)).double()
    assert ((nearest - x.double()).abs() > 5 * sigma).sum() > 100


def _stream(steps, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_feedback_keeps_the_accumulated_stream_within_one_step(dtype, stochastic):
    steps, shape, bits, gs = 100, (8, 96), 2, 32
    xs = _stream(steps, shape, dtype, seed=3)
    ef = codec.ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    sum_in = torch.zeros(shape, dtype=torch.float64)
    sum_ef = torch.zeros(shape, dtype=torch.float64)
    sum_plain = torch.zeros(shape, dtype=torch.float64)
    for x in xs:
        packet = ef.compress(x, bits, gs, stochastic=stochastic, generator=gen)
        decoded = codec.decompress(packet)
        assert decoded.dtype == dtype and decoded.shape == shape  # the receiver sees x's dtype
        sum_in += x.double()
        sum_ef += decoded.double()
        sum_plain += codec.decompress(codec.compress(x, bits, gs, stochastic=stochastic, generator=gen)).double()
    err_ef = sum_in - sum_ef
    err_plain = sum_in - sum_plain
    # Telescoping: what is still owed is exactly the stored residual.
    assert torch.allclose(err_ef, ef.residual.double(), atol=1e-4)
    # ... which is one quantization error of the last packet: half a step (a full step with
    # stochastic rounding) of its group's scale, plus the cast of the decoded value to dtype.
    last_scale = per_element(packet_scales(packet), math.prod(shape), gs).view(shape).double()
    steps_allowed = 1.0 if stochastic else 0.5
    cast = decoded.double().abs() * (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    assert (err_ef.abs() <= steps_allowed * last_scale * (1 + 1e-5) + cast + 1e-4).all()
    # Without feedback the error is a random walk over the 100 steps (about 10x one step's
    # error after 100 steps); with it, it stays at one step.
    assert err_plain.abs().max() > 3 * err_ef.abs().max()


def test_error_feedback_state_dict_round_trip():
    xs = _stream(6, (4, 64), torch.float32, seed=5)
    a = codec.ErrorFeedback()
    for x in xs[:5]:
        a.compress(x, 4, 16)
    state = a.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = codec.ErrorFeedback()
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.compress(xs[5], 4, 16), b.compress(xs[5], 4, 16))
    assert torch.equal(a.residual, b.residual)
    # state_dict() is a snapshot, not a live view of the residual.
    assert not torch.equal(state["residual"], a.residual)


def test_error_feedback_reset_and_shape_change():
    ef = codec.ErrorFeedback()
    x = activations((4, 64), torch.float32, seed=1)
    first = ef.compress(x, 8)
    assert torch.equal(first, codec.compress(x, 8))  # no residual yet: a plain compress
    assert not torch.equal(ef.compress(x, 8), first)  # now the residual is added
    with pytest.raises(ValueError, match="reset"):
        ef.compress(activations((4, 65), torch.float32), 8)
    ef.reset()
    assert ef.residual is None and ef.state_dict() == {"residual": None}
    y = activations((4, 65), torch.float32, seed=2)
    assert torch.equal(ef.compress(y, 8), codec.compress(y, 8))


def test_error_feedback_with_a_variable_dimension():
    """variable_dim=1 (sequences of varying length): each compress adds the leading slice of the
    residual and leaves there what the receiver missed; the rest of the residual waits unchanged;
    any other shape change is still an error."""
    ef = codec.ErrorFeedback(variable_dim=1)
    long = activations((2, 6, 32), torch.float32, seed=3)
    ef.compress(long, 4)
    before = ef.residual.clone()
    short = activations((2, 4, 32), torch.float32, seed=4)
    packet = ef.compress(short, 4)
    expected = short + before[:, :4]
    torch.testing.assert_close(codec.decompress(packet) + ef.residual[:, :4], expected, rtol=0, atol=1e-6)
    assert torch.equal(ef.residual[:, 4:], before[:, 4:])
    # A longer tensor grows the residual with zeros: its new positions start without feedback.
    longer = activations((2, 8, 32), torch.float32, seed=5)
    kept = ef.residual.clone()
    packet = ef.compress(longer, 4)
    assert ef.residual.shape == (2, 8, 32)
    corrected = longer + torch.cat([kept, torch.zeros(2, 2, 32)], dim=1)
    torch.testing.assert_close(codec.decompress(packet) + ef.residual, corrected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dimension 1 only"):
        ef.compress(activations((3, 8, 32), torch.float32), 4)


def test_error_feedback_rejects_bad_state():
    ef = codec.ErrorFeedback()
    with pytest.raises(ValueError, match="residual"):
        ef.load_state_dict({})
    with pytest.raises(ValueError, match="residual"):
        ef.load_state_dict({"residual": torch.zeros(3, dtype=torch.int64)})
    ef.load_state_dict({"residual": None})
    assert ef.residual is None
