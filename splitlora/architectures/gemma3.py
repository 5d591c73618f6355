"""Gemma 3, text only (model_type gemma3_text, Gemma3ForCausalLM): Gemma 2's forward (scaled
embeddings, layer_types, final logit soft-capping) with

- one rotary table PER LAYER KIND: sliding layers use the local RoPE (its own base frequency),
  full layers the global one. transformers 5 computes both with one module called with the kind
  (`rotary_emb(hidden, position_ids, layer_type)`); each segment does the same for the kinds of its
  own layers.
- q/k norms inside the layers (nothing to do here);
- config.use_bidirectional_attention (EmbeddingGemma): the masks get the model's own overlays.
"""
from __future__ import annotations

import torch

from .gemma2 import Gemma2Architecture
from .registry import register_architecture


def _always(*args):
    return torch.tensor(True, dtype=torch.bool)


class Gemma3TextArchitecture(Gemma2Architecture):
    def position_embeddings(self, segment, hidden, position_ids, kinds):
        rotary = getattr(segment, self.rotary)
        return {kind: rotary(hidden, position_ids, kind) for kind in kinds}

    def mask_kwargs(self, config, kind):
        if not getattr(config, "use_bidirectional_attention", False):
            return {}
        if kind == "sliding_attention":
            from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

            return {"or_mask_function": _bidirectional_window_overlay(config.sliding_window)}
        return {"or_mask_function": _always}

    def graft(self, skeleton, bottom, cut_layer):
        super().graft(skeleton, bottom, cut_layer)
        # The bottom model's config lists its own layers' kinds only, so its rotary module may lack
        # the tables of kinds that appear higher up (e.g. the global one when the cut is below the
        # first full-attention layer): rebuild it from the whole model's config, where it lives.
        target = getattr(skeleton, self.backbone)
        rotary = getattr(target, self.rotary)
        kinds = set(getattr(skeleton.config, "layer_types", None) or ())
        if all(hasattr(rotary, f"{kind}_inv_freq") for kind in kinds):
            return
        buffers = list(rotary.buffers())
        device = buffers[0].device if buffers else None
        with torch.device(device or "cpu"):
            fresh = type(rotary)(skeleton.config)
        if buffers:
            fresh.to(dtype=buffers[0].dtype)
        setattr(target, self.rotary, fresh)


register_architecture("gemma3_text", Gemma3TextArchitecture())
