"""A frozen 4-bit base for one side of the split (`model.quantize`, `model.quantize_side`), as QLoRA.

A weak client holds its segment's linear weights in 4 bits (bitsandbytes NF4 or FP4, blocks of 64
with double-quantized scales, QLoRA's choice) and trains its LoRA adapters on top: the fused LoRA
layer dequantizes the weight on the fly (splitlora_kernels.FusedLoRALinear over a bitsandbytes
`Linear4bit`). Embeddings, norms and the LM head stay in the model's dtype, as in QLoRA and in
transformers' `BitsAndBytesConfig(load_in_4bit=True)`.

Quantization is deterministic (the same weights give the same codes), so the whole model that
generates at evaluation can be quantized the same way (`quantize_modules` by name) and computes
what the trained segments computed.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, List, Optional

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
SIDES = ("client", "server", "both")
# Strategies whose client and server segments carry the fused LoRA layers this needs. The others
# train whole-model copies (centralized, fedlora), per-client multi-adapter layers (hsplitlora) or
# the full weights themselves (fedcybgd, which cannot train a 4-bit weight).
STRATEGIES = ("splitlora", "sl")
HEAD_NAMES = ("lm_head",)


def import_bitsandbytes():
    """bitsandbytes, or a ValueError that says how to get it."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a native library that fails to load
        raise ValueError(f"model.quantize needs bitsandbytes (pinned in requirements.txt; "
                         f"pip install bitsandbytes==0.50.2), which cannot be imported here: {err}") from None
    return bitsandbytes


_DEQUANTIZING_CLASS = None


def dequantizing_linear4bit_class():
    """A bitsandbytes Linear4bit whose product is always F.linear with the dequantized weight, as
    the fused LoRA layer over it computes (splitlora_kernels.FusedLoRALinear). bitsandbytes' own
    forward changes with the mode: on a CPU in eval mode without grad it repacks the weight into
    an AVX512-BF16 layout with bf16 scales (another product, and it fails on layers narrower than
    a block), and for one token it takes a GEMV kernel. Evaluation must compute what training did."""
    global _DEQUANTIZING_CLASS
    if _DEQUANTIZING_CLASS is None:
        bnb = import_bitsandbytes()
        from splitlora_kernels.layers import dequantize_4bit_weight

        class DequantizingLinear4bit(bnb.nn.Linear4bit):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                dtype = self.compute_dtype or x.dtype
                bias = None if self.bias is None else self.bias.to(dtype)
                return nn.functional.linear(x.to(dtype), dequantize_4bit_weight(self.weight, dtype), bias).to(x.dtype)

        _DEQUANTIZING_CLASS = DequantizingLinear4bit
    return _DEQUANTIZING_CLASS


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantizable_names(module: nn.Module) -> List[str]:
    """Names of `module`'s linear layers (nn.Linear, GPT-2's Conv1D) that a 4-bit base quantizes:
    all but the LM head and any layer whose weight is tied to an embedding."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in module.named_modules()
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and name.rsplit(".", 1)[-1] not in HEAD_NAMES
            and id(m.weight) not in embedded]


@torch.no_grad()
def to_linear4bit(layer: nn.Module, quant_type: str, device) -> nn.Module:
    """A bitsandbytes Linear4bit holding `layer`'s weight quantized on `device` (its compute dtype:
    the weight's dtype, so the product runs in the model's precision)."""
    bnb = import_bitsandbytes()
    weight = layer.weight.detach()
    if _is_conv1d(layer):  # Conv1D keeps its weight as [in, out]
        weight = weight.t()
    out_features, in_features = weight.shape
    new = dequantizing_linear4bit_class()(in_features, out_features, bias=layer.bias is not None,
                                          compute_dtype=weight.dtype, compress_statistics=True,
                                          quant_type=quant_type, device="meta")
    new.weight = bnb.nn.Params4bit(weight.contiguous().to("cpu"), requires_grad=False, compress_statistics=True,
                                   quant_type=quant_type, module=new)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    # bitsandbytes quantizes when the weight moves to its device (on a GPU the full-precision
    # weight never lands there).
    return new.to(device)


def quantizable_embedding_names(module: nn.Module) -> List[str]:
    """Names of `module`'s embeddings that `model.quantize_embeddings` quantizes: plain nn.Embedding
    layers only (a subclass such as Gemma's scaled embedding changes the forward, which the 4-bit
    embedding would drop) whose weight no other layer of `module` shares (a tied LM head)."""
    uses = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    return [name for name, m in module.named_modules()
            if type(m) is nn.Embedding and m.max_norm is None and uses[id(m.weight)] == 1]


# Elements per bitsandbytes quantize call when a table is quantized in pieces: its float32
# temporaries scale with the input, several times a 128k-token embedding table otherwise (5.4 GiB
# peak for Llama-3.2-1B's client, against 1.9 GiB unquantized: bench.client_memory).
CHUNK_ELEMENTS = 2**22
BLOCKSIZE = 64  # bitsandbytes' 4-bit default, as QLoRA


@torch.no_grad()
def quantize_4bit_in_chunks(weight: torch.Tensor, quant_type: str, device):
    """(codes, QuantState) equal to bitsandbytes' quantize_4bit(weight) without double quantization,
    computed a few rows at a time on `device`: the blocks of 64 run over the flattened rows, so
    pieces whose sizes are multiples of 64 quantize to the same codes and scales as the whole."""
    bnb = import_bitsandbytes()
    rows, cols = weight.shape
    unit = BLOCKSIZE // math.gcd(cols, BLOCKSIZE)  # rows whose elements fill whole blocks
    step = max(unit, (CHUNK_ELEMENTS // cols) // unit * unit)
    codes, absmax, state = [], [], None
    for start in range(0, rows, step):
        piece = weight[start:start + step].contiguous().to(device)
        piece_codes, state = bnb.functional.quantize_4bit(piece, blocksize=BLOCKSIZE, compress_statistics=False,
                                                          quant_type=quant_type)
        codes.append(piece_codes)
        absmax.append(state.absmax)
    quant_state = bnb.functional.QuantState(absmax=torch.cat(absmax), shape=weight.shape, code=state.code,
                                            blocksize=BLOCKSIZE, quant_type=quant_type, dtype=weight.dtype)
    return torch.cat(codes), quant_state


@torch.no_grad()
def to_embedding4bit(embedding: nn.Embedding, quant_type: str, device) -> nn.Module:
    """A bitsandbytes Embedding4bit holding `embedding`'s table quantized on `device` (rows looked
    up and dequantized into the table's dtype)."""
    bnb = import_bitsandbytes()
    new = bnb.nn.Embedding4bit(embedding.num_embeddings, embedding.embedding_dim, dtype=embedding.weight.dtype,
                               quant_type=quant_type, device="meta")
    codes, quant_state = quantize_4bit_in_chunks(embedding.weight.detach(), quant_type, device)
    new.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=quant_state, blocksize=BLOCKSIZE,
                                   compress_statistics=None, quant_type=quant_type, module=new, bnb_quantized=True)
    new.quant_state = quant_state
    new.padding_idx = embedding.padding_idx
    return new


def quantize_modules(module: nn.Module, names: Iterable[str], quant_type: str, device) -> List[str]:
    """Replaces the named linear layers (and embeddings) of `module` by 4-bit ones on `device`;
    returns the names."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"model.quantize must be one of {QUANT_TYPES} (or null for none); got {quant_type!r}")
    done = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = getattr(parent, leaf)
        convert = to_embedding4bit if isinstance(layer, nn.Embedding) else to_linear4bit
        setattr(parent, leaf, convert(layer, quant_type, device))
        done.append(name)
    return done


def quantize_segment(segment: nn.Module, quant_type: str, device, *, embeddings: bool = False) -> List[str]:
    """Quantizes every quantizable linear layer of a segment (before its adapters go on), and with
    `embeddings` its untied input embeddings too."""
    names = quantizable_names(segment) + (quantizable_embedding_names(segment) if embeddings else [])
    return quantize_modules(segment, names, quant_type, device)


def sides_quantized(side: str) -> tuple:
    """("client",), ("server",) or both, from model.quantize_side."""
    return ("client", "server") if side == "both" else (side,)


def quantization_state_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes a 4-bit weight keeps outside its parameter: its block scales (absmax), and with double
    quantization their own scales and code book. side_memory adds them to the weights."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            state = getattr(p, "quant_state", None)
            while state is not None:
                for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                          getattr(state, "offset", None)):
                    if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
                state = getattr(state, "state2", None)
    return total


def whole_model_names(segment: nn.Module, names: Iterable[str]) -> List[str]:
    """A segment's module names in the whole (unsplit) model."""
    return [segment.full_model_name(n) for n in names]


def check_quantize_config(quant_type: Optional[str], side: str, embeddings: bool, strategy: str,
                          errors: list) -> None:
    """config.validate's checks of model.quantize, model.quantize_side and model.quantize_embeddings."""
    if embeddings and quant_type is None:
        errors.append("model.quantize_embeddings: needs model.quantize (nf4 or fp4) set too")
    if embeddings and side == "server":
        errors.append("model.quantize_embeddings: the input embedding is the client's; set model.quantize_side "
                      "to client or both")
    if quant_type is not None and quant_type not in QUANT_TYPES:
        errors.append(f"model.quantize: must be one of {', '.join(QUANT_TYPES)} or null (no quantization); "
                      f"got {quant_type!r}")
    if side not in SIDES:
        errors.append(f"model.quantize_side: must be one of {', '.join(SIDES)}; got {side!r}")
    if quant_type is not None and strategy not in STRATEGIES:
        errors.append(f"model.quantize: a 4-bit base works with strategy {' or '.join(STRATEGIES)} (split LoRA "
                      f"segments); {strategy!r} is not supported")
