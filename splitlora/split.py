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

Which families can be split, and how each one's forward runs between its modules (embedding
scaling, per-layer masks and rotary tables, logit soft-capping), is the registry of
`splitlora.architectures`: add a family with `splitlora.architectures.register_architecture` and
verify any split with `splitlora.architectures.check_split`.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .architectures import Architecture, get_architecture, supported_model_types
from .architectures.registry import HOW_TO_ADD

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ClientSegment",
    "ServerSegment",
    "ClientTail",
    "split_model",
    "split_model_u_shape",
    "graft_bottom",
]


def __getattr__(name):
    # SUPPORTED_MODEL_TYPES reflects the registry as it is when read (a type registered later shows).
    if name == "SUPPORTED_MODEL_TYPES":
        return supported_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _architecture_of(model) -> Architecture:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a transformers causal LM (an nn.Module); got {type(model).__name__}.")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = supported_model_types()
    if model_type not in supported:
        raise ValueError(
            f"cannot split a model of type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported)}; {HOW_TO_ADD}."
        )
    arch = get_architecture(model_type)
    if not hasattr(model, arch.backbone) or not hasattr(model, arch.head):
        raise ValueError(
            f"model is a {type(model).__name__}, which has no LM head ({arch.backbone!r} and {arch.head!r}); "
            f"pass the causal LM class (AutoModelForCausalLM), not the bare {model_type} backbone."
        )
    return arch


def _num_layers(model, arch: Architecture) -> int:
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
        arch: Architecture,
        layer_range: Tuple[int, int],
        embeddings: bool,
        head: bool,
        share_weights: bool = False,
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
        wanted["rotary"] = {name: getattr(backbone, name) for name in arch.rotary_modules}
        # One deepcopy for everything: the copied layers then share ONE config object, the segment's
        # (so e.g. switching `segment.config._attn_implementation` reaches every attention module),
        # while nothing is shared with the source model. A tied head gets its own weight here, since
        # the embedding it was tied to is not part of this copy (or is copied by another segment).
        # share_weights keeps the model's own parameters and buffers (new modules, same tensors): a
        # read-only view for check_split, which must not hold a second copy of a large model.
        memo = {}
        if share_weights:
            memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        copied = copy.deepcopy(wanted, memo)

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
        for name, module in copied["rotary"].items():
            self.add_module(name, module)
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
        kinds = {index: arch.layer_kind(self.config, int(index)) for index in self.decoder_layers}
        # One mask and one rotary table per attention kind, built from this segment's inputs only.
        masks: Dict[str, object] = {}
        for kind in dict.fromkeys(kinds.values()):  # a mask may legitimately be None (sdpa's is_causal path)
            masks[kind] = arch.make_mask(self.config, kind, hidden, attention_mask, position_ids)
        position_embeddings = arch.position_embeddings(self, hidden, position_ids, list(masks))
        for index, layer in self.decoder_layers.items():
            kind = kinds[index]
            hidden = arch.run_layer(layer, hidden, masks[kind], position_ids, position_embeddings[kind])
        return hidden

    def _head(self, hidden) -> torch.Tensor:
        hidden = getattr(self, self._arch.final_norm)(hidden)
        return self._arch.head_logits(self, hidden)


class ClientSegment(_Segment):
    """Embeddings and decoder layers [0, cut_layer): `forward(input_ids, attention_mask, position_ids)`
    returns the hidden states at the cut, [B, T, H]."""

    def __init__(self, model: nn.Module, cut_layer: int, *, share_weights: bool = False) -> None:
        arch = _architecture_of(model)
        super().__init__(model, arch, (0, cut_layer), embeddings=True, head=False, share_weights=share_weights)

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
    def __init__(self, model: nn.Module, start: int, end: int, head: bool, share_weights: bool = False) -> None:
        arch = _architecture_of(model)
        super().__init__(model, arch, (start, end), embeddings=False, head=head, share_weights=share_weights)

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

    def __init__(self, model: nn.Module, cut_layer: int, end: Optional[int] = None, *,
                 share_weights: bool = False) -> None:
        arch = _architecture_of(model)
        total = _num_layers(model, arch)
        end = total if end is None else end
        super().__init__(model, cut_layer, end, head=end == total, share_weights=share_weights)

    @property
    def returns_logits(self) -> bool:
        return self._has_head


class ClientTail(_UpperSegment):
    """The top of a U-shaped split, kept on the client so labels never leave it: decoder layers
    [server_end, L), final norm and LM head; `forward(hidden, ...)` returns logits [B, T, V]."""

    def __init__(self, model: nn.Module, server_end: int, *, share_weights: bool = False) -> None:
        arch = _architecture_of(model)
        super().__init__(model, server_end, _num_layers(model, arch), head=True, share_weights=share_weights)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def split_model(model: nn.Module, cut_layer: int) -> Tuple[ClientSegment, ServerSegment]:
    """Split `model` after decoder layer cut_layer-1: the client gets the embeddings and layers
    [0, cut_layer), the server layers [cut_layer, L), the final norm and the LM head.

    Valid cuts leave each side at least one decoder layer: 1 <= cut_layer <= L-1. The model is not
    modified; both segments hold deep copies."""
    _check_cuts(model, cut_layer)
    return ClientSegment(model, cut_layer), ServerSegment(model, cut_layer)


def _check_cuts(model: nn.Module, cut_layer: int, server_end: Optional[int] = None) -> None:
    """ValueError unless `cut_layer` (and, for a U-shaped split, `server_end`) is a valid split of
    `model`, a model of a registered architecture."""
    arch = _architecture_of(model)
    total = _num_layers(model, arch)
    _check_int("cut_layer", cut_layer)
    if server_end is None:
        if not 1 <= cut_layer <= total - 1:
            raise ValueError(
                f"cut_layer must be in [1, {total - 1}] for a model with {total} decoder layers "
                f"(each side needs at least one layer); got {cut_layer}."
            )
        return
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


def split_model_u_shape(
    model: nn.Module, cut_layer: int, server_end: int
) -> Tuple[ClientSegment, ServerSegment, ClientTail]:
    """U-shaped split: client bottom (embeddings, layers [0, cut_layer)), server middle (layers
    [cut_layer, server_end)) and client tail (layers [server_end, L), final norm, LM head), so labels
    stay on the client. Valid: 1 <= cut_layer < server_end <= L-1."""
    if server_end is None:  # None would mean a plain split to _check_cuts
        _check_int("server_end", server_end)
    _check_cuts(model, cut_layer, server_end)
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
    arch.graft(skeleton, bottom, cut_layer)
    return skeleton
