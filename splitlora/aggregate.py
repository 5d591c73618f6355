"""Aggregation of client adapters: FedAvg of equal shapes, and unequal LoRA ranks (HSplitLoRA's
noise-free stacking, HetLoRA's zero-padding baseline)."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Weighted mean of state dicts with identical keys and shapes (FedAvg, weights = samples).

    Accumulates in float32 (or float64 for float64 tensors) and returns each tensor in its
    original dtype.
    """
    if not states:
        raise ValueError("fedavg needs at least one state dict")
    if len(states) != len(weights):
        raise ValueError(f"fedavg got {len(states)} state dicts but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fedavg weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(keys):
            missing = sorted(set(keys) ^ set(s))
            raise ValueError(f"state dict {i} does not have the keys of state dict 0 (differing: {missing[:5]})")
    total = float(sum(weights))
    out = {}
    for key in keys:
        ref = states[0][key]
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for s, w in zip(states, weights):
            t = s[key]
            if t.shape != ref.shape:
                raise ValueError(f"fedavg: {key!r} has shape {tuple(t.shape)} in one client and {tuple(ref.shape)} "
                                 "in another; unequal ranks need heterogeneous aggregation")
            acc.add_(t.to(device=ref.device, dtype=acc_dtype), alpha=w / total)
        out[key] = acc.to(ref.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Heterogeneous ranks (HSplitLoRA): clients whose adapters on the same module have different ranks
# --------------------------------------------------------------------------------------------
#
# A client's adapter state holds, per adapted module m, `m.lora_A` [r, in] and `m.lora_B` [out, r];
# the module computes W x + s B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA). Clients may
# use different ranks (and so different scalings s_i) for the same module. The quantity that
# matters is each client's update s_i B_i A_i, and FedAvg of the updates is
#
#     dW = sum_i w_i s_i B_i A_i          (w_i = weight_i / sum of weights)
#
# Stacking along the rank gives it exactly: A_stack = [A_1; ...; A_n] (rows), B_stack =
# [w_1 s_1 B_1, ..., w_n s_n B_n] (columns), so B_stack @ A_stack = dW. The per-client scaling is
# folded into the B blocks, which makes the stacked pair an adapter of scaling 1 (or of any
# `target_scaling`, which the B blocks are divided by). Averaging A and B separately after zero
# padding (HetLoRA) does not give dW: B_avg @ A_avg = sum_ij w_i w_j B_i A_j has cross terms.
#
# How a strategy uses it (HSplitLoRA): after a round, `hetero_fedavg_delta(states, weights,
# scalings)` gives dW per module; `fold_into_model(global_model, dW)` adds it to the frozen base
# weights (with clone_sharing_frozen client copies, the shared base: fold ONCE, not per client);
# then `reinit_adapters(client, ranks, seed)` restarts every client's adapters at its own ranks
# (B = 0, so the folded model is what each client starts the next round from).

LORA_A = "lora_A"
LORA_B = "lora_B"


def _normalized_weights(weights: Sequence[float], n: int, what: str) -> list:
    if n == 0:
        raise ValueError(f"{what} needs at least one client's state")
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{what} got {n} clients but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{what} weights must be finite and >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def lora_pairs(state: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, in], B [out, r])} of an adapter state dict whose keys are
    `<module>.lora_A` / `<module>.lora_B` (what `adapters.adapter_state` returns).

    Raises ValueError for a key that is neither, a module with only one of the two, or shapes
    that do not make an adapter (A and B 2-D with the same rank)."""
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in (LORA_A, LORA_B) or not module:
            raise ValueError(f"{key!r} is not a LoRA tensor (expected '<module>.lora_A' or '<module>.lora_B'); "
                             "heterogeneous aggregation takes adapter state dicts only (average other tensors "
                             "with fedavg)")
        halves.setdefault(module, {})[leaf] = value
    out = {}
    for module, pair in halves.items():
        if set(pair) != {LORA_A, LORA_B}:
            missing = ({LORA_A, LORA_B} - set(pair)).pop()
            raise ValueError(f"module {module!r} has no {missing} (an adapter needs both lora_A and lora_B)")
        a, b = pair[LORA_A], pair[LORA_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"module {module!r}: lora_A must be [r, in] and lora_B [out, r] with the same r, got "
                             f"A {tuple(a.shape)} and B {tuple(b.shape)}")
        out[module] = (a, b)
    return out


def lora_ranks(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """{module name: rank} of an adapter state dict."""
    return {m: a.shape[0] for m, (a, _) in lora_pairs(state).items()}


def lora_scalings(model: nn.Module) -> Dict[str, float]:
    """{module name: scaling} of a model's FusedLoRALinear modules (alpha / r, or alpha / sqrt(r)
    with rsLoRA), under the names `adapter_state(model)` uses: the `scalings` argument below."""
    from splitlora_kernels.layers import lora_modules

    return {name: float(m.scaling) for name, m in lora_modules(model).items()}


def stack_adapters(adapters: Sequence[Tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                   scalings: Optional[Sequence[float]] = None, *,
                   target_scaling: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise-free aggregation of one module's adapters of (possibly) different ranks.

    adapters: per client (A_i [r_i, in], B_i [out, r_i]); weights: per client (normalized here);
    scalings: per client s_i (alpha_i / r_i; None = all 1).

    Returns (A_stack [R, in], B_stack [out, R]) with R = sum of the ranks of the clients of
    nonzero weight (a zero-weight client contributes nothing and is left out), such that

        target_scaling * B_stack @ A_stack == sum_i w_i s_i B_i A_i

    up to float round-off: A_stack is the A_i stacked along the rank, B_stack the B_i each
    multiplied by w_i s_i / target_scaling. Computed in float32 at least (float64 stays float64),
    returned in the dtype of the first A / B.
    """
    n = len(adapters)
    if n == 0:
        raise ValueError("stack_adapters needs at least one client's adapter")
    w = _normalized_weights(weights, n, "stack_adapters")
    s = [1.0] * n if scalings is None else [float(x) for x in scalings]
    if len(s) != n:
        raise ValueError(f"stack_adapters got {n} clients but {len(s)} scalings")
    if any(not math.isfinite(x) or x <= 0 for x in s + [float(target_scaling)]):
        raise ValueError(f"scalings and target_scaling must be finite and > 0, got {s} and {target_scaling}")
    a0, b0 = adapters[0]
    for i, (a, b) in enumerate(adapters):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"client {i}: A must be [r, in] and B [out, r] with the same r, got A {tuple(a.shape)} "
                             f"and B {tuple(b.shape)}")
        if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
            raise ValueError(f"client {i}: its adapter is for a [{b.shape[0]} x {a.shape[1]}] weight but client 0's "
                             f"is for [{b0.shape[0]} x {a0.shape[1]}]; the clients' adapters must be on the same "
                             "module")
    acc = torch.promote_types(a0.dtype, torch.float32)
    device = a0.device
    keep = [i for i in range(n) if w[i] > 0]
    a_stack = torch.cat([adapters[i][0].to(device=device, dtype=acc) for i in keep], dim=0)
    b_stack = torch.cat([adapters[i][1].to(device=device, dtype=acc) * (w[i] * s[i] / float(target_scaling))
                         for i in keep], dim=1)
    return a_stack.to(a0.dtype), b_stack.to(b0.dtype)


def _module_table(states: Sequence[Mapping[str, torch.Tensor]], allow_missing: bool, what: str):
    """Per module, the (client index, (A, B)) of the clients that hold it."""
    if not states:
        raise ValueError(f"{what} needs at least one state dict")
    pairs = [lora_pairs(s) for s in states]
    modules = list(dict.fromkeys(m for p in pairs for m in p))
    if not allow_missing:
        for i, p in enumerate(pairs):
            if set(p) != set(modules):
                differing = sorted(set(modules) ^ set(p))
                raise ValueError(f"{what}: client {i}'s adapters are not on the same modules as the others' "
                                 f"(differing: {differing[:5]}); pass allow_missing=True to aggregate each module "
                                 "over the clients that hold it")
    return pairs, {m: [(i, p[m]) for i, p in enumerate(pairs) if m in p] for m in modules}


def _client_scalings(scalings, n: int, what: str) -> list:
    if scalings is None:
        return [None] * n
    if len(scalings) != n:
        raise ValueError(f"{what} got {n} state dicts but {len(scalings)} scalings")
    return list(scalings)


def _scaling_of(client_scalings, module: str, client: int, what: str) -> float:
    if client_scalings is None:
        return 1.0
    if isinstance(client_scalings, Mapping):
        if module not in client_scalings:
            raise ValueError(f"{what}: scalings[{client}] has no entry for module {module!r}")
        return float(client_scalings[module])
    return float(client_scalings)


def hetero_fedavg_stacked(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                          scalings: Optional[Sequence[Union[Mapping[str, float], float]]] = None, *,
                          target_scaling: float = 1.0, allow_missing: bool = False
                          ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the stacked adapter (A_stack, B_stack) of the clients' adapters (see
    `stack_adapters`): target_scaling * B_stack @ A_stack = sum_i w_i s_i B_i A_i.

    states: per client an adapter state dict (`<module>.lora_A` / `.lora_B`); ranks may differ per
    client and per module. weights: per client (samples). scalings: per client, a {module:
    scaling} dict (`lora_scalings(model)`) or one float for all its modules; None = 1.
    allow_missing: a module missing from some clients (e.g. clients cut at different layers) is
    aggregated over the clients that hold it, their weights renormalized; otherwise an error.
    """
    w = _normalized_weights(weights, len(states), "hetero_fedavg_stacked")
    sc = _client_scalings(scalings, len(states), "hetero_fedavg_stacked")
    _, table = _module_table(states, allow_missing, "hetero_fedavg_stacked")
    out = {}
    for module, holders in table.items():
        if sum(w[i] for i, _ in holders) <= 0:
            continue  # only zero-weight clients hold it: there is no update to aggregate
        out[module] = stack_adapters([ab for _, ab in holders], [w[i] for i, _ in holders],
                                     [_scaling_of(sc[i], module, i, "hetero_fedavg_stacked") for i, _ in holders],
                                     target_scaling=target_scaling)
    return out


def hetero_fedavg_delta(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                        scalings: Optional[Sequence[Union[Mapping[str, float], float]]] = None, *,
                        allow_missing: bool = False) -> Dict[str, torch.Tensor]:
    """Per module, the exact aggregated update dW = sum_i w_i s_i B_i A_i, [out, in] (the layout of
    B @ A; GPT-2's Conv1D stores its weight transposed, which `fold_into_weight` handles).
    Arguments as for `hetero_fedavg_stacked`. Computed in float32 at least, returned in B's dtype."""
    stacked = hetero_fedavg_stacked(states, weights, scalings, allow_missing=allow_missing)
    out = {}
    for module, (a, b) in stacked.items():
        acc = torch.promote_types(b.dtype, torch.float32)
        out[module] = (b.to(acc) @ a.to(acc)).to(b.dtype)
    return out


@torch.no_grad()
def truncate_product(a: torch.Tensor, b: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A_k [k, in], B_k [out, k]) whose product B_k @ A_k is the best rank-k approximation of
    b @ a (a [R, in], b [out, R]; k = min(rank, R, in, out)), the singular values split evenly
    between the two factors. Computed from the factors: a QR of each and the SVD of the small
    [R, R] core, never the [out, in] product; in float64, returned in a's and b's dtypes."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"truncate_product: a must be [R, in] and b [out, R] with the same R, got a "
                         f"{tuple(a.shape)} and b {tuple(b.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"truncate_product: rank must be an integer >= 1, got {rank!r}")
    qb, rb = torch.linalg.qr(b.detach().to(torch.float64))      # b = qb rb
    qa, ra = torch.linalg.qr(a.detach().to(torch.float64).t())  # a.T = qa ra
    u, s, vh = torch.linalg.svd(rb @ ra.t())                     # b @ a = qb (u s vh) qa.T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ qa.t())
    return a_k.to(a.dtype), b_k.to(b.dtype)


@torch.no_grad()
def fold_into_weight(weight: torch.Tensor, delta: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """weight += delta, in place (accumulated in float32 at least), and returns weight.

    delta is [out, in] (`hetero_fedavg_delta`); weight is [out, in], or [in, out] with
    fan_in_fan_out (GPT-2's Conv1D layout, FusedLoRALinear's flag of the same name)."""
    d = delta.t() if fan_in_fan_out else delta
    if tuple(d.shape) != tuple(weight.shape):
        layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
        raise ValueError(f"fold_into_weight: the update is {tuple(delta.shape)} ([out, in]) but the weight is "
                         f"{tuple(weight.shape)}, stored {layout}")
    acc = torch.promote_types(weight.dtype, torch.float32)
    weight.copy_(weight.to(acc) + d.to(device=weight.device, dtype=acc))
    return weight


@torch.no_grad()
def fold_into_model(model: nn.Module, deltas: Mapping[str, torch.Tensor], *, zero_adapters: bool = True) -> None:
    """Adds each module's dW (`hetero_fedavg_delta`, names as in `adapter_state(model)`) to the frozen
    base weight of that FusedLoRALinear of `model`; with zero_adapters its lora_B is set to 0, so
    the module computes (W + dW) x and the old adapter is not counted twice.

    Client copies made with `clone_sharing_frozen` share the base weight: fold once (into any one
    of them, or the global model) and every client sees the new weight."""
    from splitlora_kernels.layers import lora_modules

    modules = lora_modules(model)
    unknown = sorted(set(deltas) - set(modules))
    if unknown:
        raise ValueError(f"fold_into_model: {unknown[:5]} are not LoRA modules of the model; its LoRA modules are "
                         f"{sorted(modules)[:5]}{' ...' if len(modules) > 5 else ''}")
    for name, delta in deltas.items():
        m = modules[name]
        if m.merged:
            raise ValueError(f"fold_into_model: module {name!r} is merged; unmerge it first")
        fold_into_weight(m.weight, delta, fan_in_fan_out=m.fan_in_fan_out)
        if zero_adapters:
            m.lora_B.zero_()


@torch.no_grad()
def reinit_adapters(model: nn.Module, ranks: Optional[Mapping[str, int]] = None, *, seed: int = 0,
                    names: Optional[Mapping[str, str]] = None) -> bool:
    """Restarts the adapters of `model`'s FusedLoRALinear modules at the given ranks ({module: r};
    modules not listed keep their rank): A from `adapters.init_adapter` (seeded by `seed` and the
    module's name, `names[module]` if given, e.g. its whole-model name), B = 0, so the model
    computes its base weights exactly. The scaling follows the new rank (alpha / r).

    Returns True when some rank changed: those modules got new Parameter objects, so an optimizer
    built on the old ones must be rebuilt."""
    from splitlora_kernels.layers import lora_modules

    from .adapters import init_adapter

    ranks = dict(ranks or {})
    modules = lora_modules(model)
    unknown = sorted(set(ranks) - set(modules))
    if unknown:
        raise ValueError(f"reinit_adapters: {unknown[:5]} are not LoRA modules of the model")
    replaced = False
    for name, m in modules.items():
        r = int(ranks.get(name, m.r))
        if r < 1:
            raise ValueError(f"reinit_adapters: the rank of {name!r} must be >= 1, got {r}")
        if r != m.r:
            factory = dict(device=m.lora_A.device, dtype=m.lora_A.dtype)
            m.lora_A = nn.Parameter(torch.empty(r, m.in_features, **factory))
            m.lora_B = nn.Parameter(torch.empty(m.out_features, r, **factory))
            replaced = True
        init_adapter(m, seed, (names or {}).get(name, name))
    return replaced


def zero_pad_fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                    allow_missing: bool = False) -> Dict[str, torch.Tensor]:
    """HetLoRA-style baseline: zero-pad every client's A to [r_max, in] and B to [out, r_max], then
    average A and B separately (weighted). Returns an adapter state dict at rank r_max per module;
    `truncate(state, ranks)` gives each client its own rank back.

    This is NOT the weighted mean of the clients' updates: B_avg @ A_avg = sum_ij w_i w_j B_i A_j
    has cross terms (and per-client scalings are ignored, as in HetLoRA). It is the baseline that
    `hetero_fedavg_delta` is compared with. Same-rank clients with identical A give exactly FedAvg.
    """
    w = _normalized_weights(weights, len(states), "zero_pad_fedavg")
    _, table = _module_table(states, allow_missing, "zero_pad_fedavg")
    out = {}
    for module, holders in table.items():
        total = sum(w[i] for i, _ in holders)
        if total <= 0:
            continue
        r_max = max(a.shape[0] for _, (a, _b) in holders)
        a0, b0 = holders[0][1]
        for i, (a, b) in holders:
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise ValueError(f"zero_pad_fedavg: module {module!r} is [{b.shape[0]} x {a.shape[1]}] in client {i} "
                                 f"but [{b0.shape[0]} x {a0.shape[1]}] in client {holders[0][0]}")
        acc = torch.promote_types(a0.dtype, torch.float32)
        a_avg = torch.zeros(r_max, a0.shape[1], dtype=acc, device=a0.device)
        b_avg = torch.zeros(b0.shape[0], r_max, dtype=acc, device=a0.device)
        for i, (a, b) in holders:
            r = a.shape[0]
            a_avg[:r].add_(a.to(device=a0.device, dtype=acc), alpha=w[i] / total)
            b_avg[:, :r].add_(b.to(device=a0.device, dtype=acc), alpha=w[i] / total)
        out[f"{module}.{LORA_A}"] = a_avg.to(a0.dtype)
        out[f"{module}.{LORA_B}"] = b_avg.to(b0.dtype)
    return out


def truncate(state: Mapping[str, torch.Tensor], ranks: Union[int, Mapping[str, int]]) -> Dict[str, torch.Tensor]:
    """An adapter state dict cut to the given ranks (one int for every module, or {module: r}):
    the first r rows of each A and the first r columns of each B (copies)."""
    out = {}
    for module, (a, b) in lora_pairs(state).items():
        if isinstance(ranks, Mapping):
            if module not in ranks:
                raise ValueError(f"truncate: no rank given for module {module!r}")
            r = ranks[module]
        else:
            r = ranks
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= a.shape[0]:
            raise ValueError(f"truncate: the rank of {module!r} must be an integer in [1, {a.shape[0]}] "
                             f"(its current rank), got {r!r}")
        out[f"{module}.{LORA_A}"] = a[:r].clone()
        out[f"{module}.{LORA_B}"] = b[:, :r].clone()
    if isinstance(ranks, Mapping):
        stray = sorted(set(ranks) - {k.rpartition(".")[0] for k in out})
        if stray:
            raise ValueError(f"truncate: ranks given for modules the state does not have: {stray[:5]}")
    return out
