"""Shared helpers of the codec tests: activation-like data, expected scales, the error bound."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from splitlora import codec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (bits, stochastic) pairs that exist: bits 16 is a bf16 passthrough with nothing to round.
CODEC_MODES = [(bits, stochastic) for bits in (2, 4, 8, 16) for stochastic in (False, True)
               if not (stochastic and bits == 16)]
CODEC_MODE_IDS = [f"{bits}bit-{'stochastic' if stochastic else 'nearest'}" for bits, stochastic in CODEC_MODES]
QUANT_BITS = (2, 4, 8)

# Relative half-ulp of the final cast to the input dtype, and the absolute error floor from
# float16 subnormals (2^-25 is half the smallest float16 subnormal step).
CAST_REL = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CAST_ABS = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 0.0}


def activations(shape, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    """Activation-like data: normal with per-row scales and a few outliers, never all zero."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    numel = math.prod(shape)
    x = torch.randn(numel, generator=g)
    if numel:
        rows = torch.exp(torch.randn(max(1, numel // 97 + 1), generator=g)).repeat_interleave(97)[:numel]
        x = x * rows
        outliers = torch.randint(0, numel, (max(1, numel // 200),), generator=g)
        x[outliers] *= 20.0
    return (x * scale).reshape(shape).to(dtype).to(device)


def expected_group_scales(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """scale = absmax / qmax per group of the flattened tensor, in float32 (independent of codec)."""
    flat = x.detach().reshape(-1).float().cpu()
    n = flat.numel()
    ng = -(-n // group_size)
    padded = torch.zeros(ng * group_size)
    padded[:n] = flat
    absmax = padded.view(ng, group_size).abs().amax(dim=1)
    qmax = 2 ** (bits - 1) - 1
    return absmax / torch.full_like(absmax, float(qmax))


def packet_scales(packet: torch.Tensor) -> torch.Tensor:
    info = codec.packet_info(packet)
    raw = packet.cpu()[96 : 96 + 4 * info.num_groups].clone()
    return raw.view(torch.float32)


def per_element(scales: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    return scales.repeat_interleave(group_size)[:numel]


def roundtrip_error_bound(x, y, scales, group_size, *, steps=0.5):
    """Checks |x - y| <= steps * scale (+ float32 rounding + the cast to x.dtype) per element.

    Returns the largest error as a fraction of its group's scale (for tightness checks).
    """
    xf = x.detach().reshape(-1).float().cpu()
    yf = y.detach().reshape(-1).float().cpu()
    s = per_element(scales.float().cpu(), xf.numel(), group_size)
    err = (xf - yf).abs()
    tol = steps * s * (1 + 2.0**-15) + xf.abs() * 2.0**-22 + yf.abs() * CAST_REL[x.dtype] + CAST_ABS[x.dtype]
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} elements exceed the bound; worst: x={xf[bad][:5].tolist()} "
        f"y={yf[bad][:5].tolist()} scale={s[bad][:5].tolist()}"
    )
    nz = s > 0
    return float((err[nz] / s[nz]).max()) if nz.any() else 0.0


_FIELDS = struct.Struct("<4sHBBBBHIQ8q")
_NAMES = ("magic", "version", "dtype", "bits", "flags", "ndim", "reserved16", "group_size", "numel")


def read_header(packet: torch.Tensor) -> dict:
    values = _FIELDS.unpack(bytes(packet[:88].cpu().tolist()))
    fields = dict(zip(_NAMES, values[:9]))
    fields["shape"] = list(values[9:])
    fields["crc"], fields["reserved32"] = struct.unpack("<II", bytes(packet[88:96].cpu().tolist()))
    return fields


def rewrite_header(packet: torch.Tensor, *, fix_crc=True, **changes) -> torch.Tensor:
    """A copy of packet with header fields changed and (by default) a CRC that matches them."""
    fields = read_header(packet)
    fields.update(changes)
    shape = list(fields["shape"]) + [0] * (8 - len(fields["shape"]))
    head = _FIELDS.pack(*(fields[k] for k in _NAMES), *shape)
    crc = zlib.crc32(head) if fix_crc else fields["crc"]
    head += struct.pack("<II", crc, fields["reserved32"])
    out = packet.clone()
    out[:96] = torch.tensor(list(head), dtype=torch.uint8)
    return out


def has_cpp_cpu() -> bool:
    return codec.backend_for("cpu") == "cpp-cpu"


def finite_nonnegative_16bit(dtype: torch.dtype) -> np.ndarray:
    """Every finite non-negative bfloat16 or float16 value, ascending, as float32."""
    if dtype == torch.bfloat16:
        return (np.arange(0, 0x7F80, dtype=np.uint32) << 16).view(np.float32)
    return np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)


def absmax_spread(dtype: torch.dtype) -> np.ndarray:
    """Absmax values from subnormal to the largest finite, plus a random sample."""
    values = finite_nonnegative_16bit(dtype)
    picks = [1, 2, 3, len(values) // 4, len(values) // 2, len(values) - 2, len(values) - 1]
    rng = np.random.default_rng(0)
    picks += list(rng.integers(len(values) // 3, len(values) - 1, size=9))  # the usual activation range
    return values[np.array(picks)]
