"""Llama and the families that share its forward unchanged: Qwen2 (per-layer sliding/full attention
from config.layer_types) and Mistral (every layer sliding when config.sliding_window is set)."""
from __future__ import annotations

from .base import Architecture, layer_type_of, run_llama_style_layer
from .registry import register_architecture


class LlamaArchitecture(Architecture):
    """embed_tokens -> layers (one causal mask, one rotary table) -> norm -> lm_head."""

    backbone = "model"
    embeddings = ("embed_tokens",)
    layers = "layers"
    final_norm = "norm"
    rotary = "rotary_emb"

    def embed(self, segment, input_ids, position_ids):
        return segment.embed_tokens(input_ids)

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        return run_llama_style_layer(layer, hidden, mask, position_ids, position_embeddings, use_cache=False)


class LayerTypesArchitecture(LlamaArchitecture):
    """A Llama-shaped family whose config lists each layer's attention kind in `layer_types` (Qwen2
    mixes full and sliding-window layers with use_sliding_window + max_window_layers)."""

    def layer_kind(self, config, index):
        return layer_type_of(config, index)


class SlidingWindowArchitecture(LlamaArchitecture):
    """A Llama-shaped family whose every layer uses the sliding window when the config sets one
    (Mistral, Phi-3: `create_sliding_window_causal_mask if config.sliding_window else create_causal_mask`)."""

    def layer_kind(self, config, index):
        return "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"


register_architecture("llama", LlamaArchitecture())
register_architecture("qwen2", LayerTypesArchitecture())
register_architecture("mistral", SlidingWindowArchitecture())
