"""GPT-2 (GPT2LMHeadModel): learned absolute positions, Conv1D projections, no rotary table."""
from __future__ import annotations

from .base import Architecture
from .registry import register_architecture


class GPT2Architecture(Architecture):
    backbone = "transformer"
    embeddings = ("wte", "wpe", "drop")
    layers = "h"
    final_norm = "ln_f"

    def embed(self, segment, input_ids, position_ids):
        return segment.drop(segment.wte(input_ids) + segment.wpe(position_ids))

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        # GPT2Block takes (hidden, past_key_values, attention_mask, encoder_hidden_states, ...)
        # positionally in the model's own loop; keywords keep us independent of that order.
        out = layer(hidden, attention_mask=mask, use_cache=False, position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out


register_architecture("gpt2", GPT2Architecture())
