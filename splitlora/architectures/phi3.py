"""Phi-3: a Llama-shaped stack with fused projections (self_attn.qkv_proj, mlp.gate_up_proj: plain
nn.Linear modules, so LoRA targets them by those names) and Mistral's rule for the mask: every
layer uses the sliding window when config.sliding_window is set. Its rotary module (long-RoPE
included) is called once on the position ids, as in Llama."""
from __future__ import annotations

from .llama import SlidingWindowArchitecture
from .registry import register_architecture


class Phi3Architecture(SlidingWindowArchitecture):
    pass


register_architecture("phi3", Phi3Architecture())
