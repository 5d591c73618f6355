// The Python module splitlora._C. The codec kernels register themselves with the dispatcher
// (TORCH_LIBRARY_IMPL in codec_cpu.cpp and codec_cuda.cu) when this library is loaded; the op
// schemas are declared once, in Python (splitlora/_ops.py), so that the plain-torch fallback and
// the fake implementations exist even when this module was never built. What this module adds
// is what Python needs to check it loaded the right build.
#include <torch/extension.h>

#include "codec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "splitlora C++/CUDA kernels (smashed-data codec); ops live under torch.ops.splitlora";
  m.def(
      "built_with_cuda",
      []() {
#if defined(SPLITLORA_WITH_CUDA)
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
  m.def("format_version", []() { return splitlora::kFormatVersion; },
        "Wire format version the kernels were compiled for (must match splitlora.codec).");
  m.def("header_bytes", []() { return splitlora::kHeaderBytes; }, "Size of the packet header.");
  m.def(
      "packet_bytes",
      [](int64_t numel, int64_t group_size, int64_t bits) {
        const char* err = splitlora::check_codec_args(bits, group_size);
        TORCH_CHECK(err == nullptr, err);
        TORCH_CHECK(numel >= 0 && numel <= (int64_t{1} << 60), "numel out of range");
        return splitlora::packet_bytes(numel, group_size, static_cast<int>(bits));
      },
      "Exact packet size in bytes, as the kernels compute it.");
}
