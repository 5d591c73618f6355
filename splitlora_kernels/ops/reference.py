"""Plain-torch LoRA linear: the CPU path of `lora_linear` and the oracle the Triton kernels are tested against.

y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T

Autograd of torch itself provides the backward, so this file holds no gradient formulas that
could share a bug with the Triton backward.
"""
from __future__ import annotations

from typing import Optional

import torch


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference forward. `dropout_mask`, when given, is the already scaled keep mask
    (0 or 1/(1-p)), broadcastable to `x`; it lets tests replay the mask a fused kernel drew."""
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    low_rank = torch.nn.functional.linear(torch.nn.functional.linear(x_lora, lora_a), lora_b)
    return base + scaling * low_rank
