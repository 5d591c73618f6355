"""Gemma 2: what its forward does around the decoder layers, reproduced.

- Embeddings scaled by sqrt(hidden_size) in the embedding dtype (so bfloat16 gets 55.5 for sqrt(3072),
  as transformers does on purpose). transformers 5 keeps the scale in the embedding module
  (Gemma2TextScaledWordEmbedding, a non-persistent `embed_scale` buffer); a plain nn.Embedding (the
  older layout, scaled in Gemma2Model.forward) is scaled here the same way.
- Per-layer attention kinds from config.layer_types (sliding/full alternating); one rotary table.
- Final logit soft-capping in Gemma2ForCausalLM.forward: cap * tanh(logits / cap) when
  config.final_logit_softcapping is set. (Attention soft-capping is inside the layers.)
"""
from __future__ import annotations

import torch

from .llama import LayerTypesArchitecture
from .registry import register_architecture


def scaled_embedding(embed_tokens, input_ids, hidden_size: int) -> torch.Tensor:
    hidden = embed_tokens(input_ids)
    if hasattr(embed_tokens, "embed_scale"):  # a scaled-embedding module already applied it
        return hidden
    return hidden * torch.tensor(hidden_size**0.5, dtype=hidden.dtype)


def softcap_logits(logits: torch.Tensor, cap) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class Gemma2Architecture(LayerTypesArchitecture):
    """Llama's layout with per-layer attention kinds (config.layer_types), plus Gemma's embedding
    scaling and final logit soft-capping."""

    def embed(self, segment, input_ids, position_ids):
        return scaled_embedding(segment.embed_tokens, input_ids, segment.config.hidden_size)

    def head_logits(self, segment, hidden):
        logits = getattr(segment, self.head)(hidden)
        return softcap_logits(logits, getattr(segment.config, "final_logit_softcapping", None))


register_architecture("gemma2", Gemma2Architecture())
