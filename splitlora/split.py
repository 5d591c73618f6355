"""Cut a transformers causal LM into a client bottom and a server top (or, U-shaped, three parts).

    client, server = split_model(model, cut_layer=2)
    hidden = client(input_ids, attention_mask)               # [B, T, H]  -> goes over the wire
    logits = server(hidden, attention_mask)                  # [B, T, V]

    client, server, tail = split_model_u_shape(model, cut_layer=1, server_end=3)
    logits = tail(server(client(input_ids, mask), mask), mask)

Each segment is an `nn.Module` owning deep copies of its part of the model, so the source model is
left as it was and `copy.deepcopy(segment)` is a fully independent replica (one per client). A
segment keeps the model's own child names relative to its decoder stack (`layers`/`h`, `embed_tokens`,
`norm`/`ln_f`, ...) and indexes decoder layers by their GLOBAL index (an nn.ModuleDict keyed by
`str(i)`), so `layers.5.self_attn.q_proj` in a server segment is `model.layers.5.self_attn.q_proj`
in the whole model: target-module suffixes (`q_proj`, `c_attn`) match as on the whole model, and
`full_model_name()` / `local_name()` translate names with a prefix.

Neither side ever sees a mask or rotary table built by the other: every segment rebuilds the
causal 4-D mask from the 2-D padding mask with transformers' own `masking_utils` (so the attention
implementation in the config -- sdpa, eager, ... -- gets the mask format it expects) and recomputes
rotary cos/sin from the position ids. Only hidden states (and, alongside them, the padding mask
and position ids, which are metadata of the batch) cross the cut.

Adding an architecture is one `_Architecture` subclass registered in `_ARCHITECTURES`: where the
embeddings, decoder layers, final norm, rotary module and head live, and how a layer is called.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ClientSegment",
    "ServerSegment",
    "ClientTail",
    "split_model",
    "split_model_u_shape",
    "graft_bottom",
]


# --------------------------------------------------------------------------------------------
# Per-architecture adapters
# --------------------------------------------------------------------------------------------


class _Architecture:
    """Where the parts of one family of *ForCausalLM live and how its decoder layers are called.

    Attribute names are relative to the decoder stack `backbone` (e.g. `model` in LlamaForCausalLM),
    except `head`, which is relative to the causal LM itself."""

    backbone: str
    embeddings: Tuple[str, ...]
    layers: str
    final_norm: str
    rotary: Optional[str] = None
    head: str = "lm_head"

    def embed(self, segment: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_kind(self, config, index: int) -> str:
        """The attention kind of decoder layer `index`, which selects its mask."""
        return "full_attention"

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
        )

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings) -> torch.Tensor:
        raise NotImplementedError


class _GPT2(_Architecture):
    backbone = "transformer"
    embeddings = ("wte", "wpe", "drop")
    layers = "h"
    final_norm = "ln_f"

    def embed(self, segment, input_ids, position_ids):
        return segment.drop(segment.wte(input_ids) + segment.wpe(position_ids))

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        # GPT2Block takes (hidden, past_key_values, attention_mask, encoder_hidden_states, ...)
        # positionally in the model's own loop; keywords keep us independent of that order.
        return layer(hidden, attention_mask=mask, use_cache=False, position_ids=position_ids)


class _Llama(_Architecture):
    backbone = "model"
    embeddings = ("embed_tokens",)
    layers = "layers"
    final_norm = "norm"
    rotary = "rotary_emb"

    def embed(self, segment, input_ids, position_ids):
        return segment.embed_tokens(input_ids)

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        return layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
            position_embeddings=position_embeddings,
        )


class _Qwen2(_Llama):
    def layer_kind(self, config, index):
        # Qwen2 may mix full and sliding-window layers (use_sliding_window + max_window_layers).
        layer_types = getattr(config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"


class _Mistral(_Llama):
    def layer_kind(self, config, index):
        # Every Mistral layer uses the sliding window when the config sets one.
        return "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"


_ARCHITECTURES: Dict[str, _Architecture] = {
    "gpt2": _GPT2(),
    "llama": _Llama(),
    "qwen2": _Qwen2(),
    "mistral": _Mistral(),
}

SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)  # ("gpt2", "llama", "qwen2", "mistral")


def _architecture_of(model) -> _Architecture:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a transformers causal LM (an nn.Module); got {type(model).__name__}.")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"cannot split a model of type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    arch = _ARCHITECTURES[model_type]
    if not hasattr(model, arch.backbone) or not hasattr(model, arch.head):
        raise ValueError(
            f"model is a {type(model).__name__}, which has no LM head ({arch.backbone!r} and {arch.head!r}); "
            f"pass the causal LM class (AutoModelForCausalLM), not the bare {model_type} backbone."
        )
    return arch


def _num_layers(model, arch: _Architecture) -> int:
    return len(getattr(getattr(model, arch.backbone), arch.layers))


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}.")


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


class _Segment(nn.Module):
    """A contiguous slice of a causal LM. Subclasses define forward()."""

    def __init__(
        self,
        model: nn.Module,
        arch: _Architecture,
        layer_range: Tuple[int, int],
        embeddings: bool,
        head: bool,
    ) -> None:
        super().__init__()
        backbone = getattr(model, arch.backbone)
        start, end = layer_range
        source_layers = getattr(backbone, arch.layers)
        if not 0 <= start < end <= len(source_layers):
            raise ValueError(
                f"layer range [{start}, {end}) is not a non-empty slice of the model's {len(source_layers)} "
                "decoder layers; build segments with split_model() or split_model_u_shape()."
            )
        wanted = {"config": model.config, "layers": {str(i): source_layers[i] for i in range(start, end)}}
        if embeddings:
            wanted["embeddings"] = {name: getattr(backbone, name) for name in arch.embeddings}
        if head:
            wanted["final_norm"] = getattr(backbone, arch.final_norm)
            wanted["head"] = getattr(model, arch.head)
        if arch.rotary is not None:
            wanted["rotary"] = getattr(backbone, arch.rotary)
        # One deepcopy for everything: the copied layers then share ONE config object, the segment's
        # (so e.g. switching `segment.config._attn_implementation` reaches every attention module),
        # while nothing is shared with the source model. A tied head gets its own weight here, since
        # the embedding it was tied to is not part of this copy (or is copied by another segment).
        copied = copy.deepcopy(wanted)

        self._arch = arch
        self.config = copied["config"]
        self.model_type = self.config.model_type
        self.layer_range = (start, end)
        self.num_model_layers = len(source_layers)
        for name, module in copied.get("embeddings", {}).items():
            self.add_module(name, module)
        self.add_module(arch.layers, nn.ModuleDict(copied["layers"]))
        if head:
            self.add_module(arch.final_norm, copied["final_norm"])
            self.add_module(arch.head, copied["head"])
        if arch.rotary is not None:
            self.add_module(arch.rotary, copied["rotary"])
        self._has_head = head
        # Mirror the model's mode without touching the copied children's own flags.
        self.training = model.training

    # ---- names --------------------------------------------------------------------------------

    @property
    def decoder_layers(self) -> nn.ModuleDict:
        """The decoder layers of this segment, keyed by their global index as a string."""
        return getattr(self, self._arch.layers)

    def full_model_name(self, name: str) -> str:
        """The name in the original model of the module, parameter or buffer called `name` in this
        segment (e.g. `layers.3.self_attn.q_proj` -> `model.layers.3.self_attn.q_proj`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty module or parameter name of this segment; got {name!r}.")
        first = name.split(".", 1)[0]
        own = [child for child, _ in self.named_children()]
        if first not in own:
            raise ValueError(f"{name!r} is not a name inside this segment; its top-level children are {own}.")
        if first == self._arch.head:
            return name
        return f"{self._arch.backbone}.{name}"

    def local_name(self, full_name: str) -> Optional[str]:
        """The inverse of full_model_name: this segment's name for `full_name` of the original model,
        or None when that module or parameter lives in another segment."""
        if full_name == self._arch.head or full_name.startswith(self._arch.head + "."):
            local = full_name
        elif full_name.startswith(self._arch.backbone + "."):
            local = full_name[len(self._arch.backbone) + 1 :]
        else:
            return None
        parts = local.split(".")
        if parts[0] not in dict(self.named_children()):
            return None
        if parts[0] == self._arch.layers and (len(parts) < 2 or parts[1] not in self.decoder_layers):
            return None
        return local

    def extra_repr(self) -> str:
        start, end = self.layer_range
        return f"model_type={self.model_type!r}, layers=[{start}, {end}) of {self.num_model_layers}"

    # ---- shared forward machinery -------------------------------------------------------------

    @staticmethod
    def _positions(position_ids, batch: int, length: int, device) -> torch.Tensor:
        if position_ids is None:
            # What the whole model uses without a cache: 0..T-1, broadcast over the batch.
            return torch.arange(length, device=device).unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids must have shape [{batch}, {length}] or [1, {length}]; got {tuple(position_ids.shape)}."
            )
        return position_ids

    @staticmethod
    def _check_mask(attention_mask, batch: int, length: int):
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask  # a prepared 4-D mask passes through, as in transformers
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be a [{batch}, {length}] padding mask of 0/1 (or a prepared 4-D mask); "
                f"got shape {tuple(attention_mask.shape)}."
            )
        return attention_mask

    def _run_layers(self, hidden, attention_mask, position_ids) -> torch.Tensor:
        arch = self._arch
        masks: Dict[str, object] = {}
        position_embeddings = None
        if arch.rotary is not None:
            position_embeddings = getattr(self, arch.rotary)(hidden, position_ids)
        for index, layer in self.decoder_layers.items():
            kind = arch.layer_kind(self.config, int(index))
            if kind not in masks:  # a mask may legitimately be None (sdpa's is_causal fast path)
                masks[kind] = arch.make_mask(self.config, kind, hidden, attention_mask, position_ids)
            hidden = arch.run_layer(layer, hidden, masks[kind], position_ids, position_embeddings)
        return hidden

    def _head(self, hidden) -> torch.Tensor:
        hidden = getattr(self, self._arch.final_norm)(hidden)
        return getattr(self, self._arch.head)(hidden)


class ClientSegment(_Segment):
    """Embeddings and decoder layers [0, cut_layer): `forward(input_ids, attention_mask, position_ids)`
    returns the hidden states at the cut, [B, T, H]."""

    def __init__(self, model: nn.Module, cut_layer: int) -> None:
        arch = _architecture_of(model)
        super().__init__(model, arch, (0, cut_layer), embeddings=True, head=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len]; got {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
        attention_mask = self._check_mask(attention_mask, batch, length)
        position_ids = self._positions(position_ids, batch, length, input_ids.device)
        hidden = self._arch.embed(self, input_ids, position_ids)
        return self._run_layers(hidden, attention_mask, position_ids)


class _UpperSegment(_Segment):
    def __init__(self, model: nn.Module, start: int, end: int, head: bool) -> None:
        arch = _architecture_of(model)
        super().__init__(model, arch, (start, end), embeddings=False, head=head)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [batch, seq_len, hidden_size]; got {tuple(hidden.shape)}.")
        batch, length = hidden.shape[:2]
        attention_mask = self._check_mask(attention_mask, batch, length)
        position_ids = self._positions(position_ids, batch, length, hidden.device)
        hidden = self._run_layers(hidden, attention_mask, position_ids)
        return self._head(hidden) if self._has_head else hidden


class ServerSegment(_UpperSegment):
    """Decoder layers [cut_layer, end). With the head (plain split: end = L) it also holds the final
    norm and LM head and `forward(hidden, attention_mask, position_ids)` returns logits [B, T, V];
    without it (U-shaped split) it returns hidden states for the ClientTail."""

    def __init__(self, model: nn.Module, cut_layer: int, end: Optional[int] = None) -> None:
        arch = _architecture_of(model)
        total = _num_layers(model, arch)
        end = total if end is None else end
        super().__init__(model, cut_layer, end, head=end == total)

    @property
    def returns_logits(self) -> bool:
        return self._has_head


class ClientTail(_UpperSegment):
    """The top of a U-shaped split, kept on the client so labels never leave it: decoder layers
    [server_end, L), final norm and LM head; `forward(hidden, ...)` returns logits [B, T, V]."""

    def __init__(self, model: nn.Module, server_end: int) -> None:
        arch = _architecture_of(model)
        super().__init__(model, server_end, _num_layers(model, arch), head=True)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def split_model(model: nn.Module, cut_layer: int) -> Tuple[ClientSegment, ServerSegment]:
    """Split `model` after decoder layer cut_layer-1: the client gets the embeddings and layers
    [0, cut_layer), the server layers [cut_layer, L), the final norm and the LM head.

    Valid cuts leave each side at least one decoder layer: 1 <= cut_layer <= L-1. The model is not
    modified; both segments hold deep copies."""
    arch = _architecture_of(model)
    total = _num_layers(model, arch)
    _check_int("cut_layer", cut_layer)
    if not 1 <= cut_layer <= total - 1:
        raise ValueError(
            f"cut_layer must be in [1, {total - 1}] for a model with {total} decoder layers "
            f"(each side needs at least one layer); got {cut_layer}."
        )
    return ClientSegment(model, cut_layer), ServerSegment(model, cut_layer)


def split_model_u_shape(
    model: nn.Module, cut_layer: int, server_end: int
) -> Tuple[ClientSegment, ServerSegment, ClientTail]:
    """U-shaped split: client bottom (embeddings, layers [0, cut_layer)), server middle (layers
    [cut_layer, server_end)) and client tail (layers [server_end, L), final norm, LM head), so labels
    stay on the client. Valid: 1 <= cut_layer < server_end <= L-1."""
    arch = _architecture_of(model)
    total = _num_layers(model, arch)
    _check_int("cut_layer", cut_layer)
    _check_int("server_end", server_end)
    if total < 3:
        raise ValueError(
            f"a U-shaped split needs a model with at least 3 decoder layers (one per part); this one has {total}."
        )
    if not 1 <= cut_layer <= total - 2:
        raise ValueError(
            f"cut_layer must be in [1, {total - 2}] for a U-shaped split of a model with {total} decoder layers "
            f"(the server and the client tail each need at least one layer); got {cut_layer}."
        )
    if not cut_layer < server_end <= total - 1:
        raise ValueError(
            f"server_end must be in [{cut_layer + 1}, {total - 1}] for cut_layer={cut_layer} and {total} decoder "
            f"layers (the server and the client tail each need at least one layer); got {server_end}."
        )
    return (
        ClientSegment(model, cut_layer),
        ServerSegment(model, cut_layer, server_end),
        ClientTail(model, server_end),
    )


def graft_bottom(skeleton: nn.Module, bottom: nn.Module, cut_layer: int) -> nn.Module:
    """Moves `bottom`'s embeddings, rotary table and decoder layers [0, cut_layer) into `skeleton`,
    a causal LM of the same architecture with more layers (typically on the meta device), in place
    of its own; returns `skeleton`. models.load_bottom_layers builds a client's model this way."""
    arch = _architecture_of(skeleton)
    if _architecture_of(bottom) is not arch:
        raise ValueError(f"bottom is a {bottom.config.model_type} model and skeleton a "
                         f"{skeleton.config.model_type} model; graft within one architecture.")
    total, have = _num_layers(skeleton, arch), _num_layers(bottom, arch)
    _check_int("cut_layer", cut_layer)
    if not 1 <= cut_layer <= min(have, total - 1):
        raise ValueError(f"cut_layer must be in [1, {min(have, total - 1)}] (bottom has {have} decoder layers, "
                         f"skeleton {total}); got {cut_layer}.")
    source, target = getattr(bottom, arch.backbone), getattr(skeleton, arch.backbone)
    for name in arch.embeddings + ((arch.rotary,) if arch.rotary is not None else ()):
        setattr(target, name, getattr(source, name))
    layers = getattr(target, arch.layers)
    for i in range(cut_layer):
        layers[i] = getattr(source, arch.layers)[i]
    return skeleton
