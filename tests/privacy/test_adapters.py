"""DP for the adapters: a client's update is clipped to adapter_clip as one vector, then noised."""
import math

import pytest
import torch

from splitlora.privacy import privatize_update
from splitlora.privacy.adapters import update_norm


def _states(scale):
    g = torch.Generator().manual_seed(0)
    old = {"a.lora_A": torch.randn(8, 32, generator=g), "b.lora_B": torch.randn(32, 8, generator=g)}
    new = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in old.items()}
    return new, old


@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_update_is_clipped_as_one_vector(scale):
    new, old = _states(scale)
    out = privatize_update(new, old, clip=1.0, noise_multiplier=0.0)
    delta = {k: out[k] - old[k] for k in out}
    before = update_norm({k: new[k] - old[k] for k in new})
    after = update_norm(delta)
    if before > 1.0:
        assert after == pytest.approx(1.0, rel=1e-5)
        # Direction kept: the same scale for every tensor.
        ratios = [float((delta[k] / (new[k] - old[k])).mean()) for k in delta]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)
    else:
        for k in out:
            torch.testing.assert_close(out[k], new[k])


def test_update_noise_has_the_configured_std_and_is_reproducible():
    new, old = _states(0.0)  # no update: what arrives is old + noise
    big_old = {f"t{i}": torch.zeros(100, 100) for i in range(20)}
    out = privatize_update(big_old, big_old, clip=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(4))
    d = torch.cat([v.reshape(-1) for v in out.values()]).double()
    sigma = 1.0
    assert abs(d.mean().item()) < 5 * sigma / math.sqrt(d.numel())
    assert abs(d.var().item() / sigma**2 - 1) < 5 * math.sqrt(2 / d.numel())
    # Tensors get independent noise (one long stream over the sorted names, not one per tensor).
    assert not torch.equal(out["t0"], out["t1"])
    again = privatize_update(big_old, big_old, 0.5, 2.0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_mismatched_states_are_refused():
    new, old = _states(1.0)
    with pytest.raises(ValueError, match="name different tensors"):
        privatize_update({"x": torch.zeros(1)}, old, 1.0, 1.0)
