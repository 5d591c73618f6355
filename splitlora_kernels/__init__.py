"""Fused LoRA linear kernels (Triton) and drop-in layers.

`lora_linear` runs the Triton kernels on CUDA tensors and the plain-torch reference on CPU tensors.
Names are resolved lazily so that importing the package does not import triton, transformers or peft.
"""
import importlib

_EXPORTS = {
    "lora_linear": "splitlora_kernels.ops.lora_linear",
    "FusedLoRALinear": "splitlora_kernels.layers",
    "apply_fused_lora": "splitlora_kernels.layers",
    "from_peft": "splitlora_kernels.peft_compat",
    "save_peft_adapter": "splitlora_kernels.peft_compat",
    "load_peft_adapter": "splitlora_kernels.peft_compat",
    "patch_peft": "splitlora_kernels.patch",
    "unpatch": "splitlora_kernels.patch",
    "PatchReport": "splitlora_kernels.patch",
    "multi_lora_linear": "splitlora_kernels.ops.multi_lora",
    "offsets_from_sizes": "splitlora_kernels.ops.multi_lora",
    "MultiLoRALinear": "splitlora_kernels.multi_layer",
    "adapter_groups": "splitlora_kernels.multi_layer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitlora_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
