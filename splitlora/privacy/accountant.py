"""(epsilon, delta) of a run, from Opacus' maintained accountants (RDP by default, PRV on request).

The unit is one release of a Gaussian mechanism on a Poisson-subsampled batch: a client sends its
clipped, noised activations of a batch of B of its n examples, so each example's sample rate is
B / n and a step counts once for every batch a client sent. The accountants assume Poisson
sampling; the trainer's loaders shuffle and take fixed-size batches, as Opacus' own users mostly
do too: the figure is the standard approximation, not a proof for shuffled batches (README).

Several releases of the same batch in one step (activations up and, in the U-shape, the gradient
sent up from the tail) compose as one Gaussian mechanism whose noise multiplier is
sigma / sqrt(k) for k releases of multiplier sigma each (Gaussian RDP adds: alpha k / (2 sigma^2)).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

ACCOUNTANTS = ("rdp", "prv")


def _make(accountant: str):
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if accountant == "rdp" else PRVAccountant()


def _check(noise_multiplier, sample_rate, steps, delta) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (batch size / examples), got {sample_rate!r}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def epsilon_of(history: List[tuple], delta: float, accountant: str = "rdp") -> float:
    """epsilon at delta of a list of (noise_multiplier, sample_rate, steps), composed."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    for s, q, n in history:
        _check(s, q, n, delta)
    acc = _make(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon at delta after ``steps`` releases, each a Gaussian mechanism of ``noise_multiplier``
    (noise std / clip) on a batch that holds each example with probability ``sample_rate``."""
    _check(noise_multiplier, sample_rate, steps, delta)
    return epsilon_of([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' search tolerance) whose epsilon after ``steps``
    is at most ``target_epsilon``."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon!r}")
    _check(1.0, sample_rate, steps, delta)
    if steps == 0:
        raise ValueError("a target epsilon needs at least one step to spend it on")
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=int(steps), accountant=accountant))


def combined_multiplier(multipliers: List[float]) -> float:
    """The one Gaussian mechanism equal (in RDP) to releasing the same batch once per multiplier."""
    if any(s == 0 for s in multipliers):
        return 0.0  # a release without noise: no finite epsilon (reported as inf)
    return 1.0 / math.sqrt(sum(1.0 / (s * s) for s in multipliers))


class PrivacyLedger:
    """Counts, per client, the releases of its examples; the trainer's state (checkpointed).

    ``record(client, multiplier, sample_rate)`` once per step in which the client sent a batch;
    ``report(delta)`` the epsilon of each client and the worst one.
    """

    def __init__(self, accountant: str = "rdp") -> None:
        _make(accountant)  # validates the name
        self.accountant = accountant
        self.counts: Dict[int, Dict[tuple, int]] = {}

    def record(self, client: int, noise_multiplier: float, sample_rate: float, times: int = 1) -> None:
        per = self.counts.setdefault(int(client), {})
        key = (float(noise_multiplier), float(sample_rate))
        per[key] = per.get(key, 0) + int(times)

    def epsilons(self, delta: float) -> Dict[int, float]:
        return {c: epsilon_of([(s, q, n) for (s, q), n in per.items()], delta, self.accountant)
                for c, per in sorted(self.counts.items())}

    def steps(self) -> Dict[int, int]:
        return {c: sum(per.values()) for c, per in sorted(self.counts.items())}

    def state_dict(self) -> dict:
        return {"accountant": self.accountant,
                "counts": {c: [[s, q, n] for (s, q), n in per.items()] for c, per in self.counts.items()}}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.counts = {}
        if not state:
            return
        self.accountant = state.get("accountant", self.accountant)
        for c, rows in state["counts"].items():
            self.counts[int(c)] = {(float(s), float(q)): int(n) for s, q, n in rows}
