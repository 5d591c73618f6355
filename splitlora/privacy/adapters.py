"""DP for the adapters: each client clips its adapter update (what it trained since the last
average) to a fixed L2 norm and adds Gaussian noise before it is sent to FedAvg.

Client-side fixed clipping as Flower's DifferentialPrivacyClientSideFixedClipping does it, but
with the noise added on the client too (local DP: the server, the party we defend against here,
never sees an un-noised update). The update is clipped as one vector over all adapter tensors.
Accounting (splitlora.privacy.accountant): one Gaussian release of multiplier
``noise_multiplier`` per client per round, at sample rate 1 (every client takes part in every
round), at the level of the client's whole dataset (adding or removing the client's contribution
moves the update by at most the clip).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .noise import draw_seed, hash_gaussian


def update_norm(update: Dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.detach().double().square().sum() for v in update.values()),
                                torch.zeros((), dtype=torch.float64))))


def privatize_update(new: Dict[str, torch.Tensor], old: Dict[str, torch.Tensor], clip: float,
                     noise_multiplier: float, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """``old + clip(new - old) + N(0, (noise_multiplier * clip)^2)`` per tensor, in each tensor's
    dtype: the state a client sends to FedAvg instead of ``new``. One seed from ``generator`` for
    the whole update; tensor k's noise is the hash Gaussian of its elements at an offset."""
    if set(new) != set(old):
        raise ValueError("the adapter update and the last global adapters name different tensors")
    delta = {k: new[k].detach().to(torch.float32) - old[k].detach().to(torch.float32) for k in new}
    norm = update_norm(delta)
    factor = clip / max(norm, clip)
    sigma = float(noise_multiplier) * float(clip)
    seed = draw_seed(generator)
    out, offset = {}, 0
    for k in sorted(delta):
        d = delta[k] * factor
        if sigma > 0:
            # One long noise vector over the sorted tensors: independent noise for every element.
            noise = hash_gaussian(offset + d.numel(), seed, sigma, device=d.device)[offset:]
            d = d + noise.reshape(d.shape)
        offset += d.numel()
        out[k] = (old[k].detach().to(torch.float32) + d).to(new[k].dtype)
    return out
