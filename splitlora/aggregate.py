"""Aggregation of client adapters."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch


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
