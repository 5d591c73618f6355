"""The arithmetic of the CUDA compress kernels' lean path for 16-bit inputs, checked on the CPU.

The lean path (``lean_scale``, ``lean_reciprocal``, ``lean_chunk`` and ``lean_pack`` in
``csrc/codec_cuda.cu``, switched on by SPLITLORA_CODEC_LEAN16=1) replaces the IEEE divisions of the
established path by multiplications and FMAs, and claims the same packets. The claims rest on
facts about float32 arithmetic that need no GPU to check, so these tests emulate each float32
operation exactly (a product of two float32 values is exact in float64; where a float64 sum is
not exact, the few such results are recomputed with fractions) and compare with the plain-torch
reference, whose division is IEEE float32:

- the scale rn(m / qmax) from one multiplication and two FMAs equals the IEEE quotient for every
  finite bfloat16 and float16 absmax m (exhaustive);
- the codes from the FMA rounding and its one-FMA boundary check, with a reciprocal anywhere
  within the 1 ulp that rcp.approx may be off before its Newton step, equal the reference codes
  for every 16-bit value of a group (exhaustive per absmax, over a spread of absmax values);
- codes taken from the low bytes of the rounded values (or, for stochastic rounding, the bare
  codes) and packed by shift-adds and byte permutes land where the reference packs them.

The CUDA code itself is checked against the CPU kernels by tests/csrc/test_codec_cuda.py on a GPU.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch

from codec_testutil import absmax_spread, finite_nonnegative_16bit
from splitlora import codec_reference

F32, F64 = np.float32, np.float64
K_RNE = F32(12582912.0)  # 1.5 * 2^23
TOL = F32(2.0**-15)
LIM = F32(0.5) - TOL


def _exact_f32(value: Fraction) -> np.float32:
    """value rounded to the nearest float32, ties to even (subnormals included)."""
    x = F32(float(value))  # within one float32 step of the answer
    candidates = (np.nextafter(x, F32(-np.inf)), x, np.nextafter(x, F32(np.inf)))
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.uint32)) & 1))


def fma32(a, b, c) -> np.ndarray:
    """rn32(a * b + c) for float32 arrays, computed exactly."""
    a, b, c = np.broadcast_arrays(np.asarray(a, F32), np.asarray(b, F32), np.asarray(c, F32))
    p = a.astype(F64) * b.astype(F64)  # exact: 24 x 24 bits
    c64 = c.astype(F64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # TwoSum: s + err == p + c exactly
    out = s.astype(F32)
    # The exact sum lies between s and its float64 neighbour towards err; rounding is monotonic, so
    # where both round to the same float32 so does the exact sum. Elsewhere, round it exactly.
    beyond = np.nextafter(s, np.where(err > 0, np.inf, -np.inf)).astype(F32)
    for i in zip(*np.nonzero((err != 0) & (beyond != out))):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        out[i] = _exact_f32(exact)
    return out


def mul32(a, b) -> np.ndarray:
    return (np.asarray(a, F32).astype(F64) * np.asarray(b, F32).astype(F64)).astype(F32)


def sub32(a, b) -> np.ndarray:
    return (np.asarray(a, F32).astype(F64) - np.asarray(b, F32).astype(F64)).astype(F32)  # exact in f64 here


def lean_scale(m: np.ndarray, qmax: int) -> np.ndarray:
    """csrc/codec_cuda.cu lean_scale."""
    if qmax == 1:
        return m.astype(F32)
    c = F32(1.0) / F32(qmax)
    q0 = mul32(m, c)
    rem = fma32(-q0, F32(qmax), m)
    return fma32(rem, c, q0)


def lean_reciprocal(s: np.ndarray, r0: np.ndarray) -> np.ndarray:
    """csrc/codec_cuda.cu lean_reciprocal, given rcp.approx's result r0."""
    e = fma32(-s, r0, F32(1.0))
    return fma32(r0, e, r0)


def lean_codes(v: np.ndarray, scale: np.float32, r0: np.float32, bits: int):
    """csrc/codec_cuda.cu lean_chunk for one group: (codes, how many elements took the fast path)."""
    qmax, off = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    k = K_RNE + F32(off)
    exact = np.round(_div32(v, scale)).astype(np.int64).clip(-qmax, qmax)  # quantize_exact, clamped
    if not F32(2.0**-125) <= scale <= F32(2.0**125):  # no normal reciprocal: every element exact
        return (exact + off).astype(np.uint8), 0
    r = lean_reciprocal(np.array([scale], F32), np.array([r0], F32))[0]
    b = fma32(v, r, k)
    d = fma32(v, r, -sub32(b, k))
    fast = np.abs(d) < LIM
    q = sub32(b, k).astype(np.int64)
    q = np.where(fast, q, exact)
    return (q + off).astype(np.uint8), int(fast.sum())


def _div32(a, b) -> np.ndarray:
    """IEEE float32 division, as torch computes it on the CPU."""
    return (torch.from_numpy(np.asarray(a, F32)) / torch.full((1,), float(b), dtype=torch.float32)).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("qmax", [127, 7])
def test_lean_scale_equals_ieee_division_for_every_16bit_absmax(dtype, qmax):
    m = finite_nonnegative_16bit(dtype)
    ieee = (torch.from_numpy(m) / torch.full_like(torch.from_numpy(m), float(qmax))).numpy()
    lean = lean_scale(m, qmax)
    mismatch = np.nonzero(lean.view(np.uint32) != ieee.view(np.uint32))[0]
    assert mismatch.size == 0, f"first absmax where they differ: {m[mismatch[:5]]}"
    if dtype == torch.float16:  # lean_chunk skips the range check of the reciprocal for float16
        nonzero = lean[lean > 0]
        assert nonzero.min() >= 2.0**-125 and nonzero.max() <= 2.0**125


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rcp_ulps", [-1, 0, 1], ids=["rcp-1ulp", "rcp-exact", "rcp+1ulp"])
def test_lean_codes_equal_reference_codes_for_every_16bit_value(dtype, bits, rcp_ulps):
    qmax = (1 << (bits - 1)) - 1
    all_values = finite_nonnegative_16bit(dtype)
    fast_elements = total = 0
    for m in absmax_spread(dtype):
        mag = all_values[all_values <= m]
        v = np.concatenate([mag, -mag])  # every value a group with this absmax can hold
        scale = lean_scale(np.array([m], F32), qmax)[0]
        if scale == 0:
            continue  # the all-zero branch writes the zero code without any arithmetic
        # rcp.approx is within 1 ulp of 1/scale: try the correctly rounded value and both neighbours.
        r0 = _div32(np.array([1.0], F32), scale)[0]
        for _ in range(abs(rcp_ulps)):
            r0 = np.nextafter(r0, F32(np.inf) if rcp_ulps > 0 else F32(0))
        codes, fast = lean_codes(v, scale, r0, bits)
        x = torch.from_numpy(v).to(dtype)
        _, ref_codes, _ = codec_reference._quantize(x.float(), bits, v.size, False, 0)
        assert np.array_equal(codes, ref_codes.view(-1).numpy()), f"absmax {m}"
        if 2.0**-125 <= scale <= 2.0**125:  # outside, no normal reciprocal: all exact by design
            fast_elements += fast
            total += v.size
    # The check is not vacuous: nearly every element of a group with a normal reciprocal takes
    # the fast path (the others lie within 2^-15 of a rounding boundary).
    assert fast_elements > 0.99 * total


def _byte_perm(x: int, y: int, selector: int) -> int:
    """CUDA __byte_perm for selectors without the sign-replicate bit."""
    pool = (x & 0xFFFFFFFF) | ((y & 0xFFFFFFFF) << 32)
    return sum(((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def lean_pack(b: list[int], bits: int) -> bytes:
    """csrc/codec_cuda.cu lean_pack for the 8 rounded values of one chunk; its code bytes."""
    u32 = 0xFFFFFFFF
    if bits == 8:
        lo = _byte_perm(_byte_perm(b[0], b[1], 0x0040), _byte_perm(b[2], b[3], 0x0040), 0x5410)
        hi = _byte_perm(_byte_perm(b[4], b[5], 0x0040), _byte_perm(b[6], b[7], 0x0040), 0x5410)
        return lo.to_bytes(4, "little") + hi.to_bytes(4, "little")
    if bits == 4:
        p = [((b[i + 1] << 4) + b[i]) & u32 for i in (0, 2, 4, 6)]
        lo = _byte_perm(_byte_perm(p[0], p[1], 0x0040), _byte_perm(p[2], p[3], 0x0040), 0x5410)
        return lo.to_bytes(4, "little")
    p = [((b[i + 1] << 2) + b[i]) & u32 for i in (0, 2, 4, 6)]
    lo = _byte_perm(((p[1] << 4) + p[0]) & u32, ((p[3] << 4) + p[2]) & u32, 0x0040)
    return (lo & 0xFFFF).to_bytes(2, "little")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("words", ["rounded", "codes"])
def test_lean_pack_lays_codes_out_as_the_reference(bits, words):
    """Round to nearest packs the bits of the rounded floats K + q; stochastic rounding the bare codes."""
    rng = np.random.default_rng(bits)
    off, qmax = 1 << (bits - 1), (1 << (bits - 1)) - 1
    codes = rng.integers(off - qmax, off + qmax + 1, size=(4096, 8)).astype(np.uint8)  # q + off, q in [-qmax, qmax]
    if words == "rounded":
        rounded = (np.array([F32(K_RNE + off)]).view(np.uint32)[0] + codes.astype(np.int64) - off).astype(np.int64)
    else:
        rounded = codes.astype(np.int64)
    packed = b"".join(lean_pack([int(w) for w in row], bits) for row in rounded)
    expected = codec_reference._pack(torch.from_numpy(codes.reshape(1, -1)), bits).numpy().tobytes()
    assert packed == expected
