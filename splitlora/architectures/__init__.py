"""Model families splitlora can split, behind a public registry, and a check that a split is exact.

    from splitlora.architectures import Architecture, register_architecture, check_split

Built in: gpt2, llama, qwen2, mistral, qwen3, gemma2, gemma3_text, phi3, olmo2 (one module each,
in the style of PEFT's one folder per method). `register_architecture` adds another model type (or
replaces one with overwrite=True); `check_split(model, cut_layer)` runs a few tokens through the
whole model and through its split and names the first decoder layer where they part.

Importing this package imports torch, not transformers.
"""
from .base import Architecture
from .registry import get_architecture, register_architecture, supported_model_types

# The built-in families register themselves, in this order (supported_model_types lists them so).
from . import gpt2, llama, qwen3, gemma2, gemma3, phi3, olmo2  # noqa: E402,F401  isort: skip
from .check import check_split  # noqa: E402

__all__ = ["Architecture", "register_architecture", "get_architecture", "supported_model_types", "check_split"]
