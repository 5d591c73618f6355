// Compile-time dispatch over the codec's input dtypes and bit widths, shared by the CPU and CUDA
// kernels. Each file passes its own element types (host or device conversions), so this header
// needs nothing but ATen's ScalarType.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace splitlora {

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
