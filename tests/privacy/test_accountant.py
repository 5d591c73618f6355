"""The accountant wrapper against Opacus' own computation, and the target-epsilon search."""
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from splitlora.privacy import PrivacyLedger, epsilon, noise_for_epsilon
from splitlora.privacy.accountant import combined_multiplier, epsilon_of

CASES = [(1.1, 0.01, 1000, 1e-5), (0.8, 0.25, 40, 1e-5), (2.0, 1.0, 10, 1e-6), (1.0, 0.05, 1, 1e-5)]


@pytest.mark.parametrize("sigma, q, steps, delta", CASES)
def test_rdp_epsilon_equals_opacus_stepping_its_own_accountant(sigma, q, steps, delta):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-12)
    # And the analysis functions directly (what the accountant sums over its history).
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, delta=delta,
                                            rdp=rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                         orders=orders))
    assert epsilon(sigma, q, steps, delta) == pytest.approx(eps, rel=1e-12)


def test_prv_epsilon_equals_opacus_prv_accountant():
    sigma, q, steps, delta = 1.1, 0.02, 200, 1e-5
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(sigma, q, steps, delta, accountant="prv") == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-6)
    # PRV is tighter than RDP's conversion.
    assert epsilon(sigma, q, steps, delta, accountant="prv") < epsilon(sigma, q, steps, delta)


def test_more_noise_or_fewer_steps_cost_less():
    base = epsilon(1.0, 0.1, 100, 1e-5)
    assert epsilon(2.0, 0.1, 100, 1e-5) < base
    assert epsilon(1.0, 0.1, 50, 1e-5) < base
    assert epsilon(1.0, 0.05, 100, 1e-5) < base


@pytest.mark.parametrize("target", [0.5, 3.0, 8.0])
def test_noise_for_a_target_epsilon_meets_it_tightly(target):
    q, steps, delta = 0.02, 500, 1e-5
    sigma = noise_for_epsilon(target, delta, q, steps)
    eps = epsilon(sigma, q, steps, delta)
    assert eps <= target
    assert eps > target - 0.05  # Opacus' search tolerance is 0.01: not wastefully noisy
    assert epsilon(sigma * 0.9, q, steps, delta) > target


def test_releases_of_the_same_batch_compose_as_one_mechanism():
    # Two releases at sigma = one at sigma / sqrt(2) (Gaussian RDP adds), for q = 1 exactly.
    assert combined_multiplier([1.5, 1.5]) == pytest.approx(1.5 / math.sqrt(2))
    two = epsilon_of([(1.5, 1.0, 20), (1.5, 1.0, 20)], 1e-5)
    assert epsilon(1.5 / math.sqrt(2), 1.0, 20, 1e-5) == pytest.approx(two, rel=1e-9)


def test_ledger_counts_per_client_and_survives_a_state_round_trip():
    ledger = PrivacyLedger()
    for _ in range(30):
        ledger.record(0, 1.0, 0.1)
    for _ in range(10):
        ledger.record(1, 1.0, 0.2)
    restored = PrivacyLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.steps() == {0: 30, 1: 10}
    eps = restored.epsilons(1e-5)
    assert eps[0] == pytest.approx(epsilon(1.0, 0.1, 30, 1e-5))
    assert eps[1] == pytest.approx(epsilon(1.0, 0.2, 10, 1e-5))


@pytest.mark.parametrize("args, message", [
    ((0.0, 0.1, 10, 1e-5), "noise_multiplier must be > 0"),
    ((1.0, 0.0, 10, 1e-5), "sample_rate must be in"),
    ((1.0, 1.5, 10, 1e-5), "sample_rate must be in"),
    ((1.0, 0.1, 10, 1.0), "delta must be in"),
    ((1.0, 0.1, -1, 1e-5), "steps must be an integer"),
])
def test_bad_accounting_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        epsilon(*args)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match="accountant must be one of"):
        epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp2")
