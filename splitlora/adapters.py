"""Which modules get LoRA, at what rank and in what dtype, per side; adapter state dicts under
whole-model names.

Targets are module names matched as PEFT's list form does (a full name, or a suffix on a '.'
boundary), plus PEFT's `all-linear`: every nn.Linear / GPT-2 Conv1D except the output head
(`lm_head`), which can still be named next to it (`[all-linear, lm_head]`).
"""
from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from splitlora_kernels import apply_fused_lora
from splitlora_kernels.layers import _is_linear_like
from splitlora_kernels.layers import _name_matches as _matches  # the rule apply_fused_lora matches by
from splitlora_kernels.layers import lora_modules, lora_state_dict, load_lora_state_dict

# PEFT's spelling of "every linear layer but the output head".
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    # The adapters' dtype whatever the base model's (config lora.adapter_dtype): float32 on a
    # bfloat16/float16 base, as PEFT does, so their gradients and optimizer state are float32 too.
    dtype: Union[str, torch.dtype] = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _as_dtype(self.dtype)


def _as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"the adapter dtype must be a floating dtype (float32, bfloat16, float16); got {dtype!r}.")
    return dtype


def _head_names(module: nn.Module) -> set:
    """Names (in `module`) of the output head that all-linear leaves out: a segment's LM head,
    a causal LM's output embeddings, and anything called lm_head."""
    heads = set()
    arch = getattr(module, "_arch", None)
    if arch is not None:
        heads.add(arch.head)
    get_output = getattr(module, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, m in module.named_modules():
        if name and (m is output or name == "lm_head" or name.endswith(".lm_head")):
            heads.add(name)
    return heads


def linear_module_names(module: nn.Module) -> List[str]:
    """What `all-linear` names in `module`: its nn.Linear / Conv1D modules (already adapted ones
    included) except the output head, as full names."""
    from splitlora_kernels.layers import FusedLoRALinear

    heads = _head_names(module)
    return [name for name, m in module.named_modules()
            if name and name not in heads and (_is_linear_like(m) or isinstance(m, FusedLoRALinear))]


def resolve_targets(module: nn.Module, target_modules: Iterable[str]) -> List[str]:
    """`target_modules` with `all-linear` replaced by the full names of `module`'s linear layers
    (except the head); other entries unchanged, duplicates dropped."""
    out: List[str] = []
    for target in target_modules:
        for name in (linear_module_names(module) if target == ALL_LINEAR else [target]):
            if name not in out:
                out.append(name)
    return out


def add_lora(segment: nn.Module, target_modules: Iterable[str], spec: LoraSpec, *, seed: int = 0) -> nn.Module:
    """Puts fused LoRA adapters (in `spec.dtype`) on `segment`'s targeted linear layers and freezes
    the rest. `all-linear` targets every linear layer of the segment except the LM head.

    A segment that holds none of the targets (e.g. targets that only exist in the LM head's
    side) gets none, rather than an error: each side adapts what it has.

    Each adapter's initial A is drawn from a generator seeded by `seed` and the module's
    whole-model name (B starts at zero, as in PEFT), so a layer starts from the same adapter
    wherever the cut puts it: runs that split the model differently stay comparable.
    """
    targets = resolve_targets(segment, existing_targets([segment], target_modules))
    if targets:
        apply_fused_lora(segment, targets, r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                         use_rslora=spec.rslora, adapter_dtype=spec.torch_dtype)
        for name, module in lora_modules(segment).items():
            init_adapter(module, seed, segment.full_model_name(name))
    else:
        for p in segment.parameters():
            p.requires_grad_(False)
    return segment


@torch.no_grad()
def init_adapter(module: nn.Module, seed: int, name: str) -> None:
    """PEFT's default initialisation (A ~ kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(in)),
    B = 0) from a generator of its own."""
    init_lora_pair(module.lora_A, module.lora_B, seed, name)


@torch.no_grad()
def init_lora_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, seed: int, name: str) -> None:
    """`init_adapter` on a bare (A, B) pair (e.g. one adapter of a MultiLoRALinear)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(lora_a.shape[1])
    values = torch.rand(lora_a.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    lora_a.copy_(values)
    lora_b.zero_()


def existing_targets(segments: Iterable[nn.Module], target_modules: Iterable[str]) -> List[str]:
    """The targets that name a module in at least one of `segments` (PEFT's suffix matching;
    `all-linear` when some segment has a linear layer besides the head)."""
    segments = list(segments)
    names = [n for s in segments for n, _ in s.named_modules()]
    return [t for t in target_modules
            if (any(linear_module_names(s) for s in segments) if t == ALL_LINEAR
                else any(_matches(n, t) for n in names))]


def check_targets_exist(segments: Iterable[nn.Module], target_modules: Iterable[str], key: str) -> None:
    """Every target must name a module somewhere in the model (all segments together): a name
    that matches nothing is a typo. A target that lives only on the other side of the cut (e.g.
    lm_head when the client keeps the head in the U-shape) is simply not adapted on this side."""
    segments, target_modules = list(segments), list(target_modules)
    found = existing_targets(segments, target_modules)
    missing = [t for t in target_modules if t not in found]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for s in segments for n, m in s.named_modules()
                         if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"{key}: {missing} match no module of the model; its linear modules are named {linear}")


def adapter_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A snapshot (cloned) of the module's LoRA tensors."""
    return {k: v.clone() for k, v in lora_state_dict(module).items()}


def load_adapter_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    if not state and not lora_state_dict(module):
        return  # nothing held, nothing saved (e.g. a server whose adapters are per-client MultiLoRALinear)
    load_lora_state_dict(module, state)


def trainable_parameters(*modules: nn.Module) -> List[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def clone_sharing_frozen(module: nn.Module) -> nn.Module:
    """A deep copy whose frozen parameters (and buffers) are shared with `module`: N clients then
    cost N copies of their adapters, not N copies of the base weights."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def whole_model_names(segment: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames a segment's adapter state to the names of the whole (unsplit) model."""
    out = {}
    for key, value in state.items():
        module_name, _, leaf = key.rpartition(".")
        out[f"{segment.full_model_name(module_name)}.{leaf}"] = value
    return out


def lora_plan(segment: nn.Module) -> Dict[str, Tuple[int, float, float, bool]]:
    """{whole-model module name: (r, alpha, dropout, rslora)} of a segment's adapters."""
    return {
        segment.full_model_name(name): (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora)
        for name, m in lora_modules(segment).items()
    }


def whole_model_with_adapters(base_model: nn.Module, plans: Iterable[Mapping[str, tuple]],
                              state: Mapping[str, torch.Tensor], device=None,
                              prepare: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """A copy of the unsplit model with LoRA where the segments had it, loaded with `state`
    (whole-model names), on `device` (default: where `base_model` is): what export writes in
    PEFT format, what the final evaluation generates with, and what centralized LoRA trains.
    Each adapter is created in the dtype `state` holds it in (e.g. float32 on a bfloat16 base).

    On base_model's own device the copy shares its frozen weights (the trainer freezes it): the
    adapters are new, but a 7B model's weights are not held twice. On another device (the
    trainer keeps the base model in host memory, see trainer.build) each weight is copied
    straight to `device`, never to a second host copy; base_model is left where it was.
    `prepare` changes the copy's base layers before the adapters go on (the trainer's 4-bit base)."""
    # A concrete device ("cuda" becomes "cuda:<current>"), comparable with a parameter's.
    target = torch.empty(0, device=device).device if device is not None else None
    if target is None or all(p.device == target for p in base_model.parameters()):
        model = clone_sharing_frozen(base_model)
    else:
        memo = {id(p): nn.Parameter(p.detach().to(target), requires_grad=p.requires_grad)
                for p in base_model.parameters()}
        memo.update({id(b): b.to(target) for b in base_model.buffers()})
        model = copy.deepcopy(base_model, memo)
    if prepare is not None:
        prepare(model)
    groups: Dict[tuple, List[str]] = {}
    for plan in plans:
        for name, (r, alpha, dropout, rslora) in plan.items():
            # The adapters keep the dtype they have in `state` (lora.adapter_dtype: float32 on a
            # bfloat16 base), else the base weight's.
            held = state.get(f"{name}.lora_A") if state else None
            dtype = held.dtype if held is not None and held.is_floating_point() else None
            groups.setdefault((dropout, rslora, dtype), []).append((name, r, alpha))
    for (dropout, rslora, dtype), items in groups.items():
        apply_fused_lora(model, [n for n, _, _ in items], r={n: r for n, r, _ in items},
                         alpha={n: a for n, _, a in items}, dropout=dropout, use_rslora=rslora,
                         adapter_dtype=dtype)
    if state:
        load_lora_state_dict(model, state)
    return model
