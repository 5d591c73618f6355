// The CUDA intrinsics that codec_chunk.cuh uses, restated in ISO C++ for a host build of it (the
// tests compile that build to run the CUDA kernels' per-chunk arithmetic without a GPU; the
// extension itself never includes this file).
//
// Each function rounds as its CUDA namesake: IEEE float32 operations rounded to nearest even,
// one rounding for the fused multiply-add. That holds when the host compiler keeps float
// arithmetic in float32 and does not contract a*b+c: x86-64 (SSE) with -ffp-contract=off, as
// tests/csrc/test_lean16_host.py compiles it. The one intrinsic with no exact specification,
// rcp.approx (at most 1 ulp from 1/s), is the correctly rounded reciprocal moved by
// sl_host_rcp_ulps ulps, so the tests can try both neighbours too.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_shim.h is for host builds of codec_chunk.cuh; nvcc uses the real intrinsics"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
// Round half to even, in the default rounding mode (nearbyint honours it; |t| < 2^31 here).
inline int __float2int_rn(float t) { return static_cast<int>(std::nearbyintf(t)); }

inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }

// Per 16-bit half, the unsigned maximum.
inline uint32_t __vmaxu2(uint32_t a, uint32_t b) {
  const uint32_t lo = max(a & 0xffffU, b & 0xffffU);
  const uint32_t hi = max(a >> 16, b >> 16);
  return (hi << 16) | lo;
}

// Byte i of the result is byte (selector nibble i & 7) of the 8 bytes {y (bytes 4-7), x (0-3)}.
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0U;
  for (int i = 0; i < 4; ++i) {
    const uint32_t sel = (s >> (4 * i)) & 7U;
    r |= static_cast<uint32_t>((bytes >> (8 * sel)) & 0xffU) << (8 * i);
  }
  return r;
}

// rcp.approx.ftz.f32 stand-in: rn(1/s) moved by sl_host_rcp_ulps ulps (-1, 0 or 1 in the tests).
inline int sl_host_rcp_ulps = 0;
inline float sl_host_rcp_approx(float s) {
  float r = 1.0f / s;
  for (int i = 0; i < sl_host_rcp_ulps; ++i) r = std::nextafterf(r, INFINITY);
  for (int i = 0; i > sl_host_rcp_ulps; --i) r = std::nextafterf(r, -INFINITY);
  return r;
}
