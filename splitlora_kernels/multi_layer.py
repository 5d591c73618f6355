"""A drop-in linear layer with several LoRA adapters of their own ranks, one per group of samples.

`MultiLoRALinear` holds one frozen base weight (and bias) and G adapters (A_g [r_g, in],
B_g [out, r_g], scaling_g). A forward takes a batch whose samples are sorted by adapter: the
first n_0 samples (dim 0) belong to adapter 0, the next n_1 to adapter 1, and so on, and runs
`multi_lora_linear` over all of them: one Triton launch for every adapter's low-rank path on a
GPU, plain torch per group on a CPU. The caller says how many samples each adapter gets with

    with adapter_groups(model, [n_0, n_1, ...]):   # every MultiLoRALinear inside `model`
        y = model(x)                               # x.shape[0] == sum(n_g); n_g may be 0

The sizes are only needed while the forward runs: the backward keeps its own copy.

This is the HSplitLoRA server's layer: one adapter per client, each at that client's rank, and
every client's activations in one batch. `lora_dropout` > 0 drops inputs of the adapters' branch
while training (one mask over the whole batch, as FusedLoRALinear draws it).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from .layers import FusedLoRALinear, freeze_base
from .ops.multi_lora import multi_lora_linear, offsets_from_sizes


def _check_rank(r, what: str) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{what} must be an integer >= 1; got {r!r}.")
    return int(r)


class MultiLoRALinear(nn.Module):
    """y[samples of g] = x @ W.T + b + scaling_g * (x @ A_g.T) @ B_g.T, scaling_g = lora_alpha / r_g
    (or lora_alpha / sqrt(r_g) with use_rslora). `weight` is [out, in], or [in, out] with
    `fan_in_fan_out` (GPT-2's Conv1D), as in FusedLoRALinear; the base is frozen and shared, the
    adapters are `lora_A[g]` and `lora_B[g]` (ParameterLists)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], ranks: Sequence[int], lora_alpha: float,
                 *, use_rslora: bool = False, fan_in_fan_out: bool = False, lora_dropout: float = 0.0,
                 adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        # The adapters' own dtype (float32 on a 16-bit base, as PEFT keeps them); forward casts them
        # to the input's dtype, and their gradients come back in this one. None: the weight's dtype.
        self.adapter_dtype = weight.dtype if adapter_dtype is None else adapter_dtype
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) == 0:
            raise ValueError(f"ranks must be a non-empty list of integers >= 1 (one per adapter); got {ranks!r}.")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a number > 0; got {lora_alpha!r}.")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
                or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1); got {lora_dropout!r}.")
        self.lora_dropout = float(lora_dropout)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.in_features, self.out_features = freeze_base(weight, bias, self.fan_in_fan_out)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for g, r in enumerate(ranks):
            a, b = self._new_pair(_check_rank(r, f"ranks[{g}]"))
            self.lora_A.append(a)
            self.lora_B.append(b)
        # Samples per adapter for the next forward; set by `adapter_groups`.
        self.group_sizes: Optional[List[int]] = None

    @classmethod
    def from_lora_layer(cls, layer: FusedLoRALinear, ranks: Sequence[int]) -> "MultiLoRALinear":
        """G adapters on `layer`'s base weight and bias (the same Parameter objects: no copy), with
        its alpha, rsLoRA flag and dropout. Every adapter starts like PEFT's (A kaiming-uniform, B = 0)."""
        if not isinstance(layer, FusedLoRALinear):
            raise ValueError(f"layer must be a FusedLoRALinear; got {type(layer).__name__}.")
        if layer.merged:
            raise ValueError("layer is merged; unmerge() it first so that its base weight is the base.")
        multi = cls(layer.weight, layer.bias, ranks, layer.lora_alpha, use_rslora=layer.use_rslora,
                    fan_in_fan_out=layer.fan_in_fan_out, lora_dropout=layer.lora_dropout,
                    adapter_dtype=layer.lora_A.dtype)
        multi.train(layer.training)
        return multi

    # -- adapters --------------------------------------------------------------------------------
    def _new_pair(self, r: int):
        factory = dict(device=self.weight.device, dtype=self.adapter_dtype)
        a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        b = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a, b

    @property
    def num_adapters(self) -> int:
        return len(self.lora_A)

    @property
    def ranks(self) -> List[int]:
        return [a.shape[0] for a in self.lora_A]

    def scaling(self, g: int) -> float:
        r = self.lora_A[g].shape[0]
        return self.lora_alpha / math.sqrt(r) if self.use_rslora else self.lora_alpha / r

    @property
    def scalings(self) -> List[float]:
        return [self.scaling(g) for g in range(self.num_adapters)]

    def set_rank(self, g: int, r: int) -> None:
        """Adapter g at rank r: new Parameter objects (rebuild any optimizer that held the old
        ones), A kaiming-uniform, B = 0."""
        a, b = self._new_pair(_check_rank(r, "r"))
        self.lora_A[g] = a
        self.lora_B[g] = b

    def delta_weight(self, g: int) -> torch.Tensor:
        """scaling_g * B_g @ A_g in the layout of `weight`, in float32 at least."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B[g].detach().to(dtype) @ self.lora_A[g].detach().to(dtype)) * self.scaling(g)
        return delta.t() if self.fan_in_fan_out else delta

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.group_sizes
        if sizes is None:
            raise RuntimeError("MultiLoRALinear needs to know which samples belong to which adapter: run the "
                               "forward inside `with adapter_groups(model, sizes):` (sizes: samples per adapter "
                               "along dim 0, in adapter order).")
        if len(sizes) != self.num_adapters:
            raise ValueError(f"MultiLoRALinear has {self.num_adapters} adapters but was given {len(sizes)} "
                             f"group sizes ({sizes}); give one size per adapter (0 for an unused one).")
        if x.dim() < 2 or sum(sizes) != x.shape[0]:
            raise ValueError(f"MultiLoRALinear: the group sizes {sizes} must add up to the input's first "
                             f"dimension (samples), got an input of shape {tuple(x.shape)}.")
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        if x.dtype != weight.dtype:
            raise ValueError(f"MultiLoRALinear received an input of dtype {x.dtype} but its base weight is "
                             f"{weight.dtype}; cast the input or the module.")
        rows_per_sample = math.prod(x.shape[1:-1])
        offsets = offsets_from_sizes([n * rows_per_sample for n in sizes])
        lora_as = [a if a.dtype == x.dtype else a.to(x.dtype) for a in self.lora_A]
        lora_bs = [b if b.dtype == x.dtype else b.to(x.dtype) for b in self.lora_B]
        return multi_lora_linear(x, weight, lora_as, lora_bs, self.scalings, offsets, self.bias,
                                 dropout_p=self.lora_dropout, training=self.training)

    def base_only(self) -> "BaseLinear":
        """The frozen base layer alone (sharing the weight and bias): what the model computes with
        every adapter's update folded away, e.g. to evaluate a model whose updates were merged."""
        return BaseLinear(self.weight, self.bias, fan_in_fan_out=self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"lora_alpha={self.lora_alpha:g}, use_rslora={self.use_rslora}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, "
                f"fan_in_fan_out={self.fan_in_fan_out}")


class BaseLinear(nn.Module):
    """y = x @ W.T + b with W stored [out, in], or [in, out] with `fan_in_fan_out` (Conv1D)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.fan_in_fan_out = bool(fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)


def multi_lora_modules(model: nn.Module) -> dict:
    """{qualified module name: MultiLoRALinear} in `model.named_modules()` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


@contextlib.contextmanager
def adapter_groups(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Inside the block, every MultiLoRALinear of `model` gives its first sizes[0] samples to adapter
    0, the next sizes[1] to adapter 1, ... (sizes: non-negative integers, one per adapter)."""
    sizes = list(sizes)
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"adapter_groups: sizes[{i}] must be a non-negative integer, got {n!r}")
    modules = list(multi_lora_modules(model).values())
    previous = [m.group_sizes for m in modules]
    for m in modules:
        m.group_sizes = [int(n) for n in sizes]
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.group_sizes = p
