// CPU kernels of the smashed-data codec (format and arithmetic: codec.h).
//
// Work is split over groups with at::parallel_for; a group is staged through small stack buffers
// so that each inner loop (convert + absmax, divide + round, pack) is a flat loop GCC vectorizes.
// The kernels are compiled twice (AVX2 and baseline x86-64) and picked at load time: the
// extension is built with plain -O3 (no -march), and vector division is where the time goes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cfloat>
#include <limits>
#include <type_traits>

#include "codec.h"
#include "op_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

// target_clones needs ifunc support: GCC or clang on x86-64 Linux (glibc).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
// "avx2" does not enable FMA, so no multiply-add can be contracted (see codec.h).
#define SL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SL_CPU_CLONES
#endif

namespace splitlora {
namespace {

// Element access by dtype. Half-precision types are read and written as raw uint16 so the
// conversions are plain integer code the vectorizer understands.
struct F32 {
  using storage = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static inline float load(uint16_t v) { return bf16_to_f32(v); }
  static inline uint16_t store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
  static inline float load(uint16_t v) { return f16_to_f32(v); }
  static inline uint16_t store(float v) { return f32_to_f16(v); }
};

// The private compress's per-element step (codec.h): clip by the row's factor, add the hash
// Gaussian, or 0 on a padded row. A separate instantiation (PRIV), so the plain path keeps its
// vectorized loops; the libm calls keep this one scalar.
struct PrivArgs {
  const float* factors = nullptr;  // float32[rows]
  int64_t row_len = 1;             // elements per row
  double sigma = 0.0;              // noise std
  uint64_t seed = 0;               // noise seed
};

inline float private_value(float v, int64_t i, const PrivArgs& pa) {
  const float fac = pa.factors[i / pa.row_len];
  if (fac == 0.0f) return 0.0f;
  const float y = v * fac;
  if (!(pa.sigma > 0.0)) return y;
  return y + static_cast<float>(pa.sigma * hash_gaussian(pa.seed, static_cast<uint64_t>(i)));
}

// Quantizes groups [g0, g1). Returns 1 when a group held NaN or Inf (its scale is set to NaN).
template <typename E, int BITS, bool STOCH, bool PRIV = false>
SL_CPU_CLONES int compress_groups(const typename E::storage* x, int64_t numel, int64_t gs,
                                  int64_t g0, int64_t g1, uint64_t seed, float* scales,
                                  uint8_t* codes, const PrivArgs& pa = PrivArgs{}) {
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int OFF = 1 << (BITS - 1);
  constexpr int PER_BYTE = 8 / BITS;
  alignas(64) float v[kMaxGroupSize];
  alignas(64) uint8_t c[kMaxGroupSize];
  const int64_t gbytes = gs * BITS / 8;
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  int bad = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * gs;
    const int64_t m = std::min(gs, numel - base);
    const typename E::storage* xg = x + base;
    uint32_t amax = 0;
    for (int64_t j = 0; j < m; ++j) {
      float f = E::load(xg[j]);
      if (PRIV) f = private_value(f, base + j, pa);
      v[j] = f;
      const uint32_t a = f32_bits(f) & 0x7fffffffU;
      amax = a > amax ? a : amax;
    }
    for (int64_t j = m; j < gs; ++j) v[j] = 0.0f;
    uint8_t* out = codes + g * gbytes;
    if (amax >= kNonFiniteAbsBits) {
      bad = 1;
      scales[g] = std::numeric_limits<float>::quiet_NaN();
      std::memset(out, 0, gbytes);
      continue;
    }
    const float scale = f32_from_bits(amax) / static_cast<float>(QMAX);
    scales[g] = scale;
    if (scale == 0.0f) {
      for (int64_t j = 0; j < gs; ++j) c[j] = static_cast<uint8_t>(OFF);
    } else if (!STOCH) {
      for (int64_t j = 0; j < gs; ++j) {
        int q = static_cast<int>(rne_small(v[j] / scale));
        q = q < -QMAX ? -QMAX : (q > QMAX ? QMAX : q);
        c[j] = static_cast<uint8_t>(q + OFF);
      }
    } else {
      // Groups never straddle a 2^32 element boundary (gs divides 2^32), so the high word of
      // the element index is constant per group and the loop stays in 32-bit integers.
      const uint32_t lo0 = static_cast<uint32_t>(base);
      const uint32_t hk = static_cast<uint32_t>(static_cast<uint64_t>(base) >> 32) ^ k1;
      for (int64_t j = 0; j < gs; ++j) {
        // Quiet comparisons (__builtin_isgreater/isless) and no conditional float arithmetic:
        // under -ftrapping-math GCC will not if-convert an operation that may raise an FP
        // exception, and a branch would keep this loop scalar.
        const float t = v[j] / scale;
        const float r = rne_small(t);
        const float fl = r - static_cast<float>(__builtin_isgreater(r, t));  // floor(t)
        const float frac = t - fl;
        const uint32_t h = lowbias32(lowbias32((lo0 + static_cast<uint32_t>(j)) ^ k0) ^ hk);
        // h >> 8 < 2^24: the signed conversion is exact and, unlike unsigned, has an SSE/AVX form.
        const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * 5.9604644775390625e-08f;
        int q = static_cast<int>(fl) + static_cast<int>(__builtin_isless(u, frac));
        q = q < -QMAX ? -QMAX : (q > QMAX ? QMAX : q);
        c[j] = static_cast<uint8_t>(q + OFF);
      }
    }
    for (int64_t j = m; j < gs; ++j) c[j] = 0;
    if (BITS == 8) {
      std::memcpy(out, c, gs);
    } else {
      for (int64_t k = 0; k < gbytes; ++k) {
        uint32_t b = 0;
        for (int i = 0; i < PER_BYTE; ++i) b |= static_cast<uint32_t>(c[k * PER_BYTE + i]) << (i * BITS);
        out[k] = static_cast<uint8_t>(b);
      }
    }
  }
  return bad;
}

// Dequantizes groups [g0, g1). Returns 1 when a stored scale is negative or not finite.
template <typename E, int BITS>
SL_CPU_CLONES int decompress_groups(const uint8_t* scale_bytes_ptr, const uint8_t* codes,
                                    int64_t numel, int64_t gs, int64_t g0, int64_t g1,
                                    typename E::storage* y) {
  constexpr int OFF = 1 << (BITS - 1);
  constexpr int PER_BYTE = 8 / BITS;
  constexpr uint32_t MASK = (1U << BITS) - 1U;
  alignas(64) int32_t c[kMaxGroupSize];
  const int64_t gbytes = gs * BITS / 8;
  int bad = 0;
  for (int64_t g = g0; g < g1; ++g) {
    float scale;
    std::memcpy(&scale, scale_bytes_ptr + 4 * g, 4);
    if (!(scale >= 0.0f && scale <= FLT_MAX)) {
      bad = 1;
      scale = 0.0f;
    }
    const uint8_t* in = codes + g * gbytes;
    for (int64_t k = 0; k < gbytes; ++k) {
      const uint32_t b = in[k];
      for (int i = 0; i < PER_BYTE; ++i)
        c[k * PER_BYTE + i] = static_cast<int32_t>((b >> (i * BITS)) & MASK) - OFF;
    }
    const int64_t base = g * gs;
    const int64_t m = std::min(gs, numel - base);
    typename E::storage* yg = y + base;
    for (int64_t j = 0; j < m; ++j) yg[j] = E::store(static_cast<float>(c[j]) * scale);
  }
  return bad;
}

// bits 16: bfloat16 passthrough. Returns 1 when a value is (or rounds to) NaN or Inf.
template <typename E>
SL_CPU_CLONES int encode_bf16(const typename E::storage* x, uint16_t* out, int64_t b, int64_t e) {
  uint32_t amax = 0;
  if (std::is_same<E, BF16>::value) {
    // Already bfloat16: copy the bits (a NaN keeps its payload, as torch's copy does) and scan
    // the chunk just written while it is still in cache.
    std::memcpy(out + b, x + b, (e - b) * sizeof(uint16_t));
    for (int64_t i = b; i < e; ++i) {
      const uint32_t a = out[i] & 0x7fffU;
      amax = a > amax ? a : amax;
    }
  } else {
    for (int64_t i = b; i < e; ++i) {
      const uint16_t h = f32_to_bf16(E::load(x[i]));
      out[i] = h;
      const uint32_t a = h & 0x7fffU;
      amax = a > amax ? a : amax;
    }
  }
  return amax >= 0x7f80U ? 1 : 0;
}

// bits 16 of the private compress: the clipped, noised float32 value rounded to bfloat16.
template <typename E>
int encode_bf16_private(const typename E::storage* x, uint16_t* out, int64_t b, int64_t e, const PrivArgs& pa) {
  uint32_t amax = 0;
  for (int64_t i = b; i < e; ++i) {
    const uint16_t h = f32_to_bf16(private_value(E::load(x[i]), i, pa));
    out[i] = h;
    const uint32_t a = h & 0x7fffU;
    amax = a > amax ? a : amax;
  }
  return amax >= 0x7f80U ? 1 : 0;
}

template <typename E>
SL_CPU_CLONES void decode_bf16(const uint16_t* in, typename E::storage* y, int64_t b, int64_t e) {
  if (std::is_same<E, BF16>::value) {
    std::memcpy(y + b, in + b, (e - b) * sizeof(uint16_t));
    return;
  }
  for (int64_t i = b; i < e; ++i) y[i] = E::store(bf16_to_f32(in[i]));
}

// The packet and the decoded tensor are fresh allocations of up to hundreds of MiB, and on Linux
// their first touch costs one page fault per 4 KiB, which on a small VM takes longer than the
// codec itself. Asking for transparent huge pages before the kernels write (what torch does for
// all allocations under THP_MEM_ALLOC_ENABLE=1) cuts those faults 512-fold; it is only advice,
// harmless where THP is off or the memory was already touched.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

template <typename T>
T* ptr_as(const at::Tensor& t, int64_t byte_offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(t.data_ptr()) + byte_offset);
}

std::tuple<at::Tensor, at::Tensor> compress_impl(const at::Tensor& x_in, c10::IntArrayRef header,
                                                 int64_t bits, int64_t group_size, bool stochastic,
                                                 int64_t seed, const PrivArgs* pa) {
  uint8_t header_bytes[kHeaderBytes];
  check_compress_args(header, bits, group_size, stochastic, header_bytes);
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int64_t ng = bits == 16 ? 0 : num_groups(numel, group_size);
  const int64_t sbytes = scale_bytes(numel, group_size, static_cast<int>(bits));
  at::Tensor packet = at::empty({packet_bytes(numel, group_size, static_cast<int>(bits))},
                                x.options().dtype(at::kByte));
  uint8_t* p = packet.data_ptr<uint8_t>();
  advise_huge_pages(p, packet.numel());
  std::memcpy(p, header_bytes, kHeaderBytes);
  std::memset(p + kHeaderBytes + 4 * ng, 0, sbytes - 4 * ng);
  std::atomic<int> bad{0};
  if (numel > 0) {
    dispatch_dtype<F32, F16, BF16>(x.scalar_type(), [&](auto e) {
      using E = decltype(e);
      const auto* xp = static_cast<const typename E::storage*>(x.data_ptr());
      if (bits == 16) {
        uint16_t* out = ptr_as<uint16_t>(packet, kHeaderBytes);
        at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e2) {
          const int r = pa ? encode_bf16_private<E>(xp, out, b, e2, *pa) : encode_bf16<E>(xp, out, b, e2);
          if (r) bad.store(1, std::memory_order_relaxed);
        });
        return;
      }
      float* scales = ptr_as<float>(packet, kHeaderBytes);
      uint8_t* codes = p + kHeaderBytes + sbytes;
      const int64_t grain = std::max<int64_t>(1, (1 << 15) / group_size);
      dispatch_bits(bits, [&](auto bits_c) {
        constexpr int B = decltype(bits_c)::value;
        at::parallel_for(0, ng, grain, [&](int64_t g0, int64_t g1) {
          const uint64_t s = static_cast<uint64_t>(seed);
          int r;
          if (pa)
            r = stochastic ? compress_groups<E, B, true, true>(xp, numel, group_size, g0, g1, s, scales, codes, *pa)
                           : compress_groups<E, B, false, true>(xp, numel, group_size, g0, g1, 0, scales, codes, *pa);
          else
            r = stochastic ? compress_groups<E, B, true>(xp, numel, group_size, g0, g1, s, scales, codes)
                           : compress_groups<E, B, false>(xp, numel, group_size, g0, g1, 0, scales, codes);
          if (r) bad.store(1, std::memory_order_relaxed);
        });
      });
    });
  }
  return {packet, at::full({1}, bad.load(), x.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> compress_cpu(const at::Tensor& x, c10::IntArrayRef header, int64_t bits,
                                                int64_t group_size, bool stochastic, int64_t seed) {
  return compress_impl(x, header, bits, group_size, stochastic, seed, nullptr);
}

std::tuple<at::Tensor, at::Tensor> compress_private_cpu(const at::Tensor& x, const at::Tensor& factors,
                                                        c10::IntArrayRef header, int64_t bits, int64_t group_size,
                                                        bool stochastic, int64_t seed, double sigma,
                                                        int64_t noise_seed) {
  const int64_t row_len = check_private_args(x, factors, sigma);
  const at::Tensor f = factors.contiguous();
  PrivArgs pa;
  pa.factors = f.data_ptr<float>();
  pa.row_len = row_len;
  pa.sigma = sigma;
  pa.seed = static_cast<uint64_t>(noise_seed);
  return compress_impl(x, header, bits, group_size, stochastic, seed, &pa);
}

std::tuple<at::Tensor, at::Tensor> decompress_cpu(const at::Tensor& packet, at::ScalarType dtype,
                                                  c10::IntArrayRef shape, int64_t bits,
                                                  int64_t group_size) {
  const int64_t numel = checked_decompress_numel(packet, shape, bits, group_size);
  at::Tensor y = at::empty(shape, packet.options().dtype(dtype));
  advise_huge_pages(y.data_ptr(), y.nbytes());
  const uint8_t* p = packet.data_ptr<uint8_t>();
  const int64_t ng = num_groups(numel, group_size);
  const int64_t sbytes = scale_bytes(numel, group_size, static_cast<int>(bits));
  std::atomic<int> bad{0};
  if (numel > 0) {
    dispatch_dtype<F32, F16, BF16>(dtype, [&](auto e) {
      using E = decltype(e);
      auto* yp = static_cast<typename E::storage*>(y.data_ptr());
      if (bits == 16) {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(p + kHeaderBytes);
        at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e2) { decode_bf16<E>(in, yp, b, e2); });
        return;
      }
      const uint8_t* codes = p + kHeaderBytes + sbytes;
      const int64_t grain = std::max<int64_t>(1, (1 << 15) / group_size);
      dispatch_bits(bits, [&](auto bits_c) {
        constexpr int B = decltype(bits_c)::value;
        at::parallel_for(0, ng, grain, [&](int64_t g0, int64_t g1) {
          if (decompress_groups<E, B>(p + kHeaderBytes, codes, numel, group_size, g0, g1, yp))
            bad.store(1, std::memory_order_relaxed);
        });
      });
    });
  }
  return {y, at::full({1}, bad.load(), packet.options().dtype(at::kInt))};
}

}  // namespace

TORCH_LIBRARY_IMPL(splitlora, CPU, m) {
  m.impl("compress", &compress_cpu);
  m.impl("compress_private", &compress_private_cpu);
  m.impl("decompress", &decompress_cpu);
}

}  // namespace splitlora
