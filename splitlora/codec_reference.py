"""Plain-torch codec: the fallback kernels of the ops ``splitlora::compress`` / ``decompress`` and
the oracle the C++ and CUDA kernels are tested against.

The two functions ``compress_kernel`` and ``decompress_kernel`` take exactly the arguments of the
ops (see ``splitlora/_ops.py``) and must write byte-identical packets to the compiled kernels, so
every step follows the arithmetic fixed in ``csrc/codec.h``: IEEE float32 division (never a
multiplication by a reciprocal), round half to even, and for stochastic rounding the same 32-bit
counter hash, computed here with int64 tensors masked to 32 bits. They favour clarity over speed
and work on any device torch supports.

This module imports nothing from the rest of the package: it is what runs when nothing else was
built.
"""
from __future__ import annotations

import torch

# Wire-format constants (the layout is documented in csrc/codec.h and splitlora/codec.py).
FORMAT_VERSION = 1
MAGIC = b"SLCD"
HEADER_BYTES = 96
MAX_NDIM = 8
MIN_GROUP_SIZE = 16
MAX_GROUP_SIZE = 4096
SUPPORTED_BITS = (2, 4, 8, 16)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLAG_STOCHASTIC = 1

_M32 = 0xFFFFFFFF
_FLT_MAX = 3.4028234663852886e38


def num_groups(numel, group_size):
    return (numel + group_size - 1) // group_size


def scale_bytes(numel, group_size, bits):
    """Bytes of the scale section: float32 per group, zero-padded to a multiple of 16."""
    if bits == 16:
        return 0
    return (num_groups(numel, group_size) * 4 + 15) // 16 * 16


def code_bytes(numel, group_size, bits):
    if bits == 16:
        return 2 * numel
    return num_groups(numel, group_size) * (group_size * bits // 8)


def packet_bytes(numel, group_size, bits):
    """Exact packet size. Works on Python ints and on SymInts (the fake kernels use it)."""
    return HEADER_BYTES + scale_bytes(numel, group_size, bits) + code_bytes(numel, group_size, bits)


# --- stochastic rounding: the counter hash of csrc/codec.h on int64 tensors -------------------


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2^32 for a in [0, 2^32): split c in 16-bit halves so no int64 product overflows.
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sr_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """32-bit hash of (seed, element index) as an int64 tensor in [0, 2^32)."""
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    lo = index & _M32
    hi = index >> 32
    return _lowbias32(_lowbias32(lo ^ k0) ^ hi ^ k1)


def sr_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The u in [0, 1) of stochastic rounding: 24 hash bits times 2^-24, exact in float32."""
    return (sr_hash(index, seed) >> 8).to(torch.float32) * (2.0**-24)


# --- the kernels ------------------------------------------------------------------------------


def _quantize(v: torch.Tensor, bits: int, group_size: int, stochastic: bool, seed: int):
    """v: flat float32 of numel elements. Returns (scales fp32[ng], codes uint8[ng, gs], bad)."""
    numel = v.numel()
    ng = num_groups(numel, group_size)
    qmax = (1 << (bits - 1)) - 1
    padded = ng * group_size
    if padded != numel:
        v = torch.nn.functional.pad(v, (0, padded - numel))
    v = v.view(ng, group_size)
    absmax = v.abs().amax(dim=1)  # exact, and NaN/Inf propagate: the non-finite check is free
    ok = torch.isfinite(absmax)
    # A tensor divisor, not a Python scalar: some torch kernels turn division by a scalar into a
    # multiplication by its reciprocal, which rounds differently.
    scale = absmax / torch.full_like(absmax, float(qmax))
    positive = scale > 0
    t = v / torch.where(positive, scale, torch.ones_like(scale))[:, None]
    if stochastic:
        index = torch.arange(padded, dtype=torch.int64, device=v.device).view(ng, group_size)
        u = sr_uniform(index, seed)
        fl = torch.floor(t)
        q = fl + (u < t - fl).to(torch.float32)
    else:
        q = torch.round(t)  # half to even
    q = q.clamp(-qmax, qmax)
    q = torch.where((positive & ok)[:, None], q, torch.zeros_like(q))
    codes = (q.to(torch.int32) + (1 << (bits - 1))).to(torch.uint8)
    # Non-finite groups: NaN scale and zero codes, as the compiled kernels write them.
    codes = torch.where(ok[:, None], codes, torch.zeros_like(codes))
    scale = torch.where(ok, scale, torch.full_like(scale, float("nan")))
    if padded != numel:
        codes.view(-1)[numel:] = 0  # padding of the last group: zero codes
    return scale, codes, bool((~ok).any())


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8[ng, gs] -> uint8[ng, gs*bits/8]; element j of a byte in bits [j*bits, +bits)."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    ng, gs = codes.shape
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    c = codes.view(ng, gs // per_byte, per_byte).to(torch.int32)
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8[ng, gbytes] -> int32 codes [ng, gs]."""
    if bits == 8:
        return packed.to(torch.int32)
    per_byte = 8 // bits
    ng, gbytes = packed.shape
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return c.view(ng, gbytes * per_byte)


def compress_kernel(x, header, bits, group_size, stochastic, seed):
    """Plain-torch ``splitlora::compress``: returns (packet uint8[P], nonfinite int32[1])."""
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"splitlora::compress: x must be float32, float16 or bfloat16, got {x.dtype}")
    numel = x.numel()
    device = x.device
    packet = torch.empty(packet_bytes(numel, group_size, bits), dtype=torch.uint8, device=device)
    packet[:HEADER_BYTES] = torch.tensor(list(header), dtype=torch.uint8).to(device)
    flat = x.detach().reshape(-1)
    if bits == 16:
        h = flat.to(torch.bfloat16)
        packet[HEADER_BYTES:] = h.view(torch.uint8)
        bad = numel > 0 and not bool(torch.isfinite(h).all())
    else:
        ng = num_groups(numel, group_size)
        sbytes = scale_bytes(numel, group_size, bits)
        scale, codes, bad = _quantize(flat.to(torch.float32), bits, group_size, stochastic, seed)
        packet[HEADER_BYTES : HEADER_BYTES + 4 * ng] = scale.view(torch.uint8)
        packet[HEADER_BYTES + 4 * ng : HEADER_BYTES + sbytes] = 0
        packet[HEADER_BYTES + sbytes :] = _pack(codes, bits).reshape(-1)
    return packet, torch.full((1,), int(bad), dtype=torch.int32, device=device)


def private_values(x, factors, sigma, noise_seed):
    """float32 copy of x, clipped by its row's factor with the hash Gaussian added (0 on rows whose
    factor is 0): the first step of ``splitlora::compress_private`` (csrc/codec.h)."""
    rows = factors.numel()
    xf = x.detach().reshape(rows, -1).to(torch.float32)
    f = factors.to(device=x.device, dtype=torch.float32)[:, None]
    y = xf * f
    if sigma > 0:
        y = y + gaussian(x.numel(), noise_seed, sigma, x.device).view(rows, -1)
    y = torch.where(f != 0, y, torch.zeros_like(y))
    return y.reshape(x.shape)


def gaussian(numel, seed, sigma, device=None):
    """float32[numel]: float32(sigma * Box-Muller of two counter hashes per element), computed in
    float64 (the hash_gaussian of csrc/codec.h)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    u1 = (sr_hash(2 * idx, seed).to(torch.float64) + 1.0) * (2.0**-32)
    u2 = sr_hash(2 * idx + 1, seed).to(torch.float64) * (2.0**-32)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return (float(sigma) * z).to(torch.float32)


def compress_private_kernel(x, factors, header, bits, group_size, stochastic, seed, sigma, noise_seed):
    """Plain-torch ``splitlora::compress_private``: compress of the clipped, noised float32 values
    under x's header (the packet decodes to x's dtype)."""
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"splitlora::compress_private: x must be float32, float16 or bfloat16, got {x.dtype}")
    rows = factors.numel()
    if factors.dim() != 1 or factors.dtype != torch.float32 or (x.numel() % rows if rows else x.numel()):
        raise ValueError("splitlora::compress_private: factors must be 1-D float32 and their number must divide "
                         "x's element count")
    y = private_values(x, factors, float(sigma), int(noise_seed)) if x.numel() else x.detach().to(torch.float32)
    return compress_kernel(y, header, bits, group_size, stochastic, seed)


def decompress_kernel(packet, dtype, shape, bits, group_size):
    """Plain-torch ``splitlora::decompress``: returns (tensor, bad_scales int32[1])."""
    shape = [int(d) for d in shape]
    numel = 1
    for d in shape:
        numel *= d
    if packet.dim() != 1 or packet.dtype != torch.uint8 or packet.numel() != packet_bytes(numel, group_size, bits):
        raise ValueError("splitlora::decompress: packet does not match the shape, bits and group size")
    device = packet.device
    bad = False
    if bits == 16:
        body = packet[HEADER_BYTES:]
        if body.storage_offset() % 2:
            body = body.clone()  # a bfloat16 view needs 2-byte alignment
        # copy=True: the op's output must never alias the packet, even when dtype is bfloat16.
        y = body.view(torch.bfloat16).to(dtype, copy=True)
    else:
        ng = num_groups(numel, group_size)
        sbytes = scale_bytes(numel, group_size, bits)
        raw = packet[HEADER_BYTES : HEADER_BYTES + 4 * ng]
        if raw.storage_offset() % 4:
            raw = raw.clone()  # a float32 view needs 4-byte alignment
        scale = raw.view(torch.float32)
        valid = (scale >= 0) & (scale <= _FLT_MAX)  # False for NaN too
        bad = numel > 0 and not bool(valid.all())
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        packed = packet[HEADER_BYTES + sbytes :].view(ng, group_size * bits // 8)
        q = _unpack(packed, bits) - (1 << (bits - 1))
        y = (q.to(torch.float32) * scale[:, None]).reshape(-1)[:numel].to(dtype)
    return y.reshape(shape), torch.full((1,), int(bad), dtype=torch.int32, device=device)
