// Per-chunk arithmetic of the CUDA codec kernels (codec_cuda.cu holds the kernels, their memory
// layout and the launches): the element types, access to the elements of a 16-byte chunk, code
// stores, the exact quantizer, the stochastic-rounding number and the lean path for 16-bit inputs.
//
// Kept apart so that the host can compile the very same source: tests/csrc/test_lean16_host.py
// builds it with a C++ compiler against cuda_host_shim.h (the CUDA intrinsics used here, restated
// in ISO C++ with the same IEEE rounding) and checks the packets lean_chunk writes against the CPU
// kernels', without a GPU. Under nvcc (__CUDACC__) everything here is device code.
#pragma once

#include <cstdint>
#include <type_traits>

#include "codec.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define SL_DEV __device__ __forceinline__
#define SL_DEV_NOINLINE __device__ __noinline__
#else
#include "cuda_host_shim.h"
#define SL_DEV inline
#define SL_DEV_NOINLINE __attribute__((noinline))
#endif

namespace splitlora {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockElems = 4096;  // elements per block of the decompress and bits-16 kernels

// Margin around rounding boundaries inside which the reciprocal shortcut defers to IEEE division.
// With r = rn(1/scale) and t = rn(v*r): |t - v/scale| <= |v/scale| * 2^-23 (two roundings of
// 2^-24 each), and |v/scale| <= qmax * (1 + 2^-23) < 128, so |t - v/scale| < 1.53e-5; the IEEE
// quotient rn(v/scale) is within half an ulp (<= 2^-18 = 3.8e-6 below 128) of v/scale. So t and
// the IEEE quotient differ by less than 1.9e-5 < kTol, and when t lies further than kTol from a
// boundary both fall on the same side of it (for stochastic rounding: the same floor, and the
// fraction on the same side of u, whose grid is 2^-24; the float subtractions add < 2^-24).
// Valid while r is a normal float: scale in [2^-125, 2^125], checked per group.
constexpr float kTol = 3.0517578125e-05f;  // 2^-15
constexpr float kRne = 12582912.0f;        // 1.5 * 2^23: t + kRne rounds t to an integer (|t| < 2^22)
constexpr int kRneBits = 0x4B400000;       // bit pattern of kRne

// Element types. Values travel as raw 16-byte chunks (uint4) and are converted on use.
struct F32 {
  using storage = float;
  static SL_DEV float load(float v) { return v; }
  static SL_DEV float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static SL_DEV float load(uint16_t v) { return bf16_to_f32(v); }
  static SL_DEV uint16_t store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
#if defined(__CUDACC__)
  static SL_DEV float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static SL_DEV uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
#else  // the same values: both convert exactly (load) and round to nearest even (store)
  static SL_DEV float load(uint16_t v) { return f16_to_f32(v); }
  static SL_DEV uint16_t store(float v) { return f32_to_f16(v); }
#endif
};

template <typename E>
struct Layout {
  using S = typename E::storage;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(S));  // elements per chunk
  static constexpr int U = kBlockElems / (kThreads * VEC);         // rows (chunks) per thread
};

SL_DEV uint32_t word_of(const uint4& c, int i) {
  return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}
SL_DEV void set_word(uint4& c, int i, uint32_t w) {
  if (i == 0) c.x = w;
  else if (i == 1) c.y = w;
  else if (i == 2) c.z = w;
  else c.w = w;
}

// Element i (a compile-time index after unrolling) of a chunk, as float32.
template <typename E>
SL_DEV float elem(const uint4& c, int i) {
  if constexpr (sizeof(typename E::storage) == 4) {
    return __uint_as_float(word_of(c, i));
  } else {
    const uint32_t w = word_of(c, i >> 1);
    return E::load(static_cast<uint16_t>((i & 1) ? (w >> 16) : (w & 0xffffU)));
  }
}

// Raw bits of element i of a chunk.
template <typename E>
SL_DEV uint32_t raw_elem(const uint4& c, int i) {
  if constexpr (sizeof(typename E::storage) == 4) return word_of(c, i);
  else return (i & 1) ? (word_of(c, i >> 1) >> 16) : (word_of(c, i >> 1) & 0xffffU);
}

// Stores the code bytes of one chunk: BYTES = VEC * bits / 8, 1 to 8.
template <int BYTES>
SL_DEV void store_codes(uint8_t* p, uint32_t lo, uint32_t hi) {
  if constexpr (BYTES == 8) *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  else if constexpr (BYTES == 4) *reinterpret_cast<uint32_t*>(p) = lo;
  else if constexpr (BYTES == 2) *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(lo);
  else *p = static_cast<uint8_t>(lo);
}

// float32 bit pattern of max |v| over a chunk: orders like the values, NaN/Inf >= 0x7f800000.
template <typename E>
SL_DEV uint32_t chunk_absmax_bits(const uint4& c) {
  if constexpr (sizeof(typename E::storage) == 4) {
    return max(max(c.x & 0x7fffffffU, c.y & 0x7fffffffU), max(c.z & 0x7fffffffU, c.w & 0x7fffffffU));
  } else {
    // |h| of a 16-bit float orders like its value too: a max per 16-bit lane (one instruction
    // for two elements on sm_90), then convert the larger of the two lanes.
    const uint32_t m = __vmaxu2(__vmaxu2(c.x & 0x7fff7fffU, c.y & 0x7fff7fffU),
                                __vmaxu2(c.z & 0x7fff7fffU, c.w & 0x7fff7fffU));
    const uint32_t h = max(m & 0xffffU, m >> 16);
    return __float_as_uint(E::load(static_cast<uint16_t>(h)));
  }
}

// Signed code of one element with IEEE division, as codec.h specifies it (unclamped).
template <bool STOCH>
SL_DEV_NOINLINE int quantize_exact(float v, float scale, float u) {
  const float t = __fdiv_rn(v, scale);
  if constexpr (!STOCH) {
    return __float2int_rn(t);  // round half to even
  } else {
    const float fl = floorf(t);
    return static_cast<int>(fl) + (u < __fsub_rn(t, fl) ? 1 : 0);
  }
}

// The uniform number of stochastic rounding for element index (lo, hi ^ k1 = hk), exactly as
// sr_uniform computes it.
SL_DEV float sr_u(uint32_t lo, uint32_t hk, uint32_t k0) {
  const uint32_t h = lowbias32(lowbias32(lo ^ k0) ^ hk);
  return __fmul_rn(static_cast<float>(h >> 8), 5.9604644775390625e-08f);
}

// Code bits of one chunk (VEC codes of BITS bits), element 0 in the lowest bits.
template <int VEC, int BITS>
struct Codes {
  static constexpr int WORDS = VEC * BITS > 32 ? 2 : 1;
  uint32_t w[2] = {0U, 0U};
  SL_DEV void put(int i, uint32_t code) {  // code < 2^BITS, i compile-time
    if (i * BITS < 32) w[0] |= code << (i * BITS);
    else w[1] |= code << (i * BITS - 32);
  }
};

// ---- The lean path for 16-bit inputs (SPLITLORA_CODEC_LEAN16=1) ----
// The same packets as the path in compress_block, in fewer instructions per element: the bf16 and
// fp16 compress kernels are bound by instruction issue, not by HBM (the float32 ones, with half the
// elements per byte, reach the copy's bandwidth). Its source, built for the host, gives the CPU
// kernels' packets byte for byte (tests/csrc/test_lean16_host.py); not the default until a GPU run
// has checked what nvcc makes of it the same way (tests/csrc/test_codec_cuda.py runs both paths)
// and measured it.
//
//  - scale = rn(m / qmax) as q0 = rn(m * c), rem = fma(-q0, qmax, m), fma(rem, c, q0) with
//    c = rn(1 / qmax): three instructions instead of an IEEE division. Exact for every finite
//    bf16 and fp16 absmax m and qmax 7 and 127 (tests/csrc/test_lean16_arithmetic.py checks all
//    of them); float32 inputs keep __fdiv_rn.
//  - r = 1/scale by rcp.approx (at most 1 ulp off) and one Newton step: |r * scale - 1| <=
//    2^-24 + 2^-45, against 2^-24 for the correctly rounded reciprocal.
//  - b = fma(v, r, K), K = 1.5 * 2^23 + off, rounds the exact product p = v * r to an integer q
//    (b = K + q), and d = fma(v, r, -(b - K)) = rn(p - q) measures p's distance to the rounding
//    boundaries in one FMA. kTol's argument, with p in place of t: |p - v/scale| <= 128 *
//    (2^-24 + 2^-45) < 7.7e-6 and the IEEE quotient is within 3.9e-6 of v/scale, while |d| <
//    0.5 - kTol puts p more than kTol - 2^-25 > 3e-5 from q +- 0.5: both round to q. Elements
//    closer to a boundary take quantize_exact, as on the other path; |q| <= qmax as there.
//  - With off in K, the low byte of b's bits is the code q + off (in [1, 2^bits - 1]) and bits 8
//    to 21 are zero, so codes pack by shift-adds and byte permutes, without masks or XORs.
//  - Stochastic rounding: an IEEE division per element and no shortcut (see lean_chunk), with
//    the same scale, packing and addressing as above.
template <int QMAX>
SL_DEV float lean_scale(float m) {
  if constexpr (QMAX == 1) {
    return m;
  } else {
    constexpr float c = 1.0f / static_cast<float>(QMAX);
    const float q0 = __fmul_rn(m, c);
    const float rem = __fmaf_rn(-q0, static_cast<float>(QMAX), m);
    return __fmaf_rn(rem, c, q0);
  }
}

SL_DEV float lean_reciprocal(float s) {
  float r0;
#if defined(__CUDACC__)
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(s));
#else
  r0 = sl_host_rcp_approx(s);  // within 1 ulp of 1/s, as rcp.approx is (cuda_host_shim.h)
#endif
  const float e = __fmaf_rn(-s, r0, 1.0f);
  return __fmaf_rn(r0, e, r0);
}

// Codes of one chunk of 8 elements from the low bytes of b (code i < 2^BITS, bits 8..21 zero),
// element 0 in the lowest bits, as Codes::put lays them out.
template <int BITS>
SL_DEV void lean_pack(const uint32_t (&b)[8], uint32_t& lo, uint32_t& hi) {
  if constexpr (BITS == 8) {
    lo = __byte_perm(__byte_perm(b[0], b[1], 0x0040), __byte_perm(b[2], b[3], 0x0040), 0x5410);
    hi = __byte_perm(__byte_perm(b[4], b[5], 0x0040), __byte_perm(b[6], b[7], 0x0040), 0x5410);
  } else if constexpr (BITS == 4) {
    // (b1 << 4) + b0 adds disjoint bits below bit 8: code 0 | code 1 << 4 in the low byte.
    const uint32_t p01 = (b[1] << 4) + b[0], p23 = (b[3] << 4) + b[2];
    const uint32_t p45 = (b[5] << 4) + b[4], p67 = (b[7] << 4) + b[6];
    lo = __byte_perm(__byte_perm(p01, p23, 0x0040), __byte_perm(p45, p67, 0x0040), 0x5410);
    hi = 0U;
  } else {
    static_assert(BITS == 2, "bits 2, 4 or 8");
    const uint32_t p01 = (b[1] << 2) + b[0], p23 = (b[3] << 2) + b[2];
    const uint32_t p45 = (b[5] << 2) + b[4], p67 = (b[7] << 2) + b[6];
    lo = __byte_perm((p23 << 4) + p01, (p67 << 4) + p45, 0x0040);
    hi = 0U;
  }
}

// One chunk of a 16-bit input on the lean path: its group's absmax bits m, whether it is its
// group's first chunk (which writes the scale and the non-finite flag), the codes to code_slot.
// Stochastic rounding divides each element as codec.h specifies (IEEE division, then the floor and
// the element's uniform number): the reciprocal shortcut does not pay there, since the absmax
// element of every group lands next to an integer and sent whole warps down the exact path.
template <typename E, int BITS, bool STOCH, bool FULL>
SL_DEV void lean_chunk(const uint4& raw, uint32_t m, bool first, float* scale_slot,
                                           int* nonfinite, int64_t e0, int64_t numel, uint8_t* code_slot,
                                           uint64_t seed) {
  static_assert(Layout<E>::VEC == 8, "the lean path is for 16-bit inputs");
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int OFF = 1 << (BITS - 1);
  constexpr uint32_t MASK = (1U << BITS) - 1U;
  constexpr float K = kRne + static_cast<float>(OFF);
  constexpr uint32_t KBITS = static_cast<uint32_t>(kRneBits) + static_cast<uint32_t>(OFF);
  const float lim = 0.5f - kTol;
  Codes<8, BITS> out;
  if (m >= kNonFiniteAbsBits) {  // codes stay 0
    if (first) {
      *scale_slot = __uint_as_float(0x7fc00000U);
      *reinterpret_cast<volatile int*>(nonfinite) = 1;
    }
  } else {
    const float scale = lean_scale<QMAX>(__uint_as_float(m));
    if (first) *scale_slot = scale;
    if (scale == 0.0f) {  // all zero, or so small that the scale underflows: q = 0 everywhere
#pragma unroll
      for (int i = 0; i < 8; ++i) out.put(i, static_cast<uint32_t>(OFF));
    } else if constexpr (STOCH) {
      const uint32_t k0 = static_cast<uint32_t>(seed);
      const uint32_t lo0 = static_cast<uint32_t>(e0);
      const uint32_t hk = static_cast<uint32_t>(static_cast<uint64_t>(e0) >> 32) ^ static_cast<uint32_t>(seed >> 32);
      uint32_t b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float t = __fdiv_rn(elem<E>(raw, i), scale);
        const float fl = floorf(t);
        const int q = static_cast<int>(fl) + (sr_u(lo0 + i, hk, k0) < __fsub_rn(t, fl) ? 1 : 0);
        b[i] = static_cast<uint32_t>(min(max(q, -QMAX), QMAX) + OFF);  // the code, in the low byte
      }
      lean_pack<BITS>(b, out.w[0], out.w[1]);
    } else {
      // A normal reciprocal needs scale in [2^-125, 2^125]; outside, every element is exact. A
      // float16 group's nonzero scale always lies inside (from 2^-24 / 127 to 65504).
      const bool fast_ok = std::is_same<E, F16>::value || (scale >= 0x1p-125f && scale <= 0x1p125f);
      const float r = lean_reciprocal(scale);
      bool need_exact = !fast_ok;
      uint32_t b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float v = elem<E>(raw, i);
        const float bi = __fmaf_rn(v, r, K);
        const float d = __fmaf_rn(v, r, -__fsub_rn(bi, K));
        need_exact |= !(fabsf(d) < lim);  // NaN (r infinite) lands here too
        b[i] = __float_as_uint(bi);
      }
      if (need_exact) {  // rare: some element lies within kTol of a half-integer
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float v = elem<E>(raw, i);
          const float d = __fmaf_rn(v, r, -__fsub_rn(__fmaf_rn(v, r, K), K));
          if (!fast_ok || !(fabsf(d) < lim))
            b[i] = KBITS + static_cast<uint32_t>(min(max(quantize_exact<false>(v, scale, 0.0f), -QMAX), QMAX));
        }
      }
      lean_pack<BITS>(b, out.w[0], out.w[1]);
    }
    if (!FULL && e0 + 8 > numel) {  // the padding of the last group: code 0
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (e0 + i >= numel) {
          if (i * BITS < 32) out.w[0] &= ~(MASK << (i * BITS));
          else out.w[1] &= ~(MASK << (i * BITS - 32));
        }
      }
    }
  }
  store_codes<BITS>(code_slot, out.w[0], out.w[1]);
}

// The lean path's share of compress_block for one thread: its U chunks (row k holds chunk
// block_first + local + 32 k in raw[k], with its group's absmax bits in m[k]) quantized into the
// packet's scales and codes; tpg = 1 << log2_tpg chunks per group (both passed: the caller has
// both at hand). Block-local 32-bit chunk indices: a block covers whole groups, so its
// scales start at scales + block_first / tpg, and this thread's codes at a fixed offset per row.
template <typename E, int BITS, bool STOCH, bool FULL, int U>
SL_DEV void lean_thread_chunks(const uint4 (&raw)[U], const uint32_t (&m)[U], int64_t block_first, int local,
                               int log2_tpg, int tpg, int64_t nchunks, int64_t numel, float* scales,
                               uint8_t* codes, int* nonfinite, uint64_t seed) {
  constexpr int CODE_BYTES = Layout<E>::VEC * BITS / 8;
  float* block_scales = scales + (block_first >> log2_tpg);
  uint8_t* thread_codes = codes + (block_first + local) * CODE_BYTES;
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int lc = local + 32 * k;
    if (!FULL && block_first + lc >= nchunks) continue;
    lean_chunk<E, BITS, STOCH, FULL>(raw[k], m[k], (lc & (tpg - 1)) == 0, block_scales + (lc >> log2_tpg),
                                     nonfinite, (block_first + lc) * Layout<E>::VEC, numel,
                                     thread_codes + 32 * k * CODE_BYTES, seed);
  }
}

}  // namespace
}  // namespace splitlora
