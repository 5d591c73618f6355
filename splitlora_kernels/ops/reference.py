"""Plain-torch LoRA linear: the CPU path of `lora_linear` and the oracle the Triton kernels are tested against.

y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T

Autograd of torch itself provides the backward, so this file holds no gradient formulas that
could share a bug with the Triton backward.
"""
from __future__ import annotations

import math
import numbers
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


def check_dropout_p(dropout_p, name: str) -> float:
    """The dropout probability as a float; ValueError (prefixed with the op's `name`) unless it is a
    real number in [0, 1). One check shared by every LoRA op, so their messages cannot drift apart."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_lora_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> None:
    """Raise ValueError naming the argument at fault, what was expected and what was given."""
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have shape [..., in_features], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must have shape [out_features, in_features] (nn.Linear layout), "
                         f"got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: x.shape[-1] must equal weight.shape[1] (in_features={in_features}), "
                         f"got x of shape {tuple(x.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_linear: lora_a must have shape [rank, in_features={in_features}], "
                         f"got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if rank < 1:
        raise ValueError("lora_linear: rank (lora_a.shape[0]) must be at least 1, got 0; "
                         "without an adapter use torch.nn.functional.linear")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_linear: lora_b must have shape [out_features={out_features}, rank={rank}], "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: bias must have shape [out_features={out_features}] or be None, "
                         f"got {tuple(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_linear: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name}.dtype must equal x.dtype ({x.dtype}), got {t.dtype}; "
                             f"cast the adapter and base weights to one dtype first")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} must be on x's device ({x.device}), got {t.device}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be a finite Python number (lora_alpha / r), got {scaling!r}")
    check_dropout_p(dropout_p, "lora_linear")
