"""Drop-in LoRA layers backed by the fused `lora_linear` op, and helpers to swap them into a model.

`FusedLoRALinear` stays thin: it owns parameters and bookkeeping (rank, alpha, merge state) and hands
the arithmetic to `splitlora_kernels.lora_linear` (Triton on CUDA, the plain-torch reference on CPU).

Naming follows the model, not PEFT: the frozen base weight and bias stay at `<module>.weight` and
`<module>.bias`, exactly where the replaced nn.Linear / Conv1D kept them, so a base checkpoint still
loads into a wrapped model and weight tying survives the swap; the adapters sit beside them at
`<module>.lora_A` ([r, in]) and `<module>.lora_B` ([out, r]). `splitlora_kernels.peft_compat`
translates to and from PEFT's `base_model.model.<module>.lora_A.weight` names.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Dict, Iterable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from .ops.lora_linear import lora_linear

__all__ = [
    "FusedLoRALinear",
    "apply_fused_lora",
    "lora_modules",
    "lora_state_dict",
    "load_lora_state_dict",
    "merge_lora",
    "unmerge_lora",
]

RankSpec = Union[int, Mapping[str, int]]
AlphaSpec = Union[float, Mapping[str, float]]


def _conv1d_class():
    """transformers' GPT-2 Conv1D, or None when transformers is not installed (importing it is slow,
    and this module must stay usable without it)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the package
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _linear4bit_class():
    """bitsandbytes' Linear4bit (NF4/FP4; LinearNF4/LinearFP4 subclass it), or None when bitsandbytes
    has not been imported: a model holding such a layer has imported it, so this never imports it."""
    bnb = sys.modules.get("bitsandbytes")
    bnb_nn = getattr(bnb, "nn", None) if bnb is not None else None
    return getattr(bnb_nn, "Linear4bit", None)


def _is_linear4bit(module: nn.Module) -> bool:
    cls = _linear4bit_class()
    return cls is not None and isinstance(module, cls)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@torch.no_grad()
def dequantize_4bit_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes 4-bit `Params4bit`, dequantized into `dtype` (a temporary:
    nothing is stored, no gradient reaches the quantized weight).

    bitsandbytes repacks a CPU Linear4bit's weight into an AVX512-BF16 inference layout the first
    time it runs in eval mode without grad; that layout is first turned back into the standard one
    with bitsandbytes' own inverse (as bitsandbytes does before saving or moving the weight)."""
    import bitsandbytes.functional as bnb_f

    if getattr(weight, "quant_state", None) is None:
        raise ValueError("the 4-bit base weight is not quantized yet (its quant_state is None); move the "
                         "bitsandbytes Linear4bit to its device (e.g. .to('cuda') or .to('cpu')) first.")
    _unpack_cpu_layout(weight)
    return bnb_f.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


@torch.no_grad()
def _unpack_cpu_layout(weight: torch.Tensor) -> None:
    """Undo bitsandbytes' CPU AVX512-BF16 repacking of a Params4bit in place (a no-op otherwise)."""
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_f

        weight.data, weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(weight.data, quant_state)


def linear4bit_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes Linear4bit computes in for input x (its compute_dtype, else x's)."""
    return getattr(base, "compute_dtype", None) or x.dtype


def _check_hyperparameters(r, lora_alpha, lora_dropout) -> None:
    # bool is an int subclass; r=True would silently mean rank 1.
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be an integer >= 1; got {r!r}.")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0; got {lora_alpha!r}.")
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, numbers.Real)
        or not 0.0 <= lora_dropout < 1.0
    ):
        raise ValueError(f"lora_dropout must be a probability in [0, 1); got {lora_dropout!r}.")


def _check_adapter_dtype(adapter_dtype):
    """None (the base weight's dtype) or a floating torch.dtype; a dtype name is accepted."""
    if adapter_dtype is None:
        return None
    if isinstance(adapter_dtype, str) and isinstance(getattr(torch, adapter_dtype, None), torch.dtype):
        adapter_dtype = getattr(torch, adapter_dtype)
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise ValueError(f"adapter_dtype must be None or a floating torch.dtype (e.g. torch.float32); "
                         f"got {adapter_dtype!r}.")
    return adapter_dtype


def freeze_base(weight: torch.Tensor, bias, fan_in_fan_out: bool):
    """Checks a base layer's weight ([out, in], or [in, out] with fan_in_fan_out) and bias ([out]
    or None), freezes them and returns (in_features, out_features)."""
    if weight.dim() != 2:
        raise ValueError(f"the base weight must be 2-D; got shape {tuple(weight.shape)}.")
    if not weight.dtype.is_floating_point:
        # e.g. a bitsandbytes Params4bit ([n, 1] packed codes), which would pass the 2-D check.
        raise ValueError(f"the base weight must be a floating-point tensor; got {type(weight).__name__} of dtype "
                         f"{weight.dtype} (a bitsandbytes 4-bit base is wrapped by FusedLoRALinear.from_linear).")
    in_features, out_features = weight.shape if fan_in_fan_out else reversed(weight.shape)
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"the base bias must have shape ({out_features},) to match the weight; got {tuple(bias.shape)}.")
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    return in_features, out_features


def autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias):
    """(autocast_on, x, weight, bias): under autocast, the three in autocast's dtype. The fused op
    is a custom autograd.Function that autocast does not see into, so the cast autocast would
    apply to a linear layer is applied here (FusedLoRALinear and patch_peft's forward share it)."""
    if not torch.is_autocast_enabled(x.device.type):
        return False, x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return True, x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def adapters_in(dtype: torch.dtype, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """A and B in the compute dtype. Adapters may be kept in higher precision than the base (float32
    on a bf16 model, as PEFT keeps them); the differentiable cast sends their gradients back in
    their own dtype."""
    return (lora_a if lora_a.dtype == dtype else lora_a.to(dtype),
            lora_b if lora_b.dtype == dtype else lora_b.to(dtype))


class FusedLoRALinear(nn.Module):
    """A linear layer with a frozen base weight and a trainable low-rank update:

        y = x @ W.T + b + scaling * (dropout(x) @ lora_A.T) @ lora_B.T,
        scaling = lora_alpha / r            (or lora_alpha / sqrt(r) with use_rslora=True)

    `weight` is stored as [out, in] like nn.Linear, or as [in, out] when `fan_in_fan_out=True`
    (GPT-2's Conv1D layout, PEFT's flag of the same name); the op then receives the transposed view.
    `lora_A` is [r, in] and `lora_B` is [out, r] in either layout, as in PEFT.

    Built fresh, the adapters are initialised like PEFT's default (A kaiming-uniform with
    a=sqrt(5), B zeros), so the layer computes exactly its base linear map until B is trained.
    Prefer `FusedLoRALinear.from_linear(existing_layer, r, alpha)` to wrap a pretrained layer.

    `adapter_dtype` (default: the base weight's dtype) keeps lora_A/lora_B in another precision,
    e.g. float32 adapters on a bfloat16 base as PEFT does: forward casts them to the compute dtype
    (differentiably, so their gradients and optimizer state stay in adapter_dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        fan_in_fan_out: bool = False,
        device=None,
        dtype=None,
        adapter_dtype=None,
    ) -> None:
        super().__init__()
        # Initialise the base like nn.Linear would, so a FusedLoRALinear built from scratch is usable.
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        weight = base.weight
        if fan_in_fan_out:
            weight = nn.Parameter(base.weight.detach().t().contiguous())
        self._setup(weight, base.bias, fan_in_fan_out, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    # Shared by __init__ and from_linear: from_linear must adopt the existing Parameter objects
    # rather than allocate (and randomly initialise) a second full-size weight.
    def _setup(self, weight, bias, fan_in_fan_out, r, lora_alpha, lora_dropout, use_rslora,
               adapter_dtype=None, base_4bit=None) -> None:
        _check_hyperparameters(r, lora_alpha, lora_dropout)
        adapter_dtype = _check_adapter_dtype(adapter_dtype)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        # base_4bit: the bitsandbytes Linear4bit whose quantized weight (a Params4bit, kept as is:
        # no dense copy is stored) and bias this layer adopts. Not registered as a submodule, so
        # the names stay <module>.weight / <module>.bias; `_compute_dtype_4bit` is its compute dtype.
        self.is_4bit = base_4bit is not None
        if self.is_4bit:
            self.out_features, self.in_features = (int(n) for n in weight.quant_state.shape)
            if bias is not None and tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"the base bias must have shape ({self.out_features},); got {tuple(bias.shape)}.")
            weight.requires_grad_(False)
            if bias is not None:
                bias.requires_grad_(False)
            self._compute_dtype_4bit = getattr(base_4bit, "compute_dtype", None)
            dense_dtype = self._compute_dtype_4bit or weight.quant_state.dtype
        else:
            self.in_features, self.out_features = freeze_base(weight, bias, self.fan_in_fan_out)
            dense_dtype = weight.dtype
        self.weight = weight
        self.bias = bias
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        factory = dict(device=weight.device, dtype=adapter_dtype or dense_dtype)
        r = int(r)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        # The (A, B, scaling) that merge() folded in; unmerge() subtracts exactly that, so an
        # optimizer step taken while merged cannot leave a residue in the base weight.
        self._merged_with = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype=None,
    ) -> "FusedLoRALinear":
        """Wrap an `nn.Linear` or a transformers GPT-2 `Conv1D`, reusing its weight and bias
        Parameters (same objects, same storage: no copy, state-dict names and tying preserved).
        The base parameters are frozen; new adapters are created on the weight's device, in
        `adapter_dtype` (default: the weight's dtype).

        A bitsandbytes `Linear4bit` (NF4/FP4, as in QLoRA) is wrapped too: its quantized weight is
        kept as is (no dense copy is stored), forward dequantizes it on the fly into the layer's
        compute dtype (no gradient reaches it), and the default adapter dtype is that compute dtype
        (the dtype the weight was quantized from when none is set). merge() is refused on it."""
        if isinstance(linear, FusedLoRALinear):
            raise ValueError("linear is already a FusedLoRALinear; wrap the original nn.Linear or Conv1D instead.")
        base_4bit = None
        if _is_linear4bit(linear):
            fan_in_fan_out = False
            base_4bit = linear
            if getattr(linear.weight, "quant_state", None) is None:
                raise ValueError("the bitsandbytes Linear4bit is not quantized yet (weight.quant_state is None); "
                                 "move it to its device first (bitsandbytes quantizes on .to()).")
        elif isinstance(linear, nn.Linear):
            if not linear.weight.dtype.is_floating_point:
                raise ValueError(
                    f"linear is a {type(linear).__name__} with a {linear.weight.dtype} weight; only a floating-point "
                    "nn.Linear / Conv1D or a bitsandbytes 4-bit Linear4bit base can be wrapped."
                )
            fan_in_fan_out = False
        elif _is_conv1d(linear):
            fan_in_fan_out = True
        else:
            raise ValueError(
                f"linear must be a torch.nn.Linear or a transformers Conv1D; got {type(linear).__name__}."
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, fan_in_fan_out, r, alpha, dropout, use_rslora, adapter_dtype,
                     base_4bit=base_4bit)
        layer.train(linear.training)
        return layer

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        # Derived rather than stored so r, alpha and scaling can never disagree (and an adapter
        # file, which records r and alpha only, always reproduces the scaling in use).
        if self.use_rslora:
            return self.lora_alpha / math.sqrt(self.r)
        return self.lora_alpha / self.r

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: the update B @ A starts at exactly zero."""
        if self.merged:
            raise ValueError("cannot reset the adapters of a merged layer; call unmerge() first.")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _dense_dtype(self, x=None) -> torch.dtype:
        """4-bit base: the dtype its weight is dequantized into (the compute dtype, else x's dtype,
        else the dtype it was quantized from)."""
        if self._compute_dtype_4bit is not None:
            return self._compute_dtype_4bit
        return x.dtype if x is not None else self.weight.quant_state.dtype

    def _base_weight(self, x=None) -> torch.Tensor:
        if self.is_4bit:
            return dequantize_4bit_weight(self.weight, self._dense_dtype(x))
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the layout of `weight` and in its dtype, computed in float32 at least
        (bf16/fp16 matmuls on CPU are slow and a half-precision product would lose the small update)."""
        return self._delta(self.lora_A, self.lora_B, self.scaling)

    def _delta(self, lora_a, lora_b, scaling) -> torch.Tensor:
        dense = self._dense_dtype() if self.is_4bit else self.weight.dtype
        acc = dict(device=self.weight.device, dtype=torch.promote_types(dense, torch.float32))
        # .to(device): the copies kept by merge() are plain attributes that module.to() does not move.
        delta = (lora_b.detach().to(**acc) @ lora_a.detach().to(**acc)) * scaling
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling * B @ A into the base weight; forward then runs the base linear only."""
        if self.merged:
            raise ValueError("this FusedLoRALinear is already merged; merging twice would add the update twice.")
        if self.is_4bit:
            raise ValueError(
                "cannot merge into a 4-bit (bitsandbytes) base weight: requantizing W + B @ A loses precision. "
                "Dequantize the base first (e.g. a dense nn.Linear with weight "
                "bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)) and merge there, "
                "or keep the adapters unmerged."
            )
        lora_a, lora_b, scaling = self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scaling
        merged = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)) + self._delta(
            lora_a, lora_b, scaling
        )
        self.weight.copy_(merged)
        self._merged_with = (lora_a, lora_b, scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update that merge() added (the adapter values at merge time)."""
        if not self.merged:
            raise ValueError("this FusedLoRALinear is not merged; there is nothing to unmerge.")
        lora_a, lora_b, scaling = self._merged_with
        restored = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)) - self._delta(
            lora_a, lora_b, scaling
        )
        self.weight.copy_(restored)
        self._merged_with = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_4bit:
            return self._forward_4bit(x)
        weight = self._base_weight()
        autocast, x, weight, bias = autocast_operands(x, weight, self.bias)
        compute_dtype = weight.dtype
        if not autocast:
            if x.dtype != compute_dtype:
                raise ValueError(
                    f"FusedLoRALinear received an input of dtype {x.dtype} but its base weight is {compute_dtype}; "
                    f"cast the input or the module (module.to({x.dtype})), or run under torch.autocast."
                )
        if self.merged:
            return F.linear(x, weight, bias)
        lora_a, lora_b = adapters_in(compute_dtype, self.lora_A, self.lora_B)
        return lora_linear(
            x,
            weight,
            lora_a,
            lora_b,
            self.scaling,
            bias=bias,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        # As bitsandbytes' Linear4bit: the input is cast to the compute dtype and the result back to
        # the input's dtype. Under autocast everything runs in autocast's dtype instead (as a dense
        # FusedLoRALinear does; bitsandbytes itself would keep its compute dtype for the base). The weight is dequantized under no_grad (a temporary, no gradient); the
        # gradient reaches x through the op's product with it, and the adapters as usual.
        inp_dtype = x.dtype
        weight = self._base_weight(x)
        autocast, x, weight, bias = autocast_operands(x, weight, self.bias)
        compute_dtype = weight.dtype
        if not autocast:
            x = x.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
        lora_a, lora_b = adapters_in(compute_dtype, self.lora_A, self.lora_B)
        out = lora_linear(x, weight, lora_a, lora_b, self.scaling, bias=bias, dropout_p=self.lora_dropout,
                          training=self.training)
        return out if autocast else out.to(inp_dtype)

    # A 4-bit base is saved like bitsandbytes' Linear4bit saves it: the packed codes at `weight` and
    # the components of its quant_state at `weight.<component>` (absmax, quant_map, ...), so the
    # base keys of a wrapped model are those of the quantized model; loading reads them back.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.is_4bit:
            _unpack_cpu_layout(self.weight)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_4bit and getattr(self.weight, "quant_state", None) is not None:
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.is_4bit:
            _unpack_cpu_layout(self.weight)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.is_4bit:
            return
        qprefix = prefix + "weight."
        qkeys = [k for k in state_dict if k.startswith(qprefix)]
        if qkeys and prefix + "weight" in state_dict:
            from bitsandbytes.functional import QuantState

            self.weight.quant_state = QuantState.from_dict(
                {k[len(qprefix):]: state_dict[k] for k in qkeys}, device=self.weight.device
            )
            unexpected_keys[:] = [k for k in unexpected_keys if k not in qkeys]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
            f"use_rslora={self.use_rslora}, bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"merged={self.merged}" + (", base=bitsandbytes 4-bit" if self.is_4bit else "")
        )


# --------------------------------------------------------------------------------------------
# Model-level helpers
# --------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> Dict[str, FusedLoRALinear]:
    """{qualified module name: FusedLoRALinear} in `model.named_modules()` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors, named as in `model.state_dict()` (`<module>.lora_A`, `<module>.lora_B`),
    so the result loads back with `load_lora_state_dict` or `model.load_state_dict(sd, strict=False)`.

    Like `state_dict()`, the tensors are detached but share storage with the parameters: clone them
    to keep a snapshot across optimizer steps (e.g. the global adapters of a federated round)."""
    out: Dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = module.lora_A.detach()
        out[prefix + "lora_B"] = module.lora_B.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy adapter tensors (names as produced by `lora_state_dict`) into the model's FusedLoRALinear
    modules in place, casting to each parameter's dtype and device; optimizer references stay valid.

    With strict=True every adapter of the model must be given and no other key may appear."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("model holds no FusedLoRALinear module; wrap it first with apply_fused_lora().")
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if k not in state_dict)
    if strict and (unexpected or missing):
        raise ValueError(
            "state_dict does not match the model's LoRA adapters: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}."
        )
    for key, target in own.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)} but the model expects {tuple(target.shape)} "
                "(a different rank or layer size)."
            )
        target.copy_(value)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every FusedLoRALinear of `model` (see FusedLoRALinear.merge)."""
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every FusedLoRALinear of `model` (see FusedLoRALinear.unmerge)."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def _name_matches(name: str, key: str) -> bool:
    # PEFT's list semantics for target_modules: a full name, or a suffix on a '.' boundary.
    return name == key or name.endswith("." + key)


def _resolve_per_module(spec, name: str, what: str):
    """The value of an int-or-dict argument for one module: for a dict, the most specific matching key
    (a full name beats a shorter suffix) wins."""
    if not isinstance(spec, Mapping):
        return spec
    matching = [key for key in spec if _name_matches(name, key)]
    if not matching:
        raise ValueError(
            f"{what} is a dict but none of its keys {sorted(spec)} matches the targeted module {name!r}; "
            f"add its suffix (e.g. {name.rsplit('.', 1)[-1]!r}) or its full name."
        )
    return spec[max(matching, key=len)]


def _available_linear_names(model: nn.Module) -> list:
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if name and (_is_linear_like(m) or isinstance(m, FusedLoRALinear))
        }
    )


def apply_fused_lora(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    r: RankSpec,
    alpha: AlphaSpec,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_dtype=None,
) -> nn.Module:
    """Replace the targeted linear modules of `model` by FusedLoRALinear, in place, and freeze every
    parameter except the adapters. Returns `model`.

    adapter_dtype: the dtype of lora_A/lora_B (default: each base weight's dtype); PEFT keeps float32
        adapters on a bfloat16/float16 model, which is `adapter_dtype=torch.float32`.

    target_modules: module-name suffixes or full names, matched like PEFT's list form
        ("c_attn" matches "transformer.h.0.attn.c_attn"); a single string is one such name (not a regex).
        Every entry must match at least one module, and every match must be an nn.Linear or Conv1D
        (a bitsandbytes 4-bit Linear4bit is accepted: see FusedLoRALinear.from_linear).
    r, alpha: a number for all targets, or a dict {suffix or full name: value} for per-module values
        (the most specific key wins, so {"q_proj": 8, "model.layers.0.self_attn.q_proj": 16} gives layer
        0 rank 16); every targeted module must be covered and every key must match a targeted module.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    target_modules = list(target_modules) if target_modules is not None else []
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(
            "target_modules must be a non-empty list of module-name suffixes or full names, "
            f"e.g. ['q_proj', 'v_proj']; got {target_modules!r}."
        )

    named = [(name, m) for name, m in model.named_modules() if name]
    matched: Dict[str, nn.Module] = {}
    unmatched = []
    for target in target_modules:
        hits = [(name, m) for name, m in named if _name_matches(name, target)]
        if not hits:
            unmatched.append(target)
        matched.update(hits)
    if unmatched:
        raise ValueError(
            f"target_modules entries {unmatched} match no module of {type(model).__name__}; "
            f"its linear modules are named {_available_linear_names(model)}."
        )
    for name, module in matched.items():
        if isinstance(module, FusedLoRALinear):
            raise ValueError(f"module {name!r} already has LoRA adapters (it is a FusedLoRALinear).")
        if not _is_linear_like(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; only torch.nn.Linear and transformers "
                "Conv1D can be wrapped. Name a linear submodule instead "
                f"(linear modules: {_available_linear_names(model)})."
            )
        if isinstance(module, nn.Linear) and not _is_linear4bit(module) and not module.weight.dtype.is_floating_point:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__} with a {module.weight.dtype} weight; only "
                "floating-point linears and bitsandbytes 4-bit Linear4bit bases can be wrapped."
            )

    # A dict key that matches no targeted module is almost certainly a typo; say so now rather
    # than train with a rank nobody asked for.
    for spec, what in ((r, "r"), (alpha, "alpha")):
        if isinstance(spec, Mapping):
            stray = [k for k in spec if not any(_name_matches(name, k) for name in matched)]
            if stray:
                raise ValueError(
                    f"{what} has keys {stray} that match none of the targeted modules "
                    f"(targets: {target_modules})."
                )

    # Resolve and validate everything before the first swap, so a bad argument leaves the model untouched.
    adapter_dtype = _check_adapter_dtype(adapter_dtype)
    plan = []
    for name, module in matched.items():
        rank = _resolve_per_module(r, name, "r")
        module_alpha = _resolve_per_module(alpha, name, "alpha")
        try:
            _check_hyperparameters(rank, module_alpha, dropout)
        except ValueError as err:
            raise ValueError(f"for module {name!r}: {err}") from None
        plan.append((name, module, rank, module_alpha))

    for name, module, rank, module_alpha in plan:
        new = FusedLoRALinear.from_linear(module, rank, module_alpha, dropout=dropout, use_rslora=use_rslora,
                                          adapter_dtype=adapter_dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)

    for p in model.parameters():
        p.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    return model
