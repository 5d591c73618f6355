"""Qwen3: Qwen2's stack (per-layer attention kinds from config.layer_types) with q/k RMS norms, which
live inside each layer's attention and need nothing from the split."""
from __future__ import annotations

from .llama import LayerTypesArchitecture
from .registry import register_architecture


class Qwen3Architecture(LayerTypesArchitecture):
    pass


register_architecture("qwen3", Qwen3Architecture())
