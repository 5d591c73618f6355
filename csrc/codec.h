// The smashed-data wire format of splitlora, and the arithmetic every backend must share.
//
// A packet is one contiguous little-endian byte string:
//
//   offset  size  field
//   0       4     magic "SLCD"
//   4       2     format version (u16) = 1
//   6       1     dtype code (u8): 0 float32, 1 float16, 2 bfloat16 (the dtype decompress returns)
//   7       1     bits (u8): 2, 4, 8 (quantized) or 16 (bfloat16 passthrough)
//   8       1     flags (u8): bit0 = stochastic rounding was used; other bits must be 0
//   9       1     ndim (u8) <= 8
//   10      2     reserved (u16) = 0
//   12      4     group_size (u32): power of two in [16, 4096]
//   16      8     numel (u64) = product of the dims (1 for ndim 0)
//   24      64    shape: int64[8], dims beyond ndim are 0
//   88      4     CRC32 (zlib/IEEE polynomial) of bytes [0, 88)
//   92      4     reserved (u32) = 0
//   96            scales: float32[num_groups], then zero bytes up to a multiple of 16
//                 (absent for bits 16)
//   ...           codes: num_groups blocks of group_size*bits/8 bytes (the last group padded
//                 with zero codes); for bits 16, numel bfloat16 values instead (2*numel bytes)
//
// Groups are runs of group_size consecutive elements of the tensor in row-major (contiguous)
// order; num_groups = ceil(numel / group_size). Inside a group, element j has code
// q + 2^(bits-1) (unsigned) stored in bits [(j % per_byte)*bits, +bits) of byte j / per_byte,
// where per_byte = 8 / bits.
//
// Quantization, specified exactly so that every backend writes identical bytes:
//   v      = float32(x)                                  (exact for f16 and bf16 inputs)
//   absmax = max |v| over the group                       (exact)
//   scale  = absmax / qmax, IEEE float32 division, qmax = 2^(bits-1) - 1
//   round to nearest: q = round_half_even(v / scale)      (IEEE division, never a reciprocal)
//   stochastic:       t = v / scale; f = floor(t); q = f + (u < t - f ? 1 : 0)
//                     with u = (hash(seed, element index) >> 8) * 2^-24, hash below
//   q = clamp(q, -qmax, qmax); q = 0 where scale == 0
//   decode: y = float32(q) * scale, then cast (round to nearest even) to the packet's dtype.
// Private compress (splitlora.codec.compress with clip=...): before the steps above, element i of
// row r = i / (numel / rows) becomes v = float32(float32(x_i * factor_r) + noise_i), or 0 where
// factor_r == 0 (padding), with noise_i = float32(sigma * hash_gaussian(noise_seed, i)); the
// per-row factors (min(1, clip / norm)) are computed in torch for every backend. The packet is
// an ordinary packet of x's dtype: the format does not change.
// No fused multiply-add and no fast-math anywhere: a contracted a*b+c rounds differently and
// the packets of two backends would no longer match byte for byte.
//
// The header is built and parsed in Python (splitlora/codec.py); the kernels receive the 96
// header bytes and write them, the scales and the codes straight into the packet they allocate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SL_HD __host__ __device__ __forceinline__
#else
#define SL_HD inline
#endif

namespace splitlora {

constexpr int kFormatVersion = 1;
constexpr int64_t kHeaderBytes = 96;
constexpr int kMaxNdim = 8;
constexpr int64_t kMinGroupSize = 16;
constexpr int64_t kMaxGroupSize = 4096;
constexpr int kDtypeF32 = 0;
constexpr int kDtypeF16 = 1;
constexpr int kDtypeBF16 = 2;

// Packet layout sizes, the single source of truth for the C++ side (codec.py mirrors them).
SL_HD int64_t num_groups(int64_t numel, int64_t group_size) {
  return (numel + group_size - 1) / group_size;
}
SL_HD int64_t scale_bytes(int64_t numel, int64_t group_size, int bits) {
  if (bits == 16) return 0;
  return (num_groups(numel, group_size) * 4 + 15) / 16 * 16;
}
SL_HD int64_t group_code_bytes(int64_t group_size, int bits) { return group_size * bits / 8; }
SL_HD int64_t code_bytes(int64_t numel, int64_t group_size, int bits) {
  if (bits == 16) return numel * 2;
  return num_groups(numel, group_size) * group_code_bytes(group_size, bits);
}
SL_HD int64_t packet_bytes(int64_t numel, int64_t group_size, int bits) {
  return kHeaderBytes + scale_bytes(numel, group_size, bits) + code_bytes(numel, group_size, bits);
}

// The counter-based hash behind stochastic rounding: two rounds of Chris Wellons' "lowbias32"
// integer mixer keyed by the 62-bit seed, over the 64-bit element index. Counter-based (no
// state) so any thread can draw the number of any element, and 32-bit only so the plain-torch
// reference can reproduce it with int64 tensors masked to 32 bits.
SL_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
SL_HD uint32_t sr_hash(uint64_t seed, uint64_t index) {
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(index >> 32);
  return lowbias32(lowbias32(lo ^ k0) ^ hi ^ k1);
}
// 24 random bits scaled by 2^-24: exact in float32 and in [0, 1).
SL_HD float sr_uniform(uint64_t seed, uint64_t index) {
  return static_cast<float>(sr_hash(seed, index) >> 8) * 5.9604644775390625e-08f;
}

// Gaussian noise of the private compress (clip + noise + quantize in one pass; the spec and its
// reasons are in splitlora/privacy/noise.py): Box-Muller on two counter hashes of element i, in
// float64, so every backend and the plain-torch oracle draw the same noise for the same seed.
// (h + 1) * 2^-32 lies in (0, 1]: log never sees 0. Only multiplications and a negation around
// the libm calls, so no multiply-add can be contracted.
SL_HD double hash_gaussian(uint64_t seed, uint64_t index) {
  const double u1 = (static_cast<double>(sr_hash(seed, 2 * index)) + 1.0) * 2.3283064365386963e-10;
  const double u2 = static_cast<double>(sr_hash(seed, 2 * index + 1)) * 2.3283064365386963e-10;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

SL_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
SL_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
SL_HD float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }
// Round to nearest even, as c10::BFloat16 and torch's casts do; NaN becomes the canonical quiet
// NaN. Finite values beyond the bfloat16 range round to +-Inf.
SL_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffU) > 0x7f800000U) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffU + ((u >> 16) & 1U)) >> 16);
}

// IEEE half <-> float32 for the CPU kernels (the CUDA kernels use the cuda_fp16 intrinsics),
// after Marat Dukhan's FP16 library, the algorithm c10::Half uses too. Restated here with only
// unconditional float arithmetic and integer selects so that GCC vectorizes the loops that call
// them; results are exact (to float32) and round to nearest even (to half), like torch's casts.
// The float32 -> half path multiplies, then adds: it relies on no FMA contraction, which holds
// because the extension is never compiled for an FMA target (see codec_cpu.cpp).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000U;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0U << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126U << 23)) - 0.5f;
  // A mask, not ?: -- GCC would sink the float math into one arm of a ?:, and then refuses to
  // vectorize it (a float op that may trap cannot be made unconditional under -ftrapping-math).
  const uint32_t is_denormal = 0U - static_cast<uint32_t>(two_w < (1U << 27));
  const uint32_t result =
      sign | (f32_bits(denormalized) & is_denormal) | (f32_bits(normalized) & ~is_denormal);
  return f32_from_bits(result);
}
inline uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_bits(f);
  const float abs_f = f32_from_bits(w & 0x7fffffffU);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000U;
  uint32_t bias = shl1_w & 0xFF000000U;
  bias = bias < 0x71000000U ? 0x71000000U : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000U) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00U;
  const uint32_t mantissa_bits = bits & 0x00000FFFU;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t is_nan = 0U - static_cast<uint32_t>(shl1_w > 0xFF000000U);
  return static_cast<uint16_t>((sign >> 16) | (0x7E00U & is_nan) | (nonsign & ~is_nan));
}

// Bit patterns of |v| order like the values themselves, and every NaN or Inf lies at or above
// this threshold: an integer max over |v| gives the exact absmax and flags non-finite input
// with one compare per group instead of a separate pass over x.
constexpr uint32_t kNonFiniteAbsBits = 0x7f800000U;

// Round half to even for |t| < 2^22 without SSE4.1 or libm: adding 1.5*2^23 pushes the
// fraction out of the float32 mantissa, and the hardware rounds it in the default mode.
// (A fast-math build would fold this to t; the extension is built without it.) Used on the CPU,
// where it vectorizes with plain SSE2; the CUDA kernels use rintf, which gives the same result.
SL_HD float rne_small(float t) { return (t + 12582912.0f) - 12582912.0f; }

}  // namespace splitlora

namespace splitlora {

// Argument checks shared by the CPU and CUDA kernels; nullptr when the arguments are valid.
// The Python face validates first and raises ValueError, these only guard direct op calls.
inline const char* check_codec_args(int64_t bits, int64_t group_size) {
  if (bits != 2 && bits != 4 && bits != 8 && bits != 16) return "bits must be 2, 4, 8 or 16";
  if (group_size < kMinGroupSize || group_size > kMaxGroupSize || (group_size & (group_size - 1)) != 0)
    return "group_size must be a power of two in [16, 4096]";
  return nullptr;
}

}  // namespace splitlora
