// CUDA kernels of the smashed-data codec (format and arithmetic: codec.h).
//
// One thread owns 8 consecutive elements: one 16-byte load of bfloat16/float16 (two for float32)
// and one store of its 8 packed codes (bits bytes). A group of group_size elements is handled by
// group_size/8 neighbouring threads that agree on the group's absmax with warp shuffles (through
// shared memory when a group spans several warps), so each element is read once and each packet
// byte written once: the kernels move the minimum number of bytes and run at memory speed.
//
// Rounding uses the explicit IEEE intrinsics (__fdiv_rn, __fmul_rn, rintf, floorf): nvcc contracts
// a*b+c into FMA by default, and the packets must match the CPU kernels byte for byte.
#if defined(SPLITLORA_WITH_CUDA)

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "codec.h"
#include "op_common.h"

namespace splitlora {
namespace {

constexpr int kPerThread = 8;
constexpr int kBlock = 256;

// The header reaches the kernel as a launch argument (no host-to-device copy of its 96 bytes),
// as 24 words read only at compile-time indices: indexing a by-value kernel argument with a
// run-time index (bytes[threadIdx.x]) makes nvcc copy the whole struct to local memory in every
// thread, 96 bytes of stack traffic per thread, which made the first compress kernels 6x slower
// than their memory traffic warrants (ptxas -v: "96 bytes stack frame").
struct HeaderArg {
  uint32_t words[kHeaderBytes / 4];
};

struct F32 {
  using storage = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return bf16_to_f32(v); }
  static __device__ __forceinline__ uint16_t store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// Loads elements [e0, e0 + 8) as float32, zeros past numel.
template <typename E>
__device__ __forceinline__ void load8(const typename E::storage* x, int64_t e0, int64_t numel, float (&v)[kPerThread]) {
  using S = typename E::storage;
  if (e0 + kPerThread <= numel) {
    if constexpr (sizeof(S) == 2) {
      const uint4 w = *reinterpret_cast<const uint4*>(x + e0);
      const uint32_t parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = E::load(static_cast<uint16_t>(parts[i] & 0xffffU));
        v[2 * i + 1] = E::load(static_cast<uint16_t>(parts[i] >> 16));
      }
    } else {
      const float4 a = *reinterpret_cast<const float4*>(x + e0);
      const float4 b = *reinterpret_cast<const float4*>(x + e0 + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = e0 + i < numel ? E::load(x[e0 + i]) : 0.0f;
  }
}

// Stores 8 values to elements [e0, e0 + 8), dropping those past numel.
template <typename E>
__device__ __forceinline__ void store8(typename E::storage* y, int64_t e0, int64_t numel, const float (&v)[kPerThread]) {
  using S = typename E::storage;
  if (e0 + kPerThread <= numel) {
    if constexpr (sizeof(S) == 2) {
      uint4 w;
      w.x = E::store(v[0]) | (static_cast<uint32_t>(E::store(v[1])) << 16);
      w.y = E::store(v[2]) | (static_cast<uint32_t>(E::store(v[3])) << 16);
      w.z = E::store(v[4]) | (static_cast<uint32_t>(E::store(v[5])) << 16);
      w.w = E::store(v[6]) | (static_cast<uint32_t>(E::store(v[7])) << 16);
      *reinterpret_cast<uint4*>(y + e0) = w;
    } else {
      *reinterpret_cast<float4*>(y + e0) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(y + e0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (e0 + i < numel) y[e0 + i] = E::store(v[i]);
  }
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

template <typename E, int BITS, bool STOCH>
__global__ void compress_kernel(const typename E::storage* __restrict__ x, int64_t numel, int log2_gs,
                                int64_t ng, uint8_t* __restrict__ packet, int64_t codes_off, uint64_t seed,
                                HeaderArg header, int* __restrict__ nonfinite) {
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int OFF = 1 << (BITS - 1);
  __shared__ uint32_t warp_max[32];
  write_header(packet, header, kHeaderBytes + 4 * ng, static_cast<int>(codes_off - kHeaderBytes - 4 * ng));

  const int log2_tpg = log2_gs - 3;  // threads per group = group_size / 8
  const int tpg = 1 << log2_tpg;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = chunk >> log2_tpg;
  const int t = static_cast<int>(chunk & (tpg - 1));
  const bool active = g < ng;  // no early return: every lane takes part in the shuffles below
  const int64_t e0 = chunk * kPerThread;

  float v[kPerThread];
  uint32_t amax = 0;
  if (active) {
    load8<E>(x, e0, numel, v);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) amax = max(amax, f32_bits(v[i]) & 0x7fffffffU);
  }
  // Integer max over |v| bit patterns: exact absmax, and NaN/Inf land at >= 0x7f800000.
  const int width = tpg < 32 ? tpg : 32;
  for (int off = 1; off < width; off <<= 1) amax = max(amax, __shfl_xor_sync(0xffffffffU, amax, off));
  if (tpg > 32) {  // uniform over the launch: the group spans tpg/32 warps
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    const int first = (threadIdx.x >> log2_tpg) << (log2_tpg - 5);
    for (int w = 0; w < (tpg >> 5); ++w) amax = max(amax, warp_max[first + w]);
  }
  if (!active) return;

  uint8_t* codes = packet + codes_off + (g << log2_gs) * BITS / 8 + static_cast<int64_t>(t) * BITS;
  float* scales = reinterpret_cast<float*>(packet + kHeaderBytes);
  if (amax >= kNonFiniteAbsBits) {
    if (t == 0) {
      scales[g] = __uint_as_float(0x7fc00000U);
      atomicOr(nonfinite, 1);
    }
    if constexpr (BITS == 8) *reinterpret_cast<uint2*>(codes) = make_uint2(0, 0);
    else if constexpr (BITS == 4) *reinterpret_cast<uint32_t*>(codes) = 0;
    else *reinterpret_cast<uint16_t*>(codes) = 0;
    return;
  }
  const float scale = __fdiv_rn(__uint_as_float(amax), static_cast<float>(QMAX));
  if (t == 0) scales[g] = scale;
  uint64_t word = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    int q = 0;
    if (scale != 0.0f) {
      const float tq = __fdiv_rn(v[i], scale);
      if constexpr (STOCH) {
        const float fl = floorf(tq);
        const float u = sr_uniform(seed, static_cast<uint64_t>(e0 + i));
        q = static_cast<int>(fl) + (u < __fsub_rn(tq, fl) ? 1 : 0);
      } else {
        q = static_cast<int>(rintf(tq));  // round half to even
      }
      q = min(max(q, -QMAX), QMAX);
    }
    const uint32_t code = e0 + i < numel ? static_cast<uint32_t>(q + OFF) : 0U;  // padding: code 0
    word |= static_cast<uint64_t>(code) << (i * BITS);
  }
  if constexpr (BITS == 8) *reinterpret_cast<uint2*>(codes) = make_uint2(static_cast<uint32_t>(word), static_cast<uint32_t>(word >> 32));
  else if constexpr (BITS == 4) *reinterpret_cast<uint32_t*>(codes) = static_cast<uint32_t>(word);
  else *reinterpret_cast<uint16_t*>(codes) = static_cast<uint16_t>(word);
}

template <typename E, int BITS>
__global__ void decompress_kernel(const uint8_t* __restrict__ packet, int64_t numel, int log2_gs,
                                  int64_t nchunks, int64_t codes_off, typename E::storage* __restrict__ y,
                                  int* __restrict__ bad_scales) {
  constexpr int OFF = 1 << (BITS - 1);
  constexpr uint32_t MASK = (1U << BITS) - 1U;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= nchunks) return;
  const int64_t e0 = chunk * kPerThread;
  const int64_t g = e0 >> log2_gs;
  const int64_t within = e0 & ((int64_t{1} << log2_gs) - 1);
  float scale = reinterpret_cast<const float*>(packet + kHeaderBytes)[g];
  if (!(scale >= 0.0f && scale <= 3.402823466e+38f)) {
    if (within == 0) atomicOr(bad_scales, 1);
    scale = 0.0f;
  }
  const uint8_t* codes = packet + codes_off + (g << log2_gs) * BITS / 8 + (within / kPerThread) * BITS;
  uint64_t word;
  if constexpr (BITS == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(codes);
    word = w.x | (static_cast<uint64_t>(w.y) << 32);
  } else if constexpr (BITS == 4) {
    word = *reinterpret_cast<const uint32_t*>(codes);
  } else {
    word = *reinterpret_cast<const uint16_t*>(codes);
  }
  float v[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int q = static_cast<int>((word >> (i * BITS)) & MASK) - OFF;
    v[i] = __fmul_rn(static_cast<float>(q), scale);
  }
  store8<E>(y, e0, numel, v);
}

// bits 16: bfloat16 passthrough, 8 elements per thread.
template <typename E>
__global__ void encode_bf16_kernel(const typename E::storage* __restrict__ x, int64_t numel, int64_t nchunks,
                                   uint8_t* __restrict__ packet, HeaderArg header, int* __restrict__ nonfinite) {
  write_header(packet, header, kHeaderBytes, 0);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= nchunks) return;
  const int64_t e0 = chunk * kPerThread;
  uint16_t* out = reinterpret_cast<uint16_t*>(packet + kHeaderBytes);
  float v[kPerThread];
  load8<E>(x, e0, numel, v);
  uint16_t h[kPerThread];
  uint32_t amax = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    h[i] = f32_to_bf16(v[i]);
    amax = max(amax, static_cast<uint32_t>(h[i] & 0x7fffU));
  }
  if (e0 + kPerThread <= numel) {
    uint4 w;
    w.x = h[0] | (static_cast<uint32_t>(h[1]) << 16);
    w.y = h[2] | (static_cast<uint32_t>(h[3]) << 16);
    w.z = h[4] | (static_cast<uint32_t>(h[5]) << 16);
    w.w = h[6] | (static_cast<uint32_t>(h[7]) << 16);
    *reinterpret_cast<uint4*>(out + e0) = w;
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (e0 + i < numel) out[e0 + i] = h[i];
  }
  if (amax >= 0x7f80U) atomicOr(nonfinite, 1);
}

template <typename E>
__global__ void decode_bf16_kernel(const uint8_t* __restrict__ packet, int64_t numel, int64_t nchunks,
                                   typename E::storage* __restrict__ y) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= nchunks) return;
  const int64_t e0 = chunk * kPerThread;
  const uint16_t* in = reinterpret_cast<const uint16_t*>(packet + kHeaderBytes);
  float v[kPerThread];
  load8<BF16>(in, e0, numel, v);
  store8<E>(y, e0, numel, v);
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

unsigned int grid_for(int64_t threads, int block) {
  const int64_t blocks = (threads + block - 1) / block;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "splitlora codec: tensor too large for one launch");
  return static_cast<unsigned int>(blocks > 0 ? blocks : 1);
}

std::tuple<at::Tensor, at::Tensor> compress_cuda(const at::Tensor& x_in, c10::IntArrayRef header,
                                                 int64_t bits, int64_t group_size, bool stochastic,
                                                 int64_t seed) {
  uint8_t header_bytes[kHeaderBytes];
  check_compress_args(header, bits, group_size, stochastic, header_bytes);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    // A view starting mid-allocation; the kernels use 16-byte vector loads. Rare, so a copy.
    x = x.clone();
  }
  HeaderArg h;
  std::memcpy(h.words, header_bytes, kHeaderBytes);  // host and GPU are both little-endian
  const int64_t numel = x.numel();
  const int b = static_cast<int>(bits);
  at::Tensor packet = at::empty({packet_bytes(numel, group_size, b)}, x.options().dtype(at::kByte));
  at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
  uint8_t* p = packet.data_ptr<uint8_t>();
  int* f = flag.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype<F32, F16, BF16>(x.scalar_type(), [&](auto e) {
    using E = decltype(e);
    const auto* xp = static_cast<const typename E::storage*>(x.data_ptr());
    if (b == 16) {
      const int64_t nchunks = (numel + kPerThread - 1) / kPerThread;
      encode_bf16_kernel<E><<<grid_for(nchunks, kBlock), kBlock, 0, stream>>>(xp, numel, nchunks, p, h, f);
      return;
    }
    const int64_t ng = num_groups(numel, group_size);
    const int64_t codes_off = kHeaderBytes + scale_bytes(numel, group_size, b);
    const int log2_gs = log2_exact(group_size);
    const int tpg = static_cast<int>(group_size / kPerThread);
    const int block = tpg > kBlock ? tpg : kBlock;
    const unsigned int grid = grid_for(ng * tpg, block);
    dispatch_bits(bits, [&](auto bits_c) {
      constexpr int B = decltype(bits_c)::value;
      if (stochastic)
        compress_kernel<E, B, true><<<grid, block, 0, stream>>>(xp, numel, log2_gs, ng, p, codes_off,
                                                                static_cast<uint64_t>(seed), h, f);
      else
        compress_kernel<E, B, false><<<grid, block, 0, stream>>>(xp, numel, log2_gs, ng, p, codes_off, 0, h, f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packet, flag};
}

std::tuple<at::Tensor, at::Tensor> decompress_cuda(const at::Tensor& packet, at::ScalarType dtype,
                                                   c10::IntArrayRef shape, int64_t bits, int64_t group_size) {
  const int64_t numel = checked_decompress_numel(packet, shape, bits, group_size);
  const int b = static_cast<int>(bits);
  c10::cuda::CUDAGuard guard(packet.device());
  at::Tensor y = at::empty(shape, packet.options().dtype(dtype));
  at::Tensor flag = at::zeros({1}, packet.options().dtype(at::kInt));
  if (numel == 0) return {y, flag};
  const uint8_t* p = packet.data_ptr<uint8_t>();
  int* f = flag.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nchunks = (numel + kPerThread - 1) / kPerThread;
  dispatch_dtype<F32, F16, BF16>(dtype, [&](auto e) {
    using E = decltype(e);
    auto* yp = static_cast<typename E::storage*>(y.data_ptr());
    if (b == 16) {
      decode_bf16_kernel<E><<<grid_for(nchunks, kBlock), kBlock, 0, stream>>>(p, numel, nchunks, yp);
      return;
    }
    const int64_t codes_off = kHeaderBytes + scale_bytes(numel, group_size, b);
    const int log2_gs = log2_exact(group_size);
    dispatch_bits(bits, [&](auto bits_c) {
      constexpr int B = decltype(bits_c)::value;
      decompress_kernel<E, B><<<grid_for(nchunks, kBlock), kBlock, 0, stream>>>(p, numel, log2_gs, nchunks,
                                                                               codes_off, yp, f);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, flag};
}

}  // namespace

TORCH_LIBRARY_IMPL(splitlora, CUDA, m) {
  m.impl("compress", &compress_cuda);
  m.impl("decompress", &decompress_cuda);
}

}  // namespace splitlora

#endif  // SPLITLORA_WITH_CUDA
