"""The ``privacy`` config section: its checks, and what a split strategy keeps at run time (the
noise generators, the accounting, the resolved noise multiplier)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .accountant import ACCOUNTANTS, PrivacyLedger, combined_multiplier, noise_for_epsilon
from .noise import secure_generator

# DP at the cut exists where activations cross a cut; hsplitlora and the others are refused
# (hsplitlora's per-client cuts would need per-cut accounting, not done yet).
PRIVATE_STRATEGIES = ("splitlora", "sl")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_privacy_config(cfg, errors: List[str]) -> None:
    """Appends a sentence per problem of cfg.privacy to ``errors`` (config.validate raises them)."""
    p = cfg.privacy
    cut_keys = [k for k in ("noise_multiplier", "epsilon") if getattr(p, k) is not None]
    if p.clip is None:
        for k in cut_keys:
            errors.append(f"privacy.{k}: needs privacy.clip (the L2 bound of one example's activations that the "
                          f"noise is scaled to); set privacy.clip too, or set privacy.{k} to null")
        if p.protect_gradients:
            errors.append("privacy.protect_gradients: needs privacy.clip and privacy.noise_multiplier (or "
                          "privacy.epsilon); set them, or set protect_gradients to false")
    else:
        if not (_number(p.clip) and p.clip > 0):
            errors.append(f"privacy.clip: must be a number > 0 (an L2 norm), got {p.clip!r}")
        if len(cut_keys) == 2:
            errors.append("privacy.epsilon: set either privacy.noise_multiplier or privacy.epsilon (which "
                          "computes the noise multiplier for the run), not both")
        elif not cut_keys:
            errors.append("privacy.noise_multiplier: privacy.clip is set; set privacy.noise_multiplier (noise "
                          "std / clip, e.g. 1.0) or privacy.epsilon (a target for the whole run)")
        if p.noise_multiplier is not None and not (_number(p.noise_multiplier) and p.noise_multiplier >= 0):
            errors.append(f"privacy.noise_multiplier: must be a number >= 0, got {p.noise_multiplier!r}")
        if p.epsilon is not None and not (_number(p.epsilon) and p.epsilon > 0):
            errors.append(f"privacy.epsilon: must be a number > 0, got {p.epsilon!r}")
        if p.protect_gradients and not cfg.train.u_shape:
            errors.append("privacy.protect_gradients: protects the gradient a client sends up from its tail, "
                          "which exists with train.u_shape: true only (in the plain variant the gradients come "
                          "down from the server, which holds the labels already)")
    adapter = [k for k in ("adapter_clip", "adapter_noise_multiplier") if getattr(p, k) is not None]
    if len(adapter) == 1:
        other = "adapter_noise_multiplier" if adapter[0] == "adapter_clip" else "adapter_clip"
        errors.append(f"privacy.{other}: adapter DP needs both privacy.adapter_clip and "
                      f"privacy.adapter_noise_multiplier; set {other} too, or set {adapter[0]} to null")
    if p.adapter_clip is not None and not (_number(p.adapter_clip) and p.adapter_clip > 0):
        errors.append(f"privacy.adapter_clip: must be a number > 0 (an L2 norm), got {p.adapter_clip!r}")
    if p.adapter_noise_multiplier is not None and not (_number(p.adapter_noise_multiplier)
                                                       and p.adapter_noise_multiplier >= 0):
        errors.append(f"privacy.adapter_noise_multiplier: must be a number >= 0, got {p.adapter_noise_multiplier!r}")
    if not (_number(p.delta) and 0 < p.delta < 1):
        errors.append(f"privacy.delta: must be in (0, 1) (e.g. 1e-5, below 1 / examples per client), got {p.delta!r}")
    if p.accountant not in ACCOUNTANTS:
        errors.append(f"privacy.accountant: {p.accountant!r} is not allowed; choose one of {', '.join(ACCOUNTANTS)}")
    if p.seed is not None and not (isinstance(p.seed, int) and not isinstance(p.seed, bool) and p.seed >= 0):
        errors.append(f"privacy.seed: must be an integer >= 0 or null, got {p.seed!r}")
    on = p.clip is not None or bool(adapter)
    if on and cfg.strategy not in PRIVATE_STRATEGIES:
        errors.append(f"privacy: DP is implemented for the strategies {', '.join(PRIVATE_STRATEGIES)}; strategy is "
                      f"{cfg.strategy!r} (set privacy.clip and privacy.adapter_clip to null, or change strategy)")
    if adapter and cfg.strategy == "sl":
        errors.append("privacy.adapter_clip: adapter DP noises the updates that FedAvg averages (strategy "
                      "splitlora); sl hands one adapter from client to client and averages nothing")
    if p.clip is not None and cfg.codec.error_feedback:
        errors.append("codec.error_feedback: not with privacy.clip (the residual would carry an example's "
                      "un-noised quantization error into the next step's packet); set it to false")


class PrivacyRuntime:
    """A split strategy's DP state: per-client noise generators (cut and adapters), the noise
    multiplier in force, and the ledger of releases the server counts as packets arrive."""

    def __init__(self, cfg, sample_rates: List[float]) -> None:
        p = cfg.privacy
        self.delta = float(p.delta)
        self.clip = None if p.clip is None else float(p.clip)
        self.protect_gradients = bool(p.protect_gradients and cfg.train.u_shape)
        self.sample_rates = [float(q) for q in sample_rates]
        self.releases_per_step = 2 if self.protect_gradients else 1
        self.noise_multiplier = None
        if self.clip is not None:
            if p.epsilon is not None:
                # The worst client (largest sample rate) meets the target; k releases of the same batch
                # per step act as one of multiplier sigma / sqrt(k), so sigma is scaled back up.
                effective = noise_for_epsilon(float(p.epsilon), self.delta, max(self.sample_rates),
                                              int(cfg.train.steps), p.accountant)
                self.noise_multiplier = effective * math.sqrt(self.releases_per_step)
            else:
                self.noise_multiplier = float(p.noise_multiplier)
        self.adapter_clip = None if p.adapter_clip is None else float(p.adapter_clip)
        self.adapter_noise_multiplier = None if p.adapter_clip is None else float(p.adapter_noise_multiplier)
        n = len(sample_rates)
        if p.seed is None:
            self.generators = [secure_generator() for _ in range(n)]
            self.adapter_generators = [secure_generator() for _ in range(n)]
        else:  # reproducible noise, for tests: the server could recompute it
            self.generators = [torch.Generator().manual_seed(p.seed * 1_000_003 + 2 * c) for c in range(n)]
            self.adapter_generators = [torch.Generator().manual_seed(p.seed * 1_000_003 + 2 * c + 1) for c in range(n)]
        self.ledger = PrivacyLedger(p.accountant)
        self.adapter_ledger = PrivacyLedger(p.accountant)

    @property
    def cut(self) -> bool:
        return self.clip is not None

    @property
    def adapters(self) -> bool:
        return self.adapter_clip is not None

    def effective_multiplier(self) -> float:
        return combined_multiplier([self.noise_multiplier] * self.releases_per_step)

    def record_cut(self, client: int) -> None:
        self.ledger.record(client, self.effective_multiplier(), self.sample_rates[client])

    def record_adapters(self, client: int) -> None:
        self.adapter_ledger.record(client, self.adapter_noise_multiplier, 1.0)

    def _epsilons(self, ledger: PrivacyLedger) -> Dict[int, float]:
        if any(s == 0 for per in ledger.counts.values() for (s, _q) in per):
            return {c: float("inf") for c in ledger.counts}
        return ledger.epsilons(self.delta)

    def report(self, aggregates: bool) -> dict:
        """What summary.json holds under "privacy" (README explains every field)."""
        out: dict = {"delta": self.delta, "accountant": self.ledger.accountant}
        if self.cut:
            eps = self._epsilons(self.ledger)
            out["cut"] = {
                "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "protect_gradients": self.protect_gradients,
                "sample_rate": {str(c): q for c, q in enumerate(self.sample_rates)},
                "releases": {str(c): n for c, n in self.ledger.steps().items()},
                "epsilon": {str(c): e for c, e in eps.items()},
            }
            out["epsilon"] = max(eps.values()) if eps else 0.0
        if self.adapters:
            eps = self._epsilons(self.adapter_ledger)
            out["adapters"] = {"clip": self.adapter_clip, "noise_multiplier": self.adapter_noise_multiplier,
                               "rounds": {str(c): n for c, n in self.adapter_ledger.steps().items()},
                               "epsilon": max(eps.values()) if eps else 0.0, "unit": "client"}
        # What the figures leave out, said in the summary itself.
        gaps = []
        if not self.cut:
            gaps.append("activations at the cut are sent without noise")
        if aggregates and not self.adapters:
            gaps.append("client adapters reach FedAvg without noise")
        out["not_covered"] = gaps
        return out

    def state_dict(self) -> dict:
        return {"generators": [g.get_state() for g in self.generators],
                "adapter_generators": [g.get_state() for g in self.adapter_generators],
                "ledger": self.ledger.state_dict(), "adapter_ledger": self.adapter_ledger.state_dict(),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        for g, s in zip(self.adapter_generators, state["adapter_generators"]):
            g.set_state(s)
        self.ledger.load_state_dict(state["ledger"])
        self.adapter_ledger.load_state_dict(state["adapter_ledger"])
        if state.get("noise_multiplier") is not None:
            self.noise_multiplier = float(state["noise_multiplier"])


def privacy_line(report: dict) -> str:
    """The line the trainer prints at the end of a run with privacy on."""
    parts = []
    if "cut" in report:
        parts.append(f"epsilon = {report['epsilon']:.4g} at delta = {report['delta']:g} for each client's examples "
                     f"(worst client; activations at the cut{', and gradients sent up' if report['cut']['protect_gradients'] else ''}; "
                     f"{report['accountant'].upper()} accountant, noise multiplier {report['cut']['noise_multiplier']:.4g})")
    if "adapters" in report:
        parts.append(f"adapter updates: epsilon = {report['adapters']['epsilon']:.4g} at delta = {report['delta']:g} "
                     f"per client (client level)")
    if report.get("not_covered"):
        parts.append("not covered: " + "; ".join(report["not_covered"]))
    return "privacy: " + "; ".join(parts)
