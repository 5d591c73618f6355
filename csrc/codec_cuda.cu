// CUDA kernels of the smashed-data codec (format and arithmetic: codec.h).
//
// Memory layout of the work. A "chunk" is the 16 bytes of input one vector load brings in (8
// bfloat16/float16 or 4 float32 elements; its codes are 1 to 8 contiguous packet bytes). A warp
// owns U*32 consecutive chunks as U rows of 32: in row k, lane l holds chunk k*32 + l, so every
// load and every code store of a row is one coalesced access of the warp. Each thread issues all
// its U loads before it needs any of them; compress, which computes the most per byte, gives each
// thread 8 chunks (128 bytes in flight), the others 4096 elements per 128-thread block. A
// compress block covers a whole number of the largest groups (4096 elements), so a group never
// spans two blocks; its absmax is reduced with warp shuffles (groups of up to 32 chunks), across
// a thread's own rows, or through shared memory (groups spanning several warps).
//
// Division. The format asks for q = round(v / scale) with IEEE division, which costs more
// instructions than the rest of the element's work. The kernels multiply by the correctly
// rounded reciprocal instead, which gives the same q except when v/scale lies within 2^-15 of a
// rounding boundary (a half-integer; for stochastic rounding an integer or the element's random
// threshold): the product is within 2e-5 of the IEEE quotient (proof at kTol). A chunk with such
// an element takes the IEEE division for it, so every byte still matches the CPU kernels.
//
// Rounding uses explicit IEEE intrinsics (__fdiv_rn, __fmul_rn, __fadd_rn): nvcc contracts a*b+c
// into FMA by default, and the packets must match the CPU kernels byte for byte.
//
// Besides the ops of the schema (compress, decompress: flags returned as device tensors), the
// file registers _compress_sync, _decompress_sync and _packet_header for the Python face on CUDA:
// they report the flag (or the header) through pinned host memory and one stream synchronisation,
// where the ops need a memset for the flag and the caller a device-to-host copy to read it.
#if defined(SPLITLORA_WITH_CUDA)

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "codec.h"
#include "codec_chunk.cuh"
#include "op_common.h"

namespace splitlora {
namespace {

// The header reaches the kernel as a launch argument (no host-to-device copy of its 96 bytes),
// as 24 words read only at compile-time indices: indexing a by-value kernel argument with a
// run-time index makes nvcc copy the whole struct to a per-thread stack frame.
struct HeaderArg {
  uint32_t words[kHeaderBytes / 4];
};

// The chunk of elements [e0, e0 + VEC), zeros past numel. FULL: the caller knows it is whole.
template <typename E, bool FULL>
__device__ __forceinline__ uint4 load_chunk(const typename E::storage* __restrict__ x, int64_t e0, int64_t numel) {
  using S = typename E::storage;
  constexpr int VEC = Layout<E>::VEC;
  if (FULL || e0 + VEC <= numel) return __ldcs(reinterpret_cast<const uint4*>(x + e0));
  uint4 c = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (e0 + i < numel) {
      if constexpr (sizeof(S) == 4) {
        set_word(c, i, __float_as_uint(x[e0 + i]));
      } else {
        const uint32_t h = x[e0 + i];
        set_word(c, i >> 1, word_of(c, i >> 1) | ((i & 1) ? (h << 16) : h));
      }
    }
  }
  return c;
}

// Stores a chunk to elements [e0, e0 + VEC), dropping those past numel.
template <typename E, bool FULL>
__device__ __forceinline__ void store_chunk(typename E::storage* __restrict__ y, int64_t e0, int64_t numel, const uint4& c) {
  using S = typename E::storage;
  constexpr int VEC = Layout<E>::VEC;
  if (FULL || e0 + VEC <= numel) {
    *reinterpret_cast<uint4*>(y + e0) = c;
    return;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (e0 + i < numel) {
      if constexpr (sizeof(S) == 4) y[e0 + i] = __uint_as_float(word_of(c, i));
      else y[e0 + i] = static_cast<uint16_t>(raw_elem<E>(c, i));
    }
  }
}

// Packs float32 values into the storage of E (round to nearest even, as the CPU kernels do).
template <typename E>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same<E, BF16>::value) {
    // f32_to_bf16 without its NaN branch: the decoder never produces NaN (scales are finite and
    // non-negative, codes are integers). Integer rounding, as codec.h specifies it.
    const uint32_t ua = __float_as_uint(a), ub = __float_as_uint(b);
    const uint32_t ra = (ua + 0x7fffU + ((ua >> 16) & 1U)) >> 16;
    const uint32_t rb = (ub + 0x7fffU + ((ub >> 16) & 1U)) & 0xffff0000U;
    return ra | rb;
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <int BYTES>
__device__ __forceinline__ uint2 load_codes(const uint8_t* p) {
  if constexpr (BYTES == 8) return __ldg(reinterpret_cast<const uint2*>(p));
  else if constexpr (BYTES == 4) return make_uint2(__ldg(reinterpret_cast<const unsigned int*>(p)), 0);
  else if constexpr (BYTES == 2) return make_uint2(__ldg(reinterpret_cast<const unsigned short*>(p)), 0);
  else return make_uint2(__ldg(p), 0);
}

// Thread 0 of block 0 writes the header and the zero padding after the scales (pad is 0, 4, 8
// or 12 bytes at a 4-byte aligned offset).
__device__ __forceinline__ void write_header(uint8_t* packet, const HeaderArg& header, int64_t pad_at, int pad) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  uint32_t* out = reinterpret_cast<uint32_t*>(packet);
#pragma unroll
  for (int i = 0; i < static_cast<int>(kHeaderBytes / 4); ++i) out[i] = header.words[i];
  uint32_t* zeros = reinterpret_cast<uint32_t*>(packet + pad_at);
  for (int i = 0; i < pad / 4; ++i) zeros[i] = 0U;
}

// The compress kernels give each thread 8 chunks (128 bytes of input in flight per thread for
// every dtype); a block then covers 8192 bfloat16/float16 or 4096 float32 elements, a whole
// number of the largest groups.
template <typename E>
struct CompressLayout {
  static constexpr int VEC = Layout<E>::VEC;
  static constexpr int U = 8;
  static constexpr int BLOCK_ELEMS = kThreads * U * VEC;
  static_assert(BLOCK_ELEMS % kMaxGroupSize == 0, "a group must never span two blocks");
};

// Quantizes chunks [blockIdx.x * kThreads * U, +kThreads * U) of the nchunks = num_groups *
// chunks-per-group chunks (the padding of the last group included).
template <typename E, int BITS, bool STOCH, bool FULL, bool LEAN>
__device__ __forceinline__ void compress_block(const typename E::storage* __restrict__ x, int64_t numel,
                                               int log2_tpg, int64_t nchunks, uint8_t* __restrict__ packet,
                                               int64_t codes_off, uint64_t seed, int* nonfinite,
                                               uint32_t* warp_max) {
  constexpr int VEC = CompressLayout<E>::VEC;
  constexpr int U = CompressLayout<E>::U;
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int OFF = 1 << (BITS - 1);
  constexpr uint32_t MASK = (1U << BITS) - 1U;
  constexpr int CODE_BYTES = VEC * BITS / 8;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + warp * (32 * U) + lane;

  uint4 raw[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    raw[k] = (FULL || c < nchunks) ? load_chunk<E, FULL>(x, c * VEC, numel) : make_uint4(0, 0, 0, 0);
  }
  // Integer max over |v| bit patterns: the exact absmax, and NaN/Inf land at >= 0x7f800000.
  uint32_t m[U];
#pragma unroll
  for (int k = 0; k < U; ++k) m[k] = chunk_absmax_bits<E>(raw[k]);
  const int tpg = 1 << log2_tpg;  // chunks per group; uniform over the launch
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    if (off < tpg) {
#pragma unroll
      for (int k = 0; k < U; ++k) m[k] = max(m[k], __shfl_xor_sync(0xffffffffU, m[k], off));
    }
  }
  if (tpg > 32) {
    const int rows = tpg >> 5;  // rows per group
#pragma unroll
    for (int s = 1; s < U; s <<= 1) {
      if (s < rows) {
#pragma unroll
        for (int k = 0; k < U; ++k) m[k] = max(m[k], m[k ^ s]);
      }
    }
    if (rows > U) {  // the group spans rows / U warps of the block
      if (lane == 0) warp_max[warp] = m[0];
      __syncthreads();
      const int wpg = rows / U;
      const int first = warp & ~(wpg - 1);
      uint32_t a = 0;
      for (int w = 0; w < wpg; ++w) a = max(a, warp_max[first + w]);
#pragma unroll
      for (int k = 0; k < U; ++k) m[k] = a;
    }
  }

  float* scales = reinterpret_cast<float*>(packet + kHeaderBytes);
  uint8_t* codes = packet + codes_off;
  if constexpr (LEAN) {
    lean_thread_chunks<E, BITS, STOCH, FULL, U>(raw, m, static_cast<int64_t>(blockIdx.x) * (kThreads * U),
                                                warp * (32 * U) + lane, log2_tpg, tpg, nchunks, numel, scales,
                                                codes, nonfinite, seed);
    return;
  }
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const float lim = 0.5f - kTol;
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (!FULL && c >= nchunks) continue;
    const bool first = (c & (tpg - 1)) == 0;
    const int64_t g = c >> log2_tpg;
    const int64_t e0 = c * VEC;
    Codes<VEC, BITS> out;
    if (m[k] >= kNonFiniteAbsBits) {  // codes stay 0
      if (first) {
        scales[g] = __uint_as_float(0x7fc00000U);
        *reinterpret_cast<volatile int*>(nonfinite) = 1;
      }
    } else {
      const float scale = __fdiv_rn(__uint_as_float(m[k]), static_cast<float>(QMAX));
      if (first) scales[g] = scale;
      if (scale == 0.0f) {  // all zero, or so small that the scale underflows: q = 0 everywhere
#pragma unroll
        for (int i = 0; i < VEC; ++i) out.put(i, static_cast<uint32_t>(OFF));
      } else {
        const float r = __frcp_rn(scale);
        // The shortcut needs a normal reciprocal: scale in [2^-125, 2^125].
        const bool fast_ok = scale >= 0x1p-125f && scale <= 0x1p125f;
        bool need_exact = !fast_ok;
        if constexpr (!STOCH) {
          // t + 1.5 * 2^23 rounds t to an integer q, held in the low bits of the sum; the code is
          // (q + OFF) mod 2^BITS = (q mod 2^BITS) ^ OFF. No clamp: |t| <= qmax * (1 + 2^-22) on
          // this path, so |q| <= qmax already.
          uint32_t big[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float t = __fmul_rn(elem<E>(raw[k], i), r);
            const float b = __fadd_rn(t, kRne);
            need_exact |= !(fabsf(__fsub_rn(t, __fsub_rn(b, kRne))) < lim);
            big[i] = __float_as_uint(b);
          }
          if (need_exact) {  // rare: some element lies within kTol of a half-integer
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float v = elem<E>(raw[k], i);
              const float t = __fmul_rn(v, r);
              if (!fast_ok || !(fabsf(__fsub_rn(t, __fsub_rn(__fadd_rn(t, kRne), kRne))) < lim))
                big[i] = static_cast<uint32_t>(kRneBits + min(max(quantize_exact<false>(v, scale, 0.0f), -QMAX), QMAX));
            }
          }
          if constexpr (BITS == 8) {
            const uint32_t lo = __byte_perm(__byte_perm(big[0], big[1], 0x0040), __byte_perm(big[2], big[3], 0x0040), 0x5410);
            out.w[0] = lo ^ 0x80808080U;
            if constexpr (VEC == 8) {
              const uint32_t hi = __byte_perm(__byte_perm(big[4], big[5], 0x0040), __byte_perm(big[6], big[7], 0x0040), 0x5410);
              out.w[1] = hi ^ 0x80808080U;
            }
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) out.put(i, (big[i] & MASK) ^ static_cast<uint32_t>(OFF));
          }
        } else {
          float u[VEC];
          int q[VEC];
          const uint32_t lo0 = static_cast<uint32_t>(e0);
          const uint32_t hk = static_cast<uint32_t>(static_cast<uint64_t>(e0) >> 32) ^ k1;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            u[i] = sr_u(lo0 + i, hk, k0);
            const float v = elem<E>(raw[k], i);
            const float t = __fmul_rn(v, r);
            const float fl = floorf(t);
            const float fr = __fsub_rn(t, fl);
            // v == 0 gives t == 0 exactly both ways (and q = 0: u < 0 never holds).
            need_exact |= !(v == 0.0f || (fr > kTol && fr < 1.0f - kTol && fabsf(__fsub_rn(u[i], fr)) > kTol));
            q[i] = static_cast<int>(fl) + (u[i] < fr ? 1 : 0);
          }
          if (need_exact) {  // rare: some element lies within kTol of an integer or of its u
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float v = elem<E>(raw[k], i);
              const float t = __fmul_rn(v, r);
              const float fr = __fsub_rn(t, floorf(t));
              if (!fast_ok || !(v == 0.0f || (fr > kTol && fr < 1.0f - kTol && fabsf(__fsub_rn(u[i], fr)) > kTol)))
                q[i] = quantize_exact<true>(v, scale, u[i]);
            }
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) out.put(i, static_cast<uint32_t>(min(max(q[i], -QMAX), QMAX) + OFF));
        }
      }
      if (!FULL && e0 + VEC > numel) {  // the padding of the last group: code 0
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (e0 + i >= numel) {
            if (i * BITS < 32) out.w[0] &= ~(MASK << (i * BITS));
            else out.w[1] &= ~(MASK << (i * BITS - 32));
          }
        }
      }
    }
    store_codes<CODE_BYTES>(codes + c * CODE_BYTES, out.w[0], out.w[1]);
  }
}

template <typename E, int BITS, bool STOCH, bool LEAN>
__global__ void __launch_bounds__(kThreads) compress_kernel(const typename E::storage* __restrict__ x, int64_t numel,
                                                            int log2_tpg, int64_t nchunks,
                                                            uint8_t* __restrict__ packet, int64_t codes_off,
                                                            uint64_t seed, HeaderArg header, int* nonfinite) {
  __shared__ uint32_t warp_max[kThreads / 32];
  const int64_t ng = nchunks >> log2_tpg;
  write_header(packet, header, kHeaderBytes + 4 * ng, static_cast<int>(codes_off - kHeaderBytes - 4 * ng));
  if (static_cast<int64_t>(blockIdx.x + 1) * CompressLayout<E>::BLOCK_ELEMS <= numel)
    compress_block<E, BITS, STOCH, true, LEAN>(x, numel, log2_tpg, nchunks, packet, codes_off, seed, nonfinite, warp_max);
  else
    compress_block<E, BITS, STOCH, false, LEAN>(x, numel, log2_tpg, nchunks, packet, codes_off, seed, nonfinite, warp_max);
}

template <typename E, int BITS, bool FULL>
__device__ __forceinline__ void decompress_block(const uint8_t* __restrict__ packet, int64_t numel, int log2_gs,
                                                 int64_t nchunks, int64_t codes_off,
                                                 typename E::storage* __restrict__ y, int* bad_scales) {
  constexpr int VEC = Layout<E>::VEC;
  constexpr int U = Layout<E>::U;
  constexpr int OFF = 1 << (BITS - 1);
  constexpr uint32_t MASK = (1U << BITS) - 1U;
  constexpr int CODE_BYTES = VEC * BITS / 8;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + warp * (32 * U) + lane;
  const float* scales = reinterpret_cast<const float*>(packet + kHeaderBytes);
  const uint8_t* codes = packet + codes_off;

  uint2 cw[U];
  float sc[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (FULL || c < nchunks) {
      cw[k] = load_codes<CODE_BYTES>(codes + c * CODE_BYTES);
      sc[k] = __ldg(scales + ((c * VEC) >> log2_gs));
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (!FULL && c >= nchunks) continue;
    float scale = sc[k];
    if (!(scale >= 0.0f && scale <= 3.402823466e+38f)) {
      if (((c * VEC) & ((int64_t{1} << log2_gs) - 1)) == 0) *reinterpret_cast<volatile int*>(bad_scales) = 1;
      scale = 0.0f;
    }
    float v[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint32_t w = (i * BITS < 32) ? cw[k].x : cw[k].y;
      const uint32_t code = (w >> ((i * BITS) & 31)) & MASK;
      // float(code - OFF), exactly: the integer sits in the low mantissa bits of 1.5 * 2^23 + code.
      const float qf = __fsub_rn(__uint_as_float(static_cast<uint32_t>(kRneBits) + code), kRne + static_cast<float>(OFF));
      v[i] = __fmul_rn(qf, scale);
    }
    uint4 out;
    if constexpr (sizeof(typename E::storage) == 4) {
      out = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
    } else {
      out = make_uint4(pack2<E>(v[0], v[1]), pack2<E>(v[2], v[3]), pack2<E>(v[4], v[5]), pack2<E>(v[6], v[7]));
    }
    store_chunk<E, FULL>(y, c * VEC, numel, out);
  }
}

template <typename E, int BITS>
__global__ void __launch_bounds__(kThreads) decompress_kernel(const uint8_t* __restrict__ packet, int64_t numel,
                                                              int log2_gs, int64_t nchunks, int64_t codes_off,
                                                              typename E::storage* __restrict__ y, int* bad_scales) {
  if (static_cast<int64_t>(blockIdx.x + 1) * kBlockElems <= numel)
    decompress_block<E, BITS, true>(packet, numel, log2_gs, nchunks, codes_off, y, bad_scales);
  else
    decompress_block<E, BITS, false>(packet, numel, log2_gs, nchunks, codes_off, y, bad_scales);
}

// bits 16: bfloat16 passthrough. Chunks are 16 bytes of the input.
template <typename E, bool FULL>
__device__ __forceinline__ void encode_bf16_block(const typename E::storage* __restrict__ x, int64_t numel,
                                                  int64_t nchunks, uint8_t* __restrict__ packet, int* nonfinite) {
  constexpr int VEC = Layout<E>::VEC;
  constexpr int U = Layout<E>::U;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + warp * (32 * U) + lane;
  uint16_t* out = reinterpret_cast<uint16_t*>(packet + kHeaderBytes);
  uint4 raw[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    raw[k] = (FULL || c < nchunks) ? load_chunk<E, FULL>(x, c * VEC, numel) : make_uint4(0, 0, 0, 0);
  }
  uint32_t amax = 0;
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (!FULL && c >= nchunks) continue;
    uint32_t h[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      h[i] = f32_to_bf16(elem<E>(raw[k], i));
      amax = max(amax, h[i] & 0x7fffU);
    }
    const int64_t e0 = c * VEC;
    if (FULL || e0 + VEC <= numel) {
      if constexpr (VEC == 8) {
        *reinterpret_cast<uint4*>(out + e0) =
            make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
      } else {
        *reinterpret_cast<uint2*>(out + e0) = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (e0 + i < numel) out[e0 + i] = static_cast<uint16_t>(h[i]);
    }
  }
  if (amax >= 0x7f80U) *reinterpret_cast<volatile int*>(nonfinite) = 1;
}

template <typename E>
__global__ void __launch_bounds__(kThreads) encode_bf16_kernel(const typename E::storage* __restrict__ x, int64_t numel,
                                                               int64_t nchunks, uint8_t* __restrict__ packet,
                                                               HeaderArg header, int* nonfinite) {
  write_header(packet, header, kHeaderBytes, 0);
  if (static_cast<int64_t>(blockIdx.x + 1) * kBlockElems <= numel)
    encode_bf16_block<E, true>(x, numel, nchunks, packet, nonfinite);
  else
    encode_bf16_block<E, false>(x, numel, nchunks, packet, nonfinite);
}

// Chunks are 16 bytes of the output here.
template <typename E, bool FULL>
__device__ __forceinline__ void decode_bf16_block(const uint8_t* __restrict__ packet, int64_t numel, int64_t nchunks,
                                                  typename E::storage* __restrict__ y) {
  constexpr int VEC = Layout<E>::VEC;
  constexpr int U = Layout<E>::U;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + warp * (32 * U) + lane;
  const uint16_t* in = reinterpret_cast<const uint16_t*>(packet + kHeaderBytes);
  uint4 raw[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (FULL || c < nchunks) {
      if constexpr (VEC == 8) {
        raw[k] = load_chunk<BF16, FULL>(in, c * VEC, numel);
      } else {
        const int64_t e0 = c * VEC;
        if (FULL || e0 + VEC <= numel) {
          const uint2 w = __ldcs(reinterpret_cast<const uint2*>(in + e0));
          raw[k] = make_uint4(w.x << 16, w.x & 0xffff0000U, w.y << 16, w.y & 0xffff0000U);
        } else {
          raw[k] = make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            if (e0 + i < numel) set_word(raw[k], i, static_cast<uint32_t>(in[e0 + i]) << 16);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t c = base + 32 * k;
    if (!FULL && c >= nchunks) continue;
    uint4 out = raw[k];  // bfloat16 out: the bits themselves; float32 out: already widened
    if constexpr (std::is_same<E, F16>::value) {
      const uint4 r = raw[k];
      out = make_uint4(pack2<E>(elem<BF16>(r, 0), elem<BF16>(r, 1)), pack2<E>(elem<BF16>(r, 2), elem<BF16>(r, 3)),
                       pack2<E>(elem<BF16>(r, 4), elem<BF16>(r, 5)), pack2<E>(elem<BF16>(r, 6), elem<BF16>(r, 7)));
    }
    store_chunk<E, FULL>(y, c * VEC, numel, out);
  }
}

template <typename E>
__global__ void __launch_bounds__(kThreads) decode_bf16_kernel(const uint8_t* __restrict__ packet, int64_t numel,
                                                               int64_t nchunks, typename E::storage* __restrict__ y) {
  if (static_cast<int64_t>(blockIdx.x + 1) * kBlockElems <= numel)
    decode_bf16_block<E, true>(packet, numel, nchunks, y);
  else
    decode_bf16_block<E, false>(packet, numel, nchunks, y);
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// SPLITLORA_CODEC_LEAN16: 1 compresses bfloat16/float16 on the lean path above, 0 or unset on
// the established one. Read at every launch, so a process can compare both.
bool lean16_enabled() {
  const char* v = std::getenv("SPLITLORA_CODEC_LEAN16");
  if (v == nullptr || v[0] == '\0') return false;
  const std::string_view s(v);
  TORCH_CHECK(s == "0" || s == "1", "SPLITLORA_CODEC_LEAN16 must be 0 or 1, got '", s, "'");
  return s == "1";
}

unsigned int grid_for(int64_t chunks, int chunks_per_block) {
  const int64_t blocks = (chunks + chunks_per_block - 1) / chunks_per_block;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "splitlora codec: tensor too large for one launch");
  return static_cast<unsigned int>(blocks > 0 ? blocks : 1);  // block 0 writes the header
}

// Per-thread pinned host words the sync entry points use for their flag and header: written by
// the kernels (or a copy) through the device mapping, read by the host after one stream sync.
// One call at a time per thread, and the call syncs before it returns, so no word is ever shared.
// Layout: the flag word at 0, the header copy at 64.
struct PinnedScratch {
  uint8_t* host = nullptr;
  uint8_t* dev = nullptr;  // the same memory as the kernels address it (== host under UVA)
  ~PinnedScratch() {
    if (host != nullptr) (void)cudaFreeHost(host);
  }
  void init() {
    if (host != nullptr) return;
    void* p = nullptr;
    void* d = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, 256, cudaHostAllocPortable | cudaHostAllocMapped));
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
    host = static_cast<uint8_t*>(p);
    dev = static_cast<uint8_t*>(d);
  }
  // Clears the flag and returns its device address; the host store is fenced before the launch
  // that follows, so a kernel's write of 1 can never be overtaken by it.
  int* reset_flag() {
    init();
    *reinterpret_cast<volatile int*>(host) = 0;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return reinterpret_cast<int*>(dev);
  }
  int flag() const { return *reinterpret_cast<const volatile int*>(host); }
  uint8_t* header_staging() {
    init();
    return host + 64;
  }
};
thread_local PinnedScratch pinned_scratch;

void launch_compress(const at::Tensor& x, const HeaderArg& h, int64_t bits, int64_t group_size, bool stochastic,
                     int64_t seed, uint8_t* p, int* f, cudaStream_t stream) {
  const int64_t numel = x.numel();
  const int b = static_cast<int>(bits);
  dispatch_dtype<F32, F16, BF16>(x.scalar_type(), [&](auto e) {
    using E = decltype(e);
    constexpr int VEC = Layout<E>::VEC;
    constexpr int per_block = kThreads * Layout<E>::U;
    const auto* xp = static_cast<const typename E::storage*>(x.data_ptr());
    if (b == 16) {
      const int64_t nchunks = (numel + VEC - 1) / VEC;
      encode_bf16_kernel<E><<<grid_for(nchunks, per_block), kThreads, 0, stream>>>(xp, numel, nchunks, p, h, f);
      return;
    }
    const int64_t ng = num_groups(numel, group_size);
    const int64_t codes_off = kHeaderBytes + scale_bytes(numel, group_size, b);
    const int log2_tpg = log2_exact(group_size / VEC);
    const int64_t nchunks = ng * (group_size / VEC);
    const unsigned int grid = grid_for(nchunks, kThreads * CompressLayout<E>::U);
    dispatch_bits(bits, [&](auto bits_c) {
      constexpr int B = decltype(bits_c)::value;
      const uint64_t s = stochastic ? static_cast<uint64_t>(seed) : 0;
      if constexpr (VEC == 8) {
        if (lean16_enabled()) {
          if (stochastic)
            compress_kernel<E, B, true, true><<<grid, kThreads, 0, stream>>>(xp, numel, log2_tpg, nchunks, p,
                                                                             codes_off, s, h, f);
          else
            compress_kernel<E, B, false, true><<<grid, kThreads, 0, stream>>>(xp, numel, log2_tpg, nchunks, p,
                                                                              codes_off, s, h, f);
          return;
        }
      }
      if (stochastic)
        compress_kernel<E, B, true, false><<<grid, kThreads, 0, stream>>>(xp, numel, log2_tpg, nchunks, p, codes_off,
                                                                          s, h, f);
      else
        compress_kernel<E, B, false, false><<<grid, kThreads, 0, stream>>>(xp, numel, log2_tpg, nchunks, p, codes_off,
                                                                           s, h, f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_decompress(const uint8_t* p, int64_t numel, at::ScalarType dtype, int64_t bits, int64_t group_size,
                       void* y, int* f, cudaStream_t stream) {
  const int b = static_cast<int>(bits);
  dispatch_dtype<F32, F16, BF16>(dtype, [&](auto e) {
    using E = decltype(e);
    constexpr int VEC = Layout<E>::VEC;
    constexpr int per_block = kThreads * Layout<E>::U;
    auto* yp = static_cast<typename E::storage*>(y);
    const int64_t nchunks = (numel + VEC - 1) / VEC;
    const unsigned int grid = grid_for(nchunks, per_block);
    if (b == 16) {
      decode_bf16_kernel<E><<<grid, kThreads, 0, stream>>>(p, numel, nchunks, yp);
      return;
    }
    const int64_t codes_off = kHeaderBytes + scale_bytes(numel, group_size, b);
    const int log2_gs = log2_exact(group_size);
    dispatch_bits(bits, [&](auto bits_c) {
      constexpr int B = decltype(bits_c)::value;
      decompress_kernel<E, B><<<grid, kThreads, 0, stream>>>(p, numel, log2_gs, nchunks, codes_off, yp, f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Checks the arguments, makes x contiguous and 16-byte aligned and allocates the packet.
at::Tensor prepare_compress(const at::Tensor& x_in, c10::IntArrayRef header, int64_t bits, int64_t group_size,
                            bool stochastic, HeaderArg& h, at::Tensor& packet) {
  uint8_t header_bytes[kHeaderBytes];
  check_compress_args(header, bits, group_size, stochastic, header_bytes);
  std::memcpy(h.words, header_bytes, kHeaderBytes);  // host and GPU are both little-endian
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    // A view starting mid-allocation; the kernels use 16-byte vector loads. Rare, so a copy.
    x = x.clone();
  }
  packet = at::empty({packet_bytes(x.numel(), group_size, static_cast<int>(bits))}, x.options().dtype(at::kByte));
  return x;
}

std::tuple<at::Tensor, at::Tensor> compress_cuda(const at::Tensor& x_in, c10::IntArrayRef header, int64_t bits,
                                                 int64_t group_size, bool stochastic, int64_t seed) {
  c10::cuda::CUDAGuard guard(x_in.device());
  HeaderArg h;
  at::Tensor packet;
  const at::Tensor x = prepare_compress(x_in, header, bits, group_size, stochastic, h, packet);
  at::Tensor flag = at::empty({1}, x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A 4-byte memset, not at::zeros: no fill kernel and far less host work.
  C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), stream));
  launch_compress(x, h, bits, group_size, stochastic, seed, packet.data_ptr<uint8_t>(), flag.data_ptr<int>(), stream);
  return {packet, flag};
}

// compress, then one stream sync; returns the non-finite flag as a host int. The header comes as
// 192 hex digits: one string crosses from Python in a fraction of the time 96 ints take.
std::tuple<at::Tensor, int64_t> compress_sync_cuda(const at::Tensor& x_in, std::string_view header_hex, int64_t bits,
                                                   int64_t group_size, bool stochastic, int64_t seed) {
  TORCH_CHECK(header_hex.size() == 2 * kHeaderBytes, "splitlora::_compress_sync: header must be ",
              2 * kHeaderBytes, " hex digits, got ", header_hex.size());
  int64_t header[kHeaderBytes];
  for (int64_t i = 0; i < 2 * kHeaderBytes; ++i) {
    const char ch = header_hex[i];
    const int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
    TORCH_CHECK(d >= 0, "splitlora::_compress_sync: header must be lower-case hex digits");
    header[i / 2] = (i % 2 == 0) ? d << 4 : (header[i / 2] | d);
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  HeaderArg h;
  at::Tensor packet;
  const at::Tensor x = prepare_compress(x_in, c10::IntArrayRef(header, kHeaderBytes), bits, group_size, stochastic,
                                        h, packet);
  int* flag = pinned_scratch.reset_flag();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_compress(x, h, bits, group_size, stochastic, seed, packet.data_ptr<uint8_t>(), flag, stream);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return {packet, static_cast<int64_t>(pinned_scratch.flag())};
}

std::tuple<at::Tensor, at::Tensor> decompress_cuda(const at::Tensor& packet, at::ScalarType dtype,
                                                   c10::IntArrayRef shape, int64_t bits, int64_t group_size) {
  const int64_t numel = checked_decompress_numel(packet, shape, bits, group_size);
  c10::cuda::CUDAGuard guard(packet.device());
  at::Tensor y = at::empty(shape, packet.options().dtype(dtype));
  at::Tensor flag = at::empty({1}, packet.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), stream));
  if (numel == 0) return {y, flag};
  launch_decompress(packet.data_ptr<uint8_t>(), numel, dtype, bits, group_size, y.data_ptr(), flag.data_ptr<int>(),
                    stream);
  return {y, flag};
}

// decompress, then one stream sync; returns the bad-scale flag as a host int.
std::tuple<at::Tensor, int64_t> decompress_sync_cuda(const at::Tensor& packet, at::ScalarType dtype,
                                                     c10::IntArrayRef shape, int64_t bits, int64_t group_size) {
  const int64_t numel = checked_decompress_numel(packet, shape, bits, group_size);
  c10::cuda::CUDAGuard guard(packet.device());
  at::Tensor y = at::empty(shape, packet.options().dtype(dtype));
  if (numel == 0) return {y, 0};
  int* flag = pinned_scratch.reset_flag();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_decompress(packet.data_ptr<uint8_t>(), numel, dtype, bits, group_size, y.data_ptr(), flag, stream);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return {y, static_cast<int64_t>(pinned_scratch.flag())};
}

// The first 96 bytes of a packet on the GPU, as a CPU uint8 tensor (one copy into pinned memory
// and one stream sync, instead of a copy into pageable memory).
at::Tensor packet_header_cuda(const at::Tensor& packet) {
  TORCH_CHECK(packet.dim() == 1 && packet.scalar_type() == at::kByte && packet.is_contiguous(),
              "splitlora::_packet_header: packet must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(packet.numel() >= kHeaderBytes, "splitlora::_packet_header: packet is shorter than the header");
  c10::cuda::CUDAGuard guard(packet.device());
  uint8_t* staging = pinned_scratch.header_staging();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(staging, packet.data_ptr(), kHeaderBytes, cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  at::Tensor head = at::empty({kHeaderBytes}, packet.options().dtype(at::kByte).device(at::kCPU));
  std::memcpy(head.data_ptr<uint8_t>(), staging, kHeaderBytes);
  return head;
}

// --- the private compress (clip + noise + quantize in one pass; arithmetic in codec.h) ---------
// One block per group: each thread clips and noises its elements into shared memory, the block
// reduces the absmax, then each thread quantizes and packs whole code bytes. Simpler than the
// chunked kernels above (exact IEEE division throughout, no vector loads): the float64 libm calls
// of the noise dominate its cost anyway, and exactness against the torch oracle matters more here.
__device__ __forceinline__ float private_value_dev(float v, int64_t i, const float* __restrict__ factors,
                                                   int64_t row_len, double sigma, uint64_t nseed) {
  const float fac = factors[i / row_len];
  if (fac == 0.0f) return 0.0f;
  const float y = __fmul_rn(v, fac);
  if (!(sigma > 0.0)) return y;
  return __fadd_rn(y, __double2float_rn(__dmul_rn(sigma, hash_gaussian(nseed, static_cast<uint64_t>(i)))));
}

template <typename E, int BITS, bool STOCH>
__global__ void __launch_bounds__(kThreads) compress_private_kernel(
    const typename E::storage* __restrict__ x, int64_t numel, int64_t gs, const float* __restrict__ factors,
    int64_t row_len, double sigma, uint64_t nseed, uint8_t* __restrict__ packet, int64_t codes_off, uint64_t seed,
    HeaderArg header, int* nonfinite) {
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int OFF = 1 << (BITS - 1);
  constexpr int PER_BYTE = 8 / BITS;
  __shared__ float v[kMaxGroupSize];
  __shared__ uint32_t group_max;
  const int64_t ng = gridDim.x;
  write_header(packet, header, kHeaderBytes + 4 * ng, static_cast<int>(codes_off - kHeaderBytes - 4 * ng));
  if (threadIdx.x == 0) group_max = 0;
  __syncthreads();
  const int64_t g = blockIdx.x;
  const int64_t base = g * gs;
  uint32_t amax = 0;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    float f = 0.0f;
    if (base + j < numel) f = private_value_dev(E::load(x[base + j]), base + j, factors, row_len, sigma, nseed);
    v[j] = f;
    amax = max(amax, __float_as_uint(f) & 0x7fffffffU);
  }
  atomicMax(&group_max, amax);
  __syncthreads();
  amax = group_max;
  float* scales = reinterpret_cast<float*>(packet + kHeaderBytes);
  const int64_t gbytes = gs * BITS / 8;
  uint8_t* codes = packet + codes_off + g * gbytes;
  if (amax >= kNonFiniteAbsBits) {
    if (threadIdx.x == 0) {
      scales[g] = __uint_as_float(0x7fc00000U);
      *reinterpret_cast<volatile int*>(nonfinite) = 1;
    }
    for (int64_t k = threadIdx.x; k < gbytes; k += blockDim.x) codes[k] = 0;
    return;
  }
  const float scale = __fdiv_rn(__uint_as_float(amax), static_cast<float>(QMAX));
  if (threadIdx.x == 0) scales[g] = scale;
  for (int64_t k = threadIdx.x; k < gbytes; k += blockDim.x) {
    uint32_t b = 0;
#pragma unroll
    for (int i = 0; i < PER_BYTE; ++i) {
      const int64_t j = k * PER_BYTE + i;
      uint32_t c = 0;  // padding of the last group
      if (base + j < numel) {
        int q = 0;
        if (scale != 0.0f) {
          const float t = __fdiv_rn(v[j], scale);
          if constexpr (STOCH) {
            const float fl = floorf(t);
            q = static_cast<int>(fl) + (sr_uniform(seed, static_cast<uint64_t>(base + j)) < __fsub_rn(t, fl) ? 1 : 0);
          } else {
            q = static_cast<int>(rintf(t));
          }
          q = min(max(q, -QMAX), QMAX);
        }
        c = static_cast<uint32_t>(q + OFF);
      }
      b |= c << (i * BITS);
    }
    codes[k] = static_cast<uint8_t>(b);
  }
}

template <typename E>
__global__ void __launch_bounds__(kThreads) encode_bf16_private_kernel(
    const typename E::storage* __restrict__ x, int64_t numel, const float* __restrict__ factors, int64_t row_len,
    double sigma, uint64_t nseed, uint8_t* __restrict__ packet, HeaderArg header, int* nonfinite) {
  write_header(packet, header, kHeaderBytes, 0);
  uint16_t* out = reinterpret_cast<uint16_t*>(packet + kHeaderBytes);
  bool bad = false;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const uint16_t h = f32_to_bf16(private_value_dev(E::load(x[i]), i, factors, row_len, sigma, nseed));
    out[i] = h;
    bad |= (h & 0x7fffU) >= 0x7f80U;
  }
  if (bad) *reinterpret_cast<volatile int*>(nonfinite) = 1;
}

std::tuple<at::Tensor, at::Tensor> compress_private_cuda(const at::Tensor& x_in, const at::Tensor& factors_in,
                                                         c10::IntArrayRef header, int64_t bits, int64_t group_size,
                                                         bool stochastic, int64_t seed, double sigma,
                                                         int64_t noise_seed) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t row_len = check_private_args(x_in, factors_in, sigma);
  if (x_in.numel() == 0) return compress_cuda(x_in, header, bits, group_size, stochastic, seed);
  HeaderArg h;
  at::Tensor packet;
  const at::Tensor x = prepare_compress(x_in, header, bits, group_size, stochastic, h, packet);
  const at::Tensor factors = factors_in.contiguous();
  at::Tensor flag = at::empty({1}, x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), stream));
  const int64_t numel = x.numel();
  const uint64_t ns = static_cast<uint64_t>(noise_seed);
  const float* fp = factors.data_ptr<float>();
  uint8_t* p = packet.data_ptr<uint8_t>();
  int* f = flag.data_ptr<int>();
  dispatch_dtype<F32, F16, BF16>(x.scalar_type(), [&](auto e) {
    using E = decltype(e);
    const auto* xp = static_cast<const typename E::storage*>(x.data_ptr());
    if (bits == 16) {
      const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65536);
      encode_bf16_private_kernel<E><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          xp, numel, fp, row_len, sigma, ns, p, h, f);
      return;
    }
    const int64_t ng = num_groups(numel, group_size);
    TORCH_CHECK(ng < (int64_t{1} << 31), "splitlora::compress_private: tensor too large for one launch");
    const int64_t codes_off = kHeaderBytes + scale_bytes(numel, group_size, static_cast<int>(bits));
    const uint64_t s = stochastic ? static_cast<uint64_t>(seed) : 0;
    dispatch_bits(bits, [&](auto bits_c) {
      constexpr int B = decltype(bits_c)::value;
      if (stochastic)
        compress_private_kernel<E, B, true><<<static_cast<unsigned int>(ng), kThreads, 0, stream>>>(
            xp, numel, group_size, fp, row_len, sigma, ns, p, codes_off, s, h, f);
      else
        compress_private_kernel<E, B, false><<<static_cast<unsigned int>(ng), kThreads, 0, stream>>>(
            xp, numel, group_size, fp, row_len, sigma, ns, p, codes_off, s, h, f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packet, flag};
}

}  // namespace

TORCH_LIBRARY_IMPL(splitlora, CUDA, m) {
  m.impl("compress", &compress_cuda);
  m.impl("compress_private", &compress_private_cuda);
  m.impl("decompress", &decompress_cuda);
  m.impl("_compress_sync", &compress_sync_cuda);
  m.impl("_decompress_sync", &decompress_sync_cuda);
  m.impl("_packet_header", &packet_header_cuda);
}

}  // namespace splitlora

#endif  // SPLITLORA_WITH_CUDA
