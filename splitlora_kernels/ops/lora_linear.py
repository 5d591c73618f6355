"""Fused LoRA linear: interface stub (CPU reference path only).

To be replaced by the Triton kernels, their launch functions and the autograd.Function.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import lora_linear_reference


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    mask = None
    if dropout_p > 0.0 and training:
        keep = torch.empty_like(x).bernoulli_(1.0 - dropout_p)
        mask = keep / (1.0 - dropout_p)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias, mask)
