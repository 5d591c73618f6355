"""`Architecture`: where the parts of one family of *ForCausalLM live and how its forward runs.

A split segment (splitlora.split) holds a slice of a causal LM and runs it with the family's own
modules; what happens BETWEEN those modules in the model's `*Model.forward` and
`*ForCausalLM.forward` (scaling the embeddings, which mask and rotary table each layer gets, soft-
capping the logits) is what an Architecture reproduces. Its hooks, in the order a forward calls them:

    embed(segment, input_ids, position_ids)                -> hidden  (client bottom only)
    layer_kind(config, index)                              -> "full_attention" | "sliding_attention" | ...
    make_mask(config, kind, hidden, attention_mask, position_ids)      one mask per kind
    position_embeddings(segment, hidden, position_ids, kinds)          {kind: rotary (cos, sin) or None}
    run_layer(layer, hidden, mask, position_ids, position_embeddings)  -> hidden
    final norm (the module named `final_norm`), then
    head_logits(segment, hidden)                           -> logits  (LM head, soft-capping)

Attribute names are relative to the decoder stack `backbone` (e.g. `model` in LlamaForCausalLM),
except `head`, which is relative to the causal LM itself. Register an instance for a model type with
`splitlora.architectures.register_architecture`; `check_split` tells whether it reproduces the model.

This module imports torch only: transformers is imported where a mask is built.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["Architecture", "layer_type_of"]


def layer_type_of(config, index: int, default: str = "full_attention") -> str:
    """`config.layer_types[index]` where the config lists per-layer attention types (Qwen2/3,
    Gemma2/3, ...), else `default`."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else default


class Architecture:
    """Where the parts of one family of *ForCausalLM live and how its decoder layers are called.

    Subclass it, set the four names below and implement `embed` and `run_layer` (override the other
    hooks where the family differs from Llama's plain stack), then register an instance:

        class MyArch(Architecture):
            backbone, embeddings, layers, final_norm = "model", ("embed_tokens",), "layers", "norm"
            rotary = "rotary_emb"
            def embed(self, segment, input_ids, position_ids): return segment.embed_tokens(input_ids)
            def run_layer(self, layer, hidden, mask, position_ids, position_embeddings): ...
        register_architecture("my_model_type", MyArch())
    """

    backbone: str
    embeddings: Tuple[str, ...]
    layers: str
    final_norm: str
    # The rotary-embedding module(s) of the backbone, recomputed by every segment: None, one name,
    # or a tuple of names (a family with several rotary tables).
    rotary: Union[None, str, Tuple[str, ...]] = None
    head: str = "lm_head"

    # ---- layout --------------------------------------------------------------------------------

    @property
    def rotary_modules(self) -> Tuple[str, ...]:
        """The names of the rotary-embedding modules, as a tuple (empty when there is none)."""
        if self.rotary is None:
            return ()
        return (self.rotary,) if isinstance(self.rotary, str) else tuple(self.rotary)

    def validate(self) -> None:
        """Raises ValueError when a name the segments need is missing or of the wrong type."""
        problems = []
        for attr in ("backbone", "layers", "final_norm", "head"):
            value = getattr(self, attr, None)
            if not isinstance(value, str) or not value:
                problems.append(f"{attr} must be a non-empty attribute name, got {value!r}")
        embeddings = getattr(self, "embeddings", None)
        if not isinstance(embeddings, tuple) or not embeddings or not all(isinstance(e, str) and e for e in embeddings):
            problems.append(f"embeddings must be a non-empty tuple of attribute names, got {embeddings!r}")
        rotary = self.rotary
        if rotary is not None and not (
            (isinstance(rotary, str) and rotary)
            or (isinstance(rotary, tuple) and rotary and all(isinstance(r, str) and r for r in rotary))
        ):
            problems.append(f"rotary must be None, an attribute name or a tuple of them, got {rotary!r}")
        if problems:
            raise ValueError(f"{type(self).__name__} is not a complete Architecture: " + "; ".join(problems) + ".")

    # ---- forward hooks -------------------------------------------------------------------------

    def embed(self, segment: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The hidden states entering decoder layer 0 (the segment holds the modules named in
        `embeddings` under those names)."""
        raise NotImplementedError(f"{type(self).__name__}.embed")

    def layer_kind(self, config, index: int) -> str:
        """The attention kind of decoder layer `index`, which selects its mask (and, in families with
        one rotary table per kind, its position embeddings)."""
        return "full_attention"

    def mask_kwargs(self, config, kind: str) -> Dict[str, Any]:
        """Extra keyword arguments for transformers' mask builder of `kind` (e.g. an
        `or_mask_function`), as the family's own forward passes them."""
        return {}

    def make_mask(self, config, kind: str, hidden: torch.Tensor, attention_mask, position_ids):
        # Imported here: importing transformers is slow, and `import splitlora` must stay light.
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        if kind not in builders:
            raise ValueError(f"layer attention kind {kind!r} is not supported; expected one of {sorted(builders)}.")
        # `hidden` stands in for inputs_embeds: the mask builders read only its shape, dtype and device.
        return builders[kind](
            config=config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
            **self.mask_kwargs(config, kind),
        )

    def position_embeddings(
        self, segment: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: Iterable[str]
    ) -> Dict[str, Optional[Any]]:
        """{layer kind: what `run_layer` passes as position_embeddings} for the kinds of the
        segment's layers. Default: the one rotary module's (cos, sin) for every kind, or None."""
        names = self.rotary_modules
        if not names:
            return {kind: None for kind in kinds}
        if len(names) > 1:
            raise NotImplementedError(
                f"{type(self).__name__} has several rotary modules {names}: override position_embeddings "
                "to say which one each layer kind uses."
            )
        table = getattr(segment, names[0])(hidden, position_ids)
        return {kind: table for kind in kinds}

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.run_layer")

    def head_logits(self, segment: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden states after the final norm (the LM head, plus whatever the
        family's *ForCausalLM.forward does to them)."""
        return getattr(segment, self.head)(hidden)

    # ---- loading -------------------------------------------------------------------------------

    def graft(self, skeleton: nn.Module, bottom: nn.Module, cut_layer: int) -> None:
        """Moves `bottom`'s embeddings, rotary module(s) and decoder layers [0, cut_layer) into
        `skeleton` (the same family, more layers, typically on the meta device)."""
        source, target = getattr(bottom, self.backbone), getattr(skeleton, self.backbone)
        for name in self.embeddings + self.rotary_modules:
            setattr(target, name, getattr(source, name))
        layers = getattr(target, self.layers)
        for i in range(cut_layer):
            layers[i] = getattr(source, self.layers)[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def run_llama_style_layer(layer, hidden, mask, position_ids, position_embeddings, **extra) -> torch.Tensor:
    """Calls a decoder layer with the keywords every Llama-derived layer takes. Keywords, not
    positions: the layers' positional order differs between families (Gemma's puts
    position_embeddings second)."""
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=None,
        position_embeddings=position_embeddings,
        **extra,
    )
    return out[0] if isinstance(out, tuple) else out
