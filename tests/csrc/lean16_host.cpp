// A host build of the CUDA compress kernels' lean path for 16-bit inputs: csrc/codec_chunk.cuh
// compiled by a C++ compiler with csrc/cuda_host_shim.h in place of the CUDA intrinsics.
// compress_lean plays the launch of compress_kernel on the lean path: blocks of kThreads threads,
// U chunks per thread, each thread calling lean_thread_chunks (the kernel's own code, from the
// header) with its chunks and their groups' absmax bits. The absmax reduction itself (warp
// shuffles and shared memory in compress_block, shared with the established path) is replaced by
// a plain max over each group's chunk_absmax_bits. test_lean16_host.py loads this with ctypes and
// compares the packets it writes with the CPU kernels'.
#include <cstdint>
#include <vector>

#include "codec_chunk.cuh"

namespace {

using splitlora::BF16;
using splitlora::F16;

constexpr int kVec = 8;  // 16-bit elements per 16-byte chunk
constexpr int kU = 8;    // chunks per thread: CompressLayout<E>::U in codec_cuda.cu

// Chunk c of x, zeros past numel (as load_chunk reads the tail).
uint4 load_chunk(const uint16_t* x, int64_t numel, int64_t c) {
  uint4 raw = make_uint4(0U, 0U, 0U, 0U);
  uint32_t* words = &raw.x;
  for (int i = 0; i < kVec && c * kVec + i < numel; ++i)
    words[i >> 1] |= static_cast<uint32_t>(x[c * kVec + i]) << ((i & 1) * 16);
  return raw;
}

template <typename E, int BITS, bool STOCH>
int compress_lean(const uint16_t* x, int64_t numel, int64_t group_size, uint64_t seed, uint8_t* packet,
                  int64_t codes_off) {
  const int tpg = static_cast<int>(group_size / kVec);  // chunks per group
  int log2_tpg = 0;
  while ((1 << log2_tpg) < tpg) ++log2_tpg;
  const int64_t nchunks = (numel + group_size - 1) / group_size * tpg;  // the last group's padding too
  std::vector<uint32_t> group_max(static_cast<size_t>(nchunks / tpg), 0U);
  for (int64_t c = 0; c < nchunks; ++c) {
    const uint32_t cm = splitlora::chunk_absmax_bits<E>(load_chunk(x, numel, c));
    if (cm > group_max[c >> log2_tpg]) group_max[c >> log2_tpg] = cm;
  }
  float* scales = reinterpret_cast<float*>(packet + splitlora::kHeaderBytes);
  uint8_t* codes = packet + codes_off;
  int nonfinite = 0;
  const int64_t block_chunks = static_cast<int64_t>(splitlora::kThreads) * kU;
  for (int64_t block_first = 0; block_first < nchunks; block_first += block_chunks) {
    const bool full = (block_first + block_chunks) * kVec <= numel;  // as compress_kernel picks FULL
    for (int thread = 0; thread < splitlora::kThreads; ++thread) {
      const int local = (thread >> 5) * (32 * kU) + (thread & 31);
      uint4 raw[kU];
      uint32_t m[kU];
      for (int k = 0; k < kU; ++k) {
        const int64_t c = block_first + local + 32 * k;
        raw[k] = c < nchunks ? load_chunk(x, numel, c) : make_uint4(0U, 0U, 0U, 0U);
        m[k] = c < nchunks ? group_max[c >> log2_tpg] : 0U;
      }
      if (full)
        splitlora::lean_thread_chunks<E, BITS, STOCH, true, kU>(raw, m, block_first, local, log2_tpg, tpg, nchunks,
                                                                 numel, scales, codes, &nonfinite, seed);
      else
        splitlora::lean_thread_chunks<E, BITS, STOCH, false, kU>(raw, m, block_first, local, log2_tpg, tpg, nchunks,
                                                                  numel, scales, codes, &nonfinite, seed);
    }
  }
  return nonfinite;
}

template <typename E, int BITS>
int by_rounding(int stochastic, const uint16_t* x, int64_t numel, int64_t group_size, uint64_t seed, uint8_t* packet,
                int64_t codes_off) {
  return stochastic ? compress_lean<E, BITS, true>(x, numel, group_size, seed, packet, codes_off)
                    : compress_lean<E, BITS, false>(x, numel, group_size, seed, packet, codes_off);
}

template <typename E>
int by_bits(int bits, int stochastic, const uint16_t* x, int64_t numel, int64_t group_size, uint64_t seed,
            uint8_t* packet, int64_t codes_off) {
  switch (bits) {
    case 8: return by_rounding<E, 8>(stochastic, x, numel, group_size, seed, packet, codes_off);
    case 4: return by_rounding<E, 4>(stochastic, x, numel, group_size, seed, packet, codes_off);
    case 2: return by_rounding<E, 2>(stochastic, x, numel, group_size, seed, packet, codes_off);
    default: return -1;
  }
}

}  // namespace

// dtype: codec.h's code (1 float16, 2 bfloat16); x: numel raw 16-bit values; packet: a zeroed
// buffer of the packet's size, whose scales and codes (from codes_off) this fills, not its header.
// rcp_ulps: how far from the correctly rounded reciprocal the rcp.approx stand-in lands. Returns
// the non-finite flag (0 or 1), or -1 for arguments this harness does not take.
extern "C" int sl_lean16_compress(int dtype, int bits, int stochastic, uint64_t seed, const uint16_t* x,
                                  int64_t numel, int64_t group_size, int rcp_ulps, uint8_t* packet,
                                  int64_t codes_off) {
  if (group_size < 16 || group_size > 4096 || (group_size & (group_size - 1)) != 0) return -1;
  sl_host_rcp_ulps = rcp_ulps;
  if (dtype == splitlora::kDtypeF16) return by_bits<F16>(bits, stochastic, x, numel, group_size, seed, packet, codes_off);
  if (dtype == splitlora::kDtypeBF16) return by_bits<BF16>(bits, stochastic, x, numel, group_size, seed, packet, codes_off);
  return -1;
}
