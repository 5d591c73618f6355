"""The model types splitlora can split: {config.model_type: Architecture}.

The built-in families register themselves when `splitlora.architectures` is imported; a user adds
another (or replaces one) with `register_architecture`, before splitting:

    from splitlora.architectures import Architecture, register_architecture, check_split
    register_architecture("my_llama_variant", MyArchitecture())
    check_split(model, cut_layer=2)   # does the split compute what the whole model computes?
"""
from __future__ import annotations

from typing import Dict, Tuple

from .base import Architecture

__all__ = ["register_architecture", "get_architecture", "supported_model_types", "HOW_TO_ADD"]

HOW_TO_ADD = ("to split another model type, subclass splitlora.architectures.Architecture and register an "
              "instance with splitlora.architectures.register_architecture(model_type, architecture), "
              "then verify it with splitlora.architectures.check_split(model, cut_layer)")

# Insertion-ordered: supported_model_types() lists the built-ins first, in registration order.
_ARCHITECTURES: Dict[str, Architecture] = {}


def register_architecture(model_type: str, architecture: Architecture, *, overwrite: bool = False) -> Architecture:
    """Make models whose `config.model_type` is `model_type` splittable with `architecture` (an
    Architecture instance). Registering a type twice is an error unless `overwrite=True`.
    Returns `architecture`."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string (a config's model_type); got {model_type!r}.")
    if isinstance(architecture, type) and issubclass(architecture, Architecture):
        raise ValueError(f"architecture must be an Architecture instance; got the class {architecture.__name__} "
                         f"(register {architecture.__name__}() instead).")
    if not isinstance(architecture, Architecture):
        raise ValueError(f"architecture must be an instance of splitlora.architectures.Architecture; got "
                         f"{type(architecture).__name__}.")
    architecture.validate()
    if model_type in _ARCHITECTURES and not overwrite:
        raise ValueError(f"model type {model_type!r} is already registered (as {_ARCHITECTURES[model_type]!r}); "
                         "pass overwrite=True to replace it.")
    _ARCHITECTURES[model_type] = architecture
    return architecture


def get_architecture(model_type: str) -> Architecture:
    """The Architecture registered for `model_type`; ValueError when there is none."""
    try:
        return _ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        raise ValueError(f"no architecture is registered for model type {model_type!r}; supported model types: "
                         f"{', '.join(supported_model_types())}; {HOW_TO_ADD}.") from None


def supported_model_types() -> Tuple[str, ...]:
    """The registered model types, built-ins first."""
    return tuple(_ARCHITECTURES)
