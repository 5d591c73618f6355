"""Ops: each file holds one op's Triton kernels, launch functions and autograd.Function;
reference.py holds their plain-torch counterparts (CPU path and test oracle)."""
from .lora_linear import (
    LoRALinearFunction,
    dropout_mask,
    draw_seed,
    lora_linear,
    lora_linear_backend,
    lora_linear_triton,
)
from .reference import check_lora_linear_args, lora_linear_reference
from .multi_lora import (
    MultiLoRALinearFunction,
    check_multi_lora_args,
    multi_lora_linear,
    multi_lora_linear_backend,
    multi_lora_linear_reference,
    multi_lora_linear_triton,
    offsets_from_sizes,
)

__all__ = [
    "LoRALinearFunction",
    "check_lora_linear_args",
    "dropout_mask",
    "draw_seed",
    "lora_linear",
    "lora_linear_backend",
    "lora_linear_reference",
    "lora_linear_triton",
    "MultiLoRALinearFunction",
    "check_multi_lora_args",
    "multi_lora_linear",
    "multi_lora_linear_backend",
    "multi_lora_linear_reference",
    "multi_lora_linear_triton",
    "offsets_from_sizes",
]
