"""Heterogeneous clients (HSplitLoRA, arXiv 2505.02795): device profiles, the importance of each
adapted weight, and per-client configurations (cut layer, LoRA rank per weight) that fit each
device's budget.

    devices = client_profiles(cfg)                 # one DeviceProfile per client, from hsplitlora.devices
    tracker = ImportanceTracker(beta=0.85)         # per client: EMA of AdaLoRA's sensitivity per weight
    tracker.observe(lora_modules(client))          #   after backward, before the optimizer step
    importance = combine_importance([t.scores for t in trackers], client_weights)
    if ranking_change(reference, importance) > threshold:           # normalized Kendall tau distance
        plans = configure_clients_with_cuts(devices, {cut: SegmentCost, ...}, importance, rank_per_weight=r)

Importance (`sensitivity`): per adapter and per rank, AdaLoRA's |A * dA| + |B * dB|, or the squared
gradient |dA|^2 + |dB|^2 (which, unlike the sensitivity, is not zero while B = 0).

Configuration. A client's total rank (the sum of the ranks of its adapted weights) starts from
lora.client.r per weight for the strongest client, scaled by the client's resources relative to the
strongest one: min(tflops / max tflops, memory / max memory). It is split over the weights in
proportion to their importance (each between min_rank and max_rank, integers by largest
remainder), then lowered until the client's estimated step time and memory (`SegmentCost`) fit its
budget. With several candidate cuts a client takes the deepest at which it fits (deeper cuts for
stronger clients); one that fits nowhere gets the shallowest cut at min_rank, marked `fits=False`.

Estimates (`SegmentCost`), per client step:
- time: 2 x forward flops of the client's segment at its ranks (forward, then the input-gradient
  backward, as in splitlora.timemodel) / (tflops x 1e12), plus the activations and labels going up
  and the gradients coming down at the device's bandwidth and latency;
- memory: the segment's frozen parameters, the adapters, their gradients and optimizer state
  (AdamW: two moments; SGD: none), and the activations kept for backward, counted per decoder layer
  as in Korthikanti et al. 2022 (17 x tokens x hidden + 2.5 x batch x heads x seq^2 elements) plus
  tokens x r per adapter, in the model's dtype. An estimate for choosing ranks, not a measurement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .timemodel import compute_seconds, link_seconds

GIB = float(2**30)
# Korthikanti et al. 2022 ("Reducing activation recomputation"): 34 s b h + 5 a s^2 b bytes per layer
# at 2 bytes per element, i.e. 17 elements per token x hidden and 2.5 per batch x head x seq^2.
ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN = 17.0
ACTIVATION_ELEMENTS_PER_ATTENTION_SCORE = 2.5


# --------------------------------------------------------------------------------------------
# Device profiles
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: compute (TFLOPS), memory budget (GiB, None = no limit) and link."""

    name: str
    tflops: float
    memory_gib: Optional[float]
    bandwidth_mbps: float
    latency_ms: float

    def compute(self, flops: float) -> float:
        return compute_seconds(flops, self.tflops)

    def transfer(self, nbytes: float) -> float:
        return link_seconds(nbytes, self.bandwidth_mbps, self.latency_ms)

    @property
    def memory_bytes(self) -> Optional[float]:
        return None if self.memory_gib is None else self.memory_gib * GIB


def _number(spec: Mapping, key: str, default):
    return default if spec.get(key) is None else float(spec[key])


def client_profiles(cfg) -> List[DeviceProfile]:
    """One DeviceProfile per client: `hsplitlora.devices` expanded in order (a class of count k
    gives k consecutive clients), missing fields from `network.*`; no devices: every client is
    network.client_tflops / bandwidth_mbps / latency_ms with no memory limit."""
    net = cfg.network
    n = cfg.train.clients
    devices = cfg.hsplitlora.devices or {}
    if not devices:
        return [DeviceProfile("client", net.client_tflops, None, net.bandwidth_mbps, net.latency_ms)] * n
    out: List[DeviceProfile] = []
    for name, spec in devices.items():
        spec = spec or {}
        profile = DeviceProfile(name=str(name), tflops=_number(spec, "tflops", net.client_tflops),
                                memory_gib=_number(spec, "memory_gib", None),
                                bandwidth_mbps=_number(spec, "bandwidth_mbps", net.bandwidth_mbps),
                                latency_ms=_number(spec, "latency_ms", net.latency_ms))
        out.extend([profile] * int(spec.get("count", 1)))
    if len(out) != n:
        raise ValueError(f"hsplitlora.devices: the counts of the device classes add up to {len(out)} clients but "
                         f"train.clients is {n}; make them equal")
    return out


def resource_scales(devices: Sequence[DeviceProfile]) -> List[float]:
    """Each client's share of the strongest client's rank budget: the smaller of its compute and
    its memory relative to the largest among the clients (no memory limit counts as the largest)."""
    top_tflops = max(d.tflops for d in devices)
    limits = [d.memory_gib for d in devices if d.memory_gib is not None]
    top_memory = max(limits) if limits else None
    scales = []
    for d in devices:
        s = d.tflops / top_tflops
        if d.memory_gib is not None and top_memory and len(limits) == len(devices):
            s = min(s, d.memory_gib / top_memory)
        scales.append(s)
    return scales


# --------------------------------------------------------------------------------------------
# Importance of the adapted weights
# --------------------------------------------------------------------------------------------

IMPORTANCE_MEASURES = ("sensitivity", "gradient")


@torch.no_grad()
def _score(module: nn.Module, measure: str) -> Optional[torch.Tensor]:
    # A 0-d float64 tensor (no host sync here: a GPU run reads all modules' scores at once).
    parts = []
    for p in (module.lora_A, module.lora_B):
        if p.grad is not None:
            g = p.grad.detach()
            term = (p.detach() * g).abs() if measure == "sensitivity" else g.square()
            parts.append(term.sum(dtype=torch.float64))
    if not parts:
        return None
    return torch.stack(parts).sum() / module.lora_A.shape[0]


def sensitivity(module: nn.Module, measure: str = "sensitivity") -> Optional[float]:
    """One adapter's score from its gradients, divided by its rank so that adapters of different
    ranks compare (a score per rank-1 component); None before any gradient.

    sensitivity: AdaLoRA's |A * dA| + |B * dB| summed (how much the loss depends on what the
    adapter holds; zero while B = 0, where A gets no gradient either). gradient: |dA|^2 + |dB|^2
    (the Fisher information of the adapter; nonzero from the first step: dB = s G A^T)."""
    if measure not in IMPORTANCE_MEASURES:
        raise ValueError(f"importance measure must be one of {IMPORTANCE_MEASURES}, got {measure!r}")
    score = _score(module, measure)
    return None if score is None else float(score)


class ImportanceTracker:
    """One client's importance scores: per adapted module, an exponential moving average (beta)
    of its score (`sensitivity`) over the steps: `observe` after each backward, before the
    optimizer step. A step where every score is zero (B = 0 everywhere, right after the adapters
    restart) carries no information and is skipped rather than pulling the averages to zero."""

    def __init__(self, beta: float = 0.85, measure: str = "sensitivity") -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"importance beta must be in [0, 1), got {beta}")
        if measure not in IMPORTANCE_MEASURES:
            raise ValueError(f"importance measure must be one of {IMPORTANCE_MEASURES}, got {measure!r}")
        self.beta = float(beta)
        self.measure = measure
        self.scores: Dict[str, float] = {}

    def observe(self, modules: Mapping[str, nn.Module]) -> None:
        pending = {name: _score(module, self.measure) for name, module in modules.items()}
        pending = {name: s for name, s in pending.items() if s is not None}
        if not pending:
            return
        observed = dict(zip(pending, torch.stack(list(pending.values())).tolist()))
        if not any(v > 0 for v in observed.values()):
            return
        for name, s in observed.items():
            prev = self.scores.get(name)
            self.scores[name] = s if prev is None else self.beta * prev + (1.0 - self.beta) * s

    def state_dict(self) -> dict:
        return {"beta": self.beta, "measure": self.measure, "scores": dict(self.scores)}

    def load_state_dict(self, state: Mapping) -> None:
        self.beta = float(state["beta"])
        self.measure = str(state.get("measure", self.measure))
        self.scores = {str(k): float(v) for k, v in state["scores"].items()}


def combine_importance(scores: Sequence[Mapping[str, float]], weights: Sequence[float]) -> Dict[str, float]:
    """Per module, the weighted mean of the clients' scores over the clients that have one."""
    if len(scores) != len(weights):
        raise ValueError(f"combine_importance got {len(scores)} clients' scores but {len(weights)} weights")
    modules = list(dict.fromkeys(m for s in scores for m in s))
    out = {}
    for m in modules:
        pairs = [(float(w), float(s[m])) for s, w in zip(scores, weights) if m in s and w > 0]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[m] = sum(w * v for w, v in pairs) / total
    return out


def ranking_change(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """How far the importance ranking moved: the normalized Kendall tau distance over the modules
    both score, i.e. the share of module pairs ordered oppositely (a pair tied in exactly one of
    the two counts half). 0: same order; 1: reversed. Fewer than two modules: 0."""
    keys = [k for k in before if k in after]
    n = len(keys)
    if n < 2:
        return 0.0
    a = [float(before[k]) for k in keys]
    b = [float(after[k]) for k in keys]
    discordant = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            x = (a[i] > a[j]) - (a[i] < a[j])
            y = (b[i] > b[j]) - (b[i] < b[j])
            if x * y < 0:
                discordant += 1.0
            elif (x == 0) != (y == 0):
                discordant += 0.5
    return discordant / (n * (n - 1) / 2)


# --------------------------------------------------------------------------------------------
# Cost of a client segment at given ranks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptedWeight:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SegmentCost:
    """What one client step costs on a segment, as a function of the ranks of its adapters."""

    cut_layer: int
    weights: Tuple[AdaptedWeight, ...]
    frozen_bytes: int            # every parameter and buffer except the adapters
    matmul_params: int           # base weights a token is multiplied by (no lookup tables, no adapters)
    layers: int
    batch: int
    seq_len: int
    hidden: int
    heads: int
    element_bytes: int           # the model's dtype
    optimizer_states: int        # per adapter element: AdamW 2, SGD 0
    up_bytes: int                # activations + labels/mask going up
    down_bytes: int              # gradients coming down

    @classmethod
    def of(cls, segment: nn.Module, *, cut_layer: int, layers: int, batch: int, seq_len: int, hidden: int,
           heads: int, optimizer: str, up_bytes: int, down_bytes: int) -> "SegmentCost":
        from splitlora_kernels.layers import lora_modules

        modules = lora_modules(segment)
        adapter_ids = {id(p) for m in modules.values() for p in (m.lora_A, m.lora_B)}
        embeddings = {id(m.weight) for m in segment.modules() if isinstance(m, nn.Embedding)}
        frozen = [p for p in segment.parameters() if id(p) not in adapter_ids]
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
        frozen_bytes += sum(b.numel() * b.element_size() for b in segment.buffers())
        matmul = sum(p.numel() for p in frozen if p.dim() >= 2 and id(p) not in embeddings)
        element = next(iter(frozen)).element_size() if frozen else 4
        weights = tuple(AdaptedWeight(n, m.in_features, m.out_features) for n, m in modules.items())
        return cls(cut_layer=cut_layer, weights=weights, frozen_bytes=frozen_bytes, matmul_params=matmul,
                   layers=layers, batch=batch, seq_len=seq_len, hidden=hidden, heads=heads, element_bytes=element,
                   optimizer_states=2 if optimizer == "adamw" else 0, up_bytes=up_bytes, down_bytes=down_bytes)

    @property
    def names(self) -> List[str]:
        return [w.name for w in self.weights]

    def adapter_params(self, ranks: Mapping[str, int]) -> int:
        return sum(int(ranks[w.name]) * (w.in_features + w.out_features) for w in self.weights)

    def forward_flops(self, ranks: Mapping[str, int], batch: Optional[int] = None,
                      seq_len: Optional[int] = None) -> float:
        """Default batch and length: the planning's (the training set's longest sequence)."""
        seq_len = seq_len or self.seq_len
        tokens = (batch or self.batch) * seq_len
        return (2.0 * tokens * (self.matmul_params + self.adapter_params(ranks))
                + 4.0 * tokens * seq_len * self.hidden * self.layers)

    def step_time_s(self, ranks: Mapping[str, int], device: DeviceProfile) -> float:
        """Forward to the cut, input-gradient backward (about one forward), activations up, gradients down."""
        return (device.compute(2.0 * self.forward_flops(ranks)) + device.transfer(self.up_bytes)
                + device.transfer(self.down_bytes))

    def activation_bytes(self, ranks: Mapping[str, int]) -> float:
        """What the forward keeps for the backward (splitlora.memory.SavedActivationMeter measures it)."""
        tokens = self.batch * self.seq_len
        per_layer = (ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN * tokens * self.hidden
                     + ACTIVATION_ELEMENTS_PER_ATTENTION_SCORE * self.batch * self.heads * self.seq_len ** 2)
        lora_intermediates = tokens * sum(int(ranks[w.name]) for w in self.weights)
        return float((self.layers * per_layer + tokens * self.hidden + lora_intermediates) * self.element_bytes)

    def memory_bytes(self, ranks: Mapping[str, int]) -> float:
        """The client step's memory: frozen weights, adapters with their gradients and optimizer
        state, and the activations kept for the backward."""
        adapter = self.adapter_params(ranks) * self.element_bytes
        return float(self.frozen_bytes + adapter * (2 + self.optimizer_states) + self.activation_bytes(ranks))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def allocate_ranks(importance: Mapping[str, float], names: Sequence[str], total: int, min_rank: int,
                   max_rank: int) -> Dict[str, int]:
    """Integer ranks for `names` summing to `total` (clamped to [n min_rank, n max_rank]), each in
    [min_rank, max_rank], above min_rank in proportion to importance (capped weights' share goes to
    the others; integers by largest remainder, ties to the more important, then the earlier)."""
    n = len(names)
    if n == 0:
        return {}
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"ranks need 1 <= min_rank <= max_rank, got {min_rank} and {max_rank}")
    total = max(n * min_rank, min(n * max_rank, int(total)))
    extra, cap = total - n * min_rank, max_rank - min_rank
    imp = [float(importance.get(m, 0.0)) for m in names]
    imp = [v if math.isfinite(v) and v > 0 else 0.0 for v in imp]
    if sum(imp) <= 0:
        imp = [1.0] * n
    share = [0.0] * n
    active = list(range(n))
    remaining = float(extra)
    while active and remaining > 0:
        weight = sum(imp[i] for i in active)
        if weight <= 0:
            portions = {i: remaining / len(active) for i in active}
        else:
            portions = {i: remaining * imp[i] / weight for i in active}
        over = [i for i in active if portions[i] >= cap]
        if not over:
            for i in active:
                share[i] = portions[i]
            break
        for i in over:
            share[i] = float(cap)
            remaining -= cap
        active = [i for i in active if i not in over]
    whole = [min(cap, int(math.floor(s + 1e-9))) for s in share]
    left = extra - sum(whole)
    order = sorted(range(n), key=lambda i: (-(share[i] - whole[i]), -imp[i], i))
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if whole[i] < cap:
                whole[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return {m: min_rank + whole[i] for i, m in enumerate(names)}


@dataclass
class ClientPlan:
    """One client's configuration and its estimates."""

    client: int
    device: str
    cut_layer: int
    ranks: Dict[str, int]
    step_time_s: float
    memory_bytes: float
    fits: bool
    memory_budget_bytes: Optional[float] = None
    time_budget_s: Optional[float] = None
    names: Dict[str, str] = field(default_factory=dict)   # module -> whole-model name, for printing

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def to_state(self) -> dict:
        """A checkpointable dict (without `names`, which the strategy supplies)."""
        state = asdict(self)
        state["ranks"] = {k: int(v) for k, v in self.ranks.items()}
        del state["names"]
        return state

    @classmethod
    def from_state(cls, state: Mapping) -> "ClientPlan":
        return cls(client=int(state["client"]), device=str(state["device"]), cut_layer=int(state["cut_layer"]),
                   ranks={str(k): int(v) for k, v in state["ranks"].items()},
                   step_time_s=float(state["step_time_s"]), memory_bytes=float(state["memory_bytes"]),
                   fits=bool(state["fits"]), memory_budget_bytes=state.get("memory_budget_bytes"),
                   time_budget_s=state.get("time_budget_s"), names=dict(state.get("names") or {}))

    def describe(self) -> str:
        memory = f"{self.memory_bytes / GIB:.4g} GiB"
        if self.memory_budget_bytes is not None:
            memory += f" of {self.memory_budget_bytes / GIB:.4g}"
        time = f"{self.step_time_s * 1e3:.4g} ms"
        if self.time_budget_s is not None:
            time += f" of {self.time_budget_s * 1e3:.4g}"
        ranks = ", ".join(f"{self.names.get(m, m)}={r}" for m, r in self.ranks.items())
        return (f"client{self.client} [{self.device}] cut {self.cut_layer}, total rank {self.total_rank}: "
                f"step {time}, memory {memory}{'' if self.fits else ' (DOES NOT FIT its budget)'}; ranks {ranks}")


def configure_client(client: int, device: DeviceProfile, cost: SegmentCost, importance: Mapping[str, float],
                     target_total: int, *, min_rank: int, max_rank: int, step_time_s: Optional[float] = None,
                     names: Optional[Mapping[str, str]] = None) -> ClientPlan:
    """The largest total rank up to `target_total` whose ranks (split by importance) fit the
    client's memory and, if given, the per-step deadline; min_rank everywhere (fits=False) if none does."""
    n = len(cost.weights)
    low, high = n * min_rank, max(n * min_rank, min(n * max_rank, int(target_total)))
    memory_budget = device.memory_bytes

    def attempt(total: int):
        ranks = allocate_ranks(importance, cost.names, total, min_rank, max_rank)
        t, m = cost.step_time_s(ranks, device), cost.memory_bytes(ranks)
        ok = (step_time_s is None or t <= step_time_s) and (memory_budget is None or m <= memory_budget)
        return ranks, t, m, ok

    best = attempt(high)
    if not best[3]:
        # Cost grows with the total rank: bisect for the largest total that fits.
        lo_try = attempt(low)
        if not lo_try[3]:
            best = lo_try
        else:
            good, bad = low, high
            best = lo_try
            while bad - good > 1:
                mid = (good + bad) // 2
                tried = attempt(mid)
                if tried[3]:
                    good, best = mid, tried
                else:
                    bad = mid
    ranks, t, m, ok = best
    return ClientPlan(client=client, device=device.name, cut_layer=cost.cut_layer, ranks=ranks, step_time_s=t,
                      memory_bytes=m, fits=ok, memory_budget_bytes=memory_budget, time_budget_s=step_time_s,
                      names=dict(names or {}))


def configure_clients(devices: Sequence[DeviceProfile], costs: Sequence[SegmentCost], importance: Mapping[str, float],
                      reference_total: int, *, min_rank: int, max_rank: int, step_time_s: Optional[float] = None,
                      names: Optional[Mapping[str, str]] = None) -> List[ClientPlan]:
    """Every client's plan: its share of `reference_total` (the strongest client's total rank) by
    `resource_scales`, split by importance, lowered until it fits (see `configure_client`)."""
    if len(devices) != len(costs):
        raise ValueError(f"configure_clients got {len(devices)} devices but {len(costs)} segment costs")
    scales = resource_scales(devices)
    return [configure_client(c, d, cost, importance, int(round(scale * reference_total)), min_rank=min_rank,
                             max_rank=max_rank, step_time_s=step_time_s, names=names)
            for c, (d, cost, scale) in enumerate(zip(devices, costs, scales))]


def configure_clients_with_cuts(devices: Sequence[DeviceProfile], costs: Mapping[int, SegmentCost],
                                importance: Mapping[str, float], rank_per_weight: int, *, min_rank: int,
                                max_rank: int, step_time_s: Optional[float] = None,
                                names: Optional[Mapping[str, str]] = None) -> List[ClientPlan]:
    """Every client's plan with its cut: `costs` holds the segment of each candidate cut layer.
    A client takes the deepest cut at which its plan fits (see `configure_client`; its target
    total rank is rank_per_weight per adapted weight of that segment, scaled by
    `resource_scales`), or the shallowest cut (fits=False) when none does. Without a deadline and
    memory limits every client takes the deepest cut."""
    if not costs:
        raise ValueError("configure_clients_with_cuts needs the segment cost of at least one cut")
    scales = resource_scales(devices)
    plans = []
    for c, (device, scale) in enumerate(zip(devices, scales)):
        plan = None
        for cut in sorted(costs, reverse=True):
            cost = costs[cut]
            target = int(round(scale * rank_per_weight * len(cost.weights)))
            plan = configure_client(c, device, cost, importance, target, min_rank=min_rank, max_rank=max_rank,
                                    step_time_s=step_time_s, names=names)
            if plan.fits:
                break
        plans.append(plan)
    return plans


def weakest_plan_for_all(plans: Sequence[ClientPlan], devices: Sequence[DeviceProfile],
                         costs: Mapping[int, SegmentCost], *, step_time_s: Optional[float] = None) -> List[ClientPlan]:
    """The baseline without heterogeneity awareness: every client gets the most constrained
    client's configuration (the shallowest cut, then the smallest total rank, among `plans`),
    with its estimates recomputed on its own device."""
    if not plans:
        raise ValueError("weakest_plan_for_all needs at least one plan")
    weakest = min(plans, key=lambda p: (p.cut_layer, p.total_rank))
    cost = costs[weakest.cut_layer]
    out = []
    for c, device in enumerate(devices):
        t, m = cost.step_time_s(weakest.ranks, device), cost.memory_bytes(weakest.ranks)
        budget = device.memory_bytes
        fits = (step_time_s is None or t <= step_time_s) and (budget is None or m <= budget)
        out.append(ClientPlan(client=c, device=device.name, cut_layer=weakest.cut_layer, ranks=dict(weakest.ranks),
                              step_time_s=t, memory_bytes=m, fits=fits, memory_budget_bytes=budget,
                              time_budget_s=step_time_s, names=dict(weakest.names)))
    return out


# --------------------------------------------------------------------------------------------
# Export: an exact low-rank factorization of a dense update
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def low_rank_factors(delta: torch.Tensor, rank: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B @ A == delta ([out, in]): r is the numerical rank of delta
    (singular values above float32 round-off of the largest), or `rank` (a truncated SVD, the best
    rank-r approximation) when given; at least 1. Computed in float64, returned in delta's dtype."""
    d = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if rank is None:
        tol = float(s[0]) * max(d.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
        r = int((s > tol).sum()) if tol > 0 else 0
    else:
        r = int(rank)
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    return a.to(delta.dtype), b.to(delta.dtype)
