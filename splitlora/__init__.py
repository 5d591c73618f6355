"""splitlora: split federated fine-tuning of causal LLMs with LoRA.

Names are resolved lazily, so `import splitlora` imports neither transformers nor triton; the
codec loads on first use of one of its names, the architecture registry (torch only) on first use
of `register_architecture`.
"""
import importlib

# The compiled extension splitlora._C links against torch's shared libraries, which only torch's
# own import puts in the process: importing torch here lets `import splitlora._C` work on its own.
import torch  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "splitlora.codec",
    "decompress": "splitlora.codec",
    "packet_info": "splitlora.codec",
    "packed_size": "splitlora.codec",
    "backend_for": "splitlora.codec",
    "ErrorFeedback": "splitlora.codec",
    "PacketInfo": "splitlora.codec",
    "register_architecture": "splitlora.architectures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
