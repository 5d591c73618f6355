"""splitlora.privacy.clip_and_noise: clipping bounds every example's norm, padding is zeroed, the
noise has mean 0 and std noise_multiplier * clip, the backward goes through the clipping, and bad
arguments are refused with a sentence."""
import math

import pytest
import torch

from splitlora.privacy import clip_and_noise, clip_factors, hash_gaussian

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The output is rounded to its dtype: an example's norm may exceed clip by that rounding.
NORM_SLACK = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _norms(y, mask=None):
    y = y.double()
    if mask is not None:
        y = y * mask.double().reshape(tuple(mask.shape) + (1,) * (y.dim() - mask.dim()))
    return y.reshape(y.shape[0], -1).norm(dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clipping_bounds_every_example_norm(dtype, device):
    g = torch.Generator().manual_seed(0)
    # Examples far above, near and below the bound.
    x = (torch.randn(16, 7, 24, generator=g) * torch.logspace(-2, 2, 16)[:, None, None]).to(dtype).to(device)
    clip = 3.0
    y = clip_and_noise(x, clip, 0.0)
    assert y.dtype == dtype and y.shape == x.shape
    norms = _norms(y.cpu())
    assert (norms <= clip * (1 + NORM_SLACK[dtype])).all(), norms
    before = _norms(x.cpu())
    big = before > clip
    assert big.any() and (~big).any()
    # Clipped examples sit on the bound, short ones are untouched (to the dtype's rounding).
    torch.testing.assert_close(norms[big], torch.full_like(norms[big], clip), rtol=2 * NORM_SLACK[dtype] + 1e-6, atol=0)
    assert torch.equal(y[(~big).to(device)].cpu(), x[(~big).to(device)].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_is_zeroed_and_excluded_from_the_norm(dtype, device):
    x = torch.full((3, 5, 4), 10.0, dtype=dtype, device=device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], device=device)
    y = clip_and_noise(x, 1.0, 0.5, generator=torch.Generator().manual_seed(1), mask=mask)
    assert (y[mask == 0] == 0).all()  # no noise either on padding
    clipped = clip_and_noise(x, 1.0, 0.0, mask=mask)
    assert (_norms(clipped.cpu(), mask.cpu()) <= 1.0 * (1 + NORM_SLACK[dtype])).all()
    # The padding did not count: example 0 has 3 real positions of 4 tens -> scale 1 / sqrt(1200).
    expected = (torch.tensor(10.0) / math.sqrt(1200.0)).to(dtype)
    assert torch.equal(clipped[0, 0, 0].cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_has_mean_zero_and_std_noise_multiplier_times_clip(dtype, device):
    # Examples well inside the bound are sent unscaled, so y - x is the noise alone (plus the
    # rounding to dtype). 250k draws: the sample mean's std is sigma/500, the sample variance's
    # relative std sqrt(2/n) = 0.28%; the tolerances are 5 of those, far below the 10% a wrong
    # multiplier (e.g. sigma = multiplier alone, with clip = 2) would show.
    clip, mult = 2.0, 0.75
    sigma = mult * clip
    x = (torch.randn(100, 50, 50, generator=torch.Generator().manual_seed(2)) * 1e-3).to(dtype).to(device)
    y = clip_and_noise(x, clip, mult, generator=torch.Generator().manual_seed(3))
    d = (y.double() - x.double()).cpu().reshape(-1)
    n = d.numel()
    assert abs(d.mean().item()) < 5 * sigma / math.sqrt(n)
    # bfloat16 rounds the noisy value (|y| ~ sigma) to 8 bits: variance off by ~2^-16 relative.
    assert abs(d.var().item() / sigma**2 - 1) < 5 * math.sqrt(2 / n) + (0.003 if dtype != torch.float32 else 0)
    # Gaussian shape, not just two moments: the share beyond 2 sigma (4.55%).
    beyond = (d.abs() > 2 * sigma).double().mean().item()
    assert abs(beyond - 0.0455) < 0.003


def test_same_generator_state_gives_the_same_noise_and_fresh_draws_differ():
    x = torch.randn(4, 8, 16)
    a = clip_and_noise(x, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    b = clip_and_noise(x, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    first, second = clip_and_noise(x, 1.0, 1.0, generator=g), clip_and_noise(x, 1.0, 1.0, generator=g)
    assert not torch.equal(first, second)
    # Without a generator the seed comes from the OS CSPRNG: two calls differ.
    assert not torch.equal(clip_and_noise(x, 1.0, 1.0), clip_and_noise(x, 1.0, 1.0))


def test_hash_gaussian_is_standard_normal_and_independent_across_elements():
    z = hash_gaussian(200_000, seed=12345, sigma=1.0).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    lag = (z[1:] * z[:-1]).mean().item()  # neighbours share the hash's counter scheme
    assert abs(lag) < 5 / math.sqrt(z.numel())


def test_backward_goes_through_the_clipping():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64).float().requires_grad_(True)
    x.data[0] *= 10  # clipped
    x.data[1] *= 0.01  # not clipped
    w = torch.randn(3, 4, 5)
    (clip_and_noise(x, 1.0, 0.0) * w).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    n = ref.reshape(3, -1).norm(dim=1)
    scale = torch.clamp(1.0 / n, max=1.0)  # clip = 1
    ((ref * scale[:, None, None]) * w).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)
    # The clipped example's gradient lost its radial part: orthogonal to x.
    assert abs(float((x.grad[0] * x.detach()[0]).sum())) < 1e-4


def test_clip_factors_are_one_for_short_examples_and_zero_on_padding():
    x = torch.ones(2, 3, 4)
    f = clip_factors(x, 100.0, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert f.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip=0.0, noise_multiplier=1.0), "clip must be a positive finite number"),
    (dict(clip=-1.0, noise_multiplier=1.0), "clip must be a positive finite number"),
    (dict(clip=float("inf"), noise_multiplier=1.0), "clip must be a positive finite number"),
    (dict(clip=1.0, noise_multiplier=-0.5), "noise_multiplier must be a finite number >= 0"),
    (dict(clip=1.0, noise_multiplier=1.0, mask=torch.ones(3, 5)), "mask must have the leading shape of x"),
    (dict(clip=1.0, noise_multiplier=1.0, generator=1), "generator must be a torch.Generator"),
])
def test_bad_arguments_are_refused_with_a_sentence(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        clip_and_noise(torch.ones(2, 4, 3), **kwargs)


def test_integer_input_is_refused():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        clip_and_noise(torch.ones(2, 3, dtype=torch.int64), 1.0, 1.0)
