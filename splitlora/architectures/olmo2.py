"""OLMo-2: a Llama-shaped stack with full attention in every layer; its q/k norms and its norms after
attention and MLP (instead of before) are inside each decoder layer."""
from __future__ import annotations

from .llama import LlamaArchitecture
from .registry import register_architecture


class Olmo2Architecture(LlamaArchitecture):
    pass


register_architecture("olmo2", Olmo2Architecture())
