"""Patch a PEFT LoRA model in place so that its LoRA linear layers compute through the fused op.

    report = patch_peft(peft_model)     # the PeftModel stays a PeftModel
    ...                                 # train, save_pretrained, merge_and_unload, set_adapter, ...
    unpatch(peft_model)                 # back to PEFT's own forward

In the style of Liger-Kernel's ``apply_liger_kernel_to_*``: nothing is replaced but the ``forward`` of
each ``peft.tuners.lora.layer.Linear`` (and QLoRA's ``peft.tuners.lora.bnb.Linear4bit``) instance (a per-instance bound method; ``unpatch`` deletes it,
so the class's ``forward`` is found again). The patched forward reads PEFT's own parameters and
settings on every call (``lora_A[adapter].weight``, ``lora_B[adapter].weight``, ``scaling[adapter]``,
``lora_dropout[adapter].p``, the base layer's ``weight``/``bias``), so PEFT's parameters, names,
optimizer references, ``save_pretrained``, ``merge_and_unload``, ``disable_adapter()`` and
``set_adapter`` keep working unchanged.

What the fused op cannot represent stays on PEFT's path:

* at patch time (the layer is not patched; the report gives the reason): LoRA layers other than
  ``lora.Linear`` / ``lora.bnb.Linear4bit`` (embeddings, convolutions, MultiheadAttention, 8-bit or
  other quantized or tensor-parallel linears), base layers other than a plain ``nn.Linear`` /
  transformers ``Conv1D`` (or a bitsandbytes ``Linear4bit`` under ``lora.bnb.Linear4bit``), and layers
  none of whose adapters is plain LoRA (DoRA and the other LoRA variants, ``lora_bias=True``);
* at call time (checked on every forward, because this state changes after patching): adapters
  disabled, a merged layer, ``adapter_names=`` (mixed batches), several or no active adapters, an
  active adapter that is a variant / has a LoRA bias / a dropout other than ``nn.Dropout`` or
  ``nn.Identity``, forward hooks on the base layer (e.g. accelerate's offloading), extra
  positional or keyword arguments, and inputs the op would refuse (dtype or device mismatch
  without autocast). Those calls run PEFT's original forward.

4-bit bases (QLoRA): the base weight is dequantized on the fly (``bitsandbytes.functional.
dequantize_4bit`` into the layer's compute dtype, under no_grad: a temporary, never stored) and the
op runs on it. An input whose dtype differs from the compute dtype, and any call under autocast,
takes PEFT's path (bitsandbytes casts the input to its compute dtype and the result back, which
the single-dtype op does not reproduce).

Dropout: in training mode the fused path applies dropout with PEFT's probability
(``lora_dropout[adapter].p``, only while that dropout module is in training mode) but draws its
own mask (torch.bernoulli on CPU, the kernels' seeded counter-based RNG on CUDA, the seed taken
from torch's default generator), so the mask differs from the one PEFT's ``nn.Dropout`` would draw
from the same RNG state; both are dropout with the same p and the same 1/(1-p) rescaling.
"""
from __future__ import annotations

import logging
import numbers
import sys
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .layers import (_is_conv1d, _is_linear4bit, adapters_in, autocast_operands, dequantize_4bit_weight,
                     linear4bit_compute_dtype)
from .ops.lora_linear import lora_linear

__all__ = ["patch_peft", "unpatch", "PatchReport", "is_patched"]

logger = logging.getLogger(__name__)


@dataclass
class PatchReport:
    """What `patch_peft` did: `patched` are the LoRA layers whose forward now runs the fused op (in
    `named_modules` order); `skipped` maps every other LoRA layer to the reason it stays on PEFT's
    path. Layers patched by an earlier call are listed in `patched` too."""

    patched: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"splitlora patch_peft: {len(self.patched)} LoRA layers fused, {len(self.skipped)} left on PEFT's path"
        if self.skipped:
            reasons: Dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            line += " (" + "; ".join(f"{n} x {r}" for r, n in reasons.items()) + ")"
        return line

    def __str__(self) -> str:
        return self.summary()


def _import_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as err:  # pragma: no cover - peft is installed in the test environment
        raise ImportError("patch_peft needs the `peft` package: pip install 'splitlora[peft]'.") from err
    return lora_layer


def is_patched(module: nn.Module) -> bool:
    """True when `module`'s forward is the fused forward installed by `patch_peft`."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is _fused_forward


def _plain_base(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return (
        (type(base) is nn.Linear or _is_conv1d(base))
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.dim() == 2
        and weight.dtype.is_floating_point
    )


def _adapter_reason(layer, adapter: str) -> Optional[str]:
    """Why `adapter` of `layer` cannot run fused (None if it can). Checked at patch time for every
    adapter and at call time for the active one."""
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        if getattr(layer, "use_dora", {}).get(adapter, False):
            return f"DoRA (use_dora=True) in adapter {adapter!r}"
        return f"LoRA variant {variant} in adapter {adapter!r}"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return f"lora_bias=True in adapter {adapter!r}"
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return f"adapter {adapter!r} has non-standard lora_A/lora_B modules"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"adapter {adapter!r} uses dropout module {type(dropout).__name__}"
    scaling = layer.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return f"adapter {adapter!r} has a non-scalar scaling ({type(scaling).__name__})"
    return None


def _lora_linear4bit_class():
    """PEFT's QLoRA layer `peft.tuners.lora.bnb.Linear4bit`, or None (bitsandbytes not installed)."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # pragma: no cover - depends on the installed peft
        return None
    return getattr(lora_bnb, "Linear4bit", None)


def _is_4bit_lora(layer) -> bool:
    cls = _lora_linear4bit_class() if "bitsandbytes" in sys.modules else None
    return cls is not None and type(layer) is cls


def _quantized_4bit(base: nn.Module) -> bool:
    # A bitsandbytes Linear4bit base that has been quantized (PEFT wraps it in lora.bnb.Linear4bit on
    # a model loaded in 4-bit, in a plain lora.Linear otherwise: both compute base(x) + LoRA).
    return _is_linear4bit(base) and getattr(base.weight, "quant_state", None) is not None


def _static_reason(layer, lora_layer) -> Optional[str]:
    """Why `layer` is not patched at all (None if it is patched)."""
    if _is_4bit_lora(layer):
        base = layer.base_layer
        if not _quantized_4bit(base):
            return (f"Linear4bit LoRA layer over {type(base).__name__} "
                    "(only a quantized bitsandbytes Linear4bit base is fused)")
    elif type(layer) is not lora_layer.Linear:
        kind = type(layer).__name__
        base = getattr(layer, "base_layer", None)
        base_kind = type(base).__name__ if base is not None else "?"
        return (f"{kind} LoRA layer over {base_kind} (only lora.Linear over nn.Linear/Conv1D and "
                "lora.bnb.Linear4bit over a bitsandbytes Linear4bit are fused)")
    elif not (_plain_base(layer.base_layer) or _quantized_4bit(layer.base_layer)):
        base = layer.base_layer
        return (f"base layer is {type(base).__name__} with weight {type(getattr(base, 'weight', None)).__name__} "
                f"(only a plain nn.Linear/Conv1D base is fused)")
    adapters = list(layer.lora_A.keys())
    if not adapters:
        return "no LoRA adapters"
    reasons = [_adapter_reason(layer, a) for a in adapters]
    if all(r is not None for r in reasons):
        return "; ".join(reasons)
    return None


def _fallback(self, x, args, kwargs):
    # type(self).forward: the class's (PEFT's) forward, whatever is installed on the instance.
    return type(self).forward(self, x, *args, **kwargs)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT lora.Linear forward through `lora_linear` when the layer's current state allows it,
    PEFT's own forward otherwise (see the module docstring for the cases)."""
    if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
        return _fallback(self, x, args, kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or _adapter_reason(self, active[0]) is not None:
        return _fallback(self, x, args, kwargs)
    base = self.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__ or not isinstance(x, torch.Tensor):
        return _fallback(self, x, args, kwargs)
    adapter = active[0]
    inp_dtype = None
    if _is_linear4bit(base):
        if getattr(base.weight, "quant_state", None) is None:
            return _fallback(self, x, args, kwargs)
        compute_dtype = linear4bit_compute_dtype(base, x)
        # Under autocast bitsandbytes computes the base in its compute dtype and returns the input's
        # dtype, which the op (one dtype for base and LoRA) does not reproduce: PEFT's path.
        if x.dtype != compute_dtype or torch.is_autocast_enabled(x.device.type):
            return _fallback(self, x, args, kwargs)
        weight = dequantize_4bit_weight(base.weight, compute_dtype)  # no_grad temporary, never stored
    elif type(base) is nn.Linear:
        weight = base.weight
    elif _is_conv1d(base):
        weight = base.weight.t()  # Conv1D keeps [in, out]; the op takes any strides
    else:  # the base layer was replaced after patching
        return _fallback(self, x, args, kwargs)
    lora_a = self.lora_A[adapter].weight
    lora_b = self.lora_B[adapter].weight
    # Under autocast, the cast autocast applies to PEFT's base_layer(x), applied by hand.
    autocast, x, weight, bias = autocast_operands(x, weight, base.bias)
    compute_dtype = weight.dtype
    if not autocast:
        if x.dtype != compute_dtype or (lora_a.dtype != compute_dtype and not getattr(self, "cast_input_dtype_enabled", True)):
            return _fallback(self, x, args, kwargs)  # PEFT decides (and raises) as it would unpatched
    if x.device != weight.device or lora_a.device != weight.device or lora_b.device != weight.device:
        return _fallback(self, x, args, kwargs)
    lora_a, lora_b = adapters_in(compute_dtype, lora_a, lora_b)  # PEFT's float32 adapters on a 16-bit base
    dropout = self.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    return lora_linear(
        x,
        weight,
        lora_a,
        lora_b,
        float(self.scaling[adapter]),
        bias=bias,
        dropout_p=p,
        training=bool(dropout.training) and p > 0.0,
    )


def _lora_layers(model: nn.Module):
    lora_layer = _import_lora()
    return lora_layer, [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]


def patch_peft(model: nn.Module, verbose: bool = True) -> PatchReport:
    """Make the LoRA linear layers of `model` (a `peft.PeftModel`, a `LoraModel`, or a transformers
    model with adapters injected) compute through the fused `lora_linear` op, in place; the model
    keeps its type, parameters and every PEFT method. Idempotent. Returns a `PatchReport` (patched
    names, and {name: reason} for the LoRA layers left on PEFT's path) and logs its one-line
    summary at INFO (`verbose=False`: DEBUG). Undo with `unpatch(model)`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft expects a torch.nn.Module (e.g. a peft.PeftModel); got {type(model).__name__}.")
    lora_layer, layers = _lora_layers(model)
    report = PatchReport()
    for name, layer in layers:
        if is_patched(layer):
            report.patched.append(name)
            continue
        reason = _static_reason(layer, lora_layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if "forward" in layer.__dict__:
            report.skipped[name] = "its forward is already replaced on the instance (by another patch or hook)"
            continue
        layer.forward = types.MethodType(_fused_forward, layer)
        report.patched.append(name)
    if not layers:
        logger.warning("splitlora patch_peft: %s has no PEFT LoRA layers; nothing patched.", type(model).__name__)
    else:
        logger.log(logging.INFO if verbose else logging.DEBUG, "%s", report.summary())
    return report


def unpatch(model: nn.Module) -> List[str]:
    """Undo `patch_peft`: every patched LoRA layer gets PEFT's own forward back (the instance
    attribute is deleted, so `layer.forward` is the class's method again). Returns the names."""
    restored = []
    for name, module in model.named_modules():
        if is_patched(module):
            del module.__dict__["forward"]
            restored.append(name)
    return restored
