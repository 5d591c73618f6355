// Host-side code shared by the CPU and CUDA implementations of the ops: the argument checks
// every kernel relies on, and compile-time dispatch over the input dtypes and bit widths (each
// file passes its own element types, with host or device conversions).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "codec.h"

namespace splitlora {

// Checks the arguments of splitlora::compress that the Python face normally guarantees (the ops
// can also be called directly), and returns the header as bytes.
inline void check_compress_args(c10::IntArrayRef header, int64_t bits, int64_t group_size, bool stochastic,
                                uint8_t (&header_bytes)[kHeaderBytes]) {
  const char* err = check_codec_args(bits, group_size);
  TORCH_CHECK(err == nullptr, "splitlora::compress: ", err);
  TORCH_CHECK(header.size() == static_cast<size_t>(kHeaderBytes), "splitlora::compress: header must hold ",
              kHeaderBytes, " byte values, got ", header.size());
  TORCH_CHECK(!(stochastic && bits == 16), "splitlora::compress: stochastic rounding needs bits 2, 4 or 8");
  for (int64_t i = 0; i < kHeaderBytes; ++i) {
    TORCH_CHECK(header[i] >= 0 && header[i] <= 255, "splitlora::compress: header values must be bytes");
    header_bytes[i] = static_cast<uint8_t>(header[i]);
  }
}

// Checks the extra arguments of splitlora::compress_private and returns the elements per row of
// the factors (numel / rows); the Python face (splitlora.codec) validates them first.
inline int64_t check_private_args(const at::Tensor& x, const at::Tensor& factors, double sigma) {
  TORCH_CHECK(factors.dim() == 1 && factors.scalar_type() == at::kFloat && factors.device() == x.device(),
              "splitlora::compress_private: factors must be a 1-D float32 tensor on x's device");
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0.0, "splitlora::compress_private: sigma must be finite and >= 0");
  const int64_t rows = factors.numel();
  const int64_t numel = x.numel();
  TORCH_CHECK(rows > 0 ? numel % rows == 0 : numel == 0,
              "splitlora::compress_private: the number of factors must divide x's element count");
  return rows > 0 && numel > 0 ? numel / rows : 1;
}

// Checks the arguments of splitlora::decompress, above all that the packet holds exactly the bytes
// the shape implies (so no kernel can read past it), and returns the element count.
inline int64_t checked_decompress_numel(const at::Tensor& packet, c10::IntArrayRef shape, int64_t bits,
                                        int64_t group_size) {
  const char* err = check_codec_args(bits, group_size);
  TORCH_CHECK(err == nullptr, "splitlora::decompress: ", err);
  TORCH_CHECK(packet.dim() == 1 && packet.scalar_type() == at::kByte && packet.is_contiguous(),
              "splitlora::decompress: packet must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packet.data_ptr()) % 16 == 0,
              "splitlora::decompress: packet data must be 16-byte aligned");
  TORCH_CHECK(shape.size() <= static_cast<size_t>(kMaxNdim), "splitlora::decompress: at most 8 dims");
  int64_t numel = 1;
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, "splitlora::decompress: negative dim");
    TORCH_CHECK(d == 0 || numel <= (int64_t{1} << 60) / d, "splitlora::decompress: shape too large");
    numel *= d;
  }
  const int b = static_cast<int>(bits);
  TORCH_CHECK(packet.numel() == packet_bytes(numel, group_size, b), "splitlora::decompress: packet holds ",
              packet.numel(), " bytes, the shape implies ", packet_bytes(numel, group_size, b));
  return numel;
}

// Calls f(F32T{}), f(F16T{}) or f(BF16T{}) for float32, float16 or bfloat16.
template <typename F32T, typename F16T, typename BF16T, typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(F32T{}); break;
    case at::kHalf: f(F16T{}); break;
    case at::kBFloat16: f(BF16T{}); break;
    default: TORCH_CHECK(false, "splitlora codec: unsupported dtype ", dtype, "; expected float32, float16 or bfloat16");
  }
}

// Calls f with std::integral_constant<int, bits> for the quantized widths 2, 4 and 8.
template <typename F>
void dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "splitlora codec: bits must be 2, 4 or 8 here, got ", bits);
  }
}

}  // namespace splitlora
