"""The codec's operators, declared once under the torch.library namespace ``splitlora``.

In the style of bitsandbytes: the schemas, the fake (meta) kernels that let torch.compile and
FakeTensor trace the ops, and a plain-torch default kernel live here; the compiled extension adds
CPU and CUDA kernels for the same schemas (TORCH_LIBRARY_IMPL in csrc/) that take precedence over
the default on their devices. Which one serves a device is observable with
``splitlora.codec.backend_for``.

Op contracts (the Python face in splitlora/codec.py builds the header and checks the flags):

``compress(Tensor x, int[] header, int bits, int group_size, bool stochastic, int seed)
-> (Tensor packet, Tensor nonfinite)``
    Allocates the whole packet on x's device and writes the 96 header bytes, the scales and the
    codes straight into it. ``nonfinite`` (int32[1]) is non-zero when x held NaN or Inf, found
    while computing the group maxima, so the check costs no extra pass over x. The header is an
    int list, not a tensor: a CPU tensor next to a CUDA x is rejected by FakeTensor's device
    rules, and a list reaches the CUDA kernel as a launch argument, with no host-to-device copy.

``decompress(Tensor packet, ScalarType dtype, int[] shape, int bits, int group_size)
-> (Tensor out, Tensor bad_scales)``
    Writes the decoded tensor straight into a new tensor on the packet's device; ``bad_scales``
    (int32[1]) is non-zero when a stored scale is negative or not finite.
"""
from __future__ import annotations

import torch

from . import _ext
from . import codec_reference as _ref

NAMESPACE = "splitlora"

# FRAGMENT, not DEF: other parts of the package may define ops in the same namespace.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(
    "compress(Tensor x, int[] header, int bits, int group_size, bool stochastic, int seed)"
    " -> (Tensor, Tensor)"
)
_lib.define(
    "decompress(Tensor packet, ScalarType dtype, int[] shape, int bits, int group_size)"
    " -> (Tensor, Tensor)"
)


# The private compress (splitlora.codec.compress with clip=...): what compress does, after each
# element of row r (of factors.numel() equal rows) is multiplied by factors[r] and the counter-hash
# Gaussian of std sigma is added, or set to 0 where factors[r] == 0; see csrc/codec.h. The
# factors are computed in torch (splitlora.privacy.clip_factors) for every backend, so all of
# them clip with the same float32 numbers.
_lib.define(
    "compress_private(Tensor x, Tensor factors, int[] header, int bits, int group_size, bool stochastic,"
    " int seed, float sigma, int noise_seed) -> (Tensor, Tensor)"
)


@torch.library.register_fake(f"{NAMESPACE}::compress_private")
def _compress_private_fake(x, factors, header, bits, group_size, stochastic, seed, sigma, noise_seed):
    size = _ref.packet_bytes(x.numel(), group_size, bits)
    return x.new_empty((size,), dtype=torch.uint8), x.new_empty((1,), dtype=torch.int32)


@torch.library.register_fake(f"{NAMESPACE}::compress")
def _compress_fake(x, header, bits, group_size, stochastic, seed):
    size = _ref.packet_bytes(x.numel(), group_size, bits)
    return x.new_empty((size,), dtype=torch.uint8), x.new_empty((1,), dtype=torch.int32)


@torch.library.register_fake(f"{NAMESPACE}::decompress")
def _decompress_fake(packet, dtype, shape, bits, group_size):
    return packet.new_empty(list(shape), dtype=dtype), packet.new_empty((1,), dtype=torch.int32)


# Eager-mode helpers of splitlora.codec on CUDA, served only by the CUDA kernels of the extension
# (no default, no fake kernel: the Python face calls them outside torch.compile, and only where
# ``has_cuda_sync_ops()``). They run what compress/decompress run, then synchronise the stream
# once and return the flag as a host int, read from pinned memory the kernel wrote through its
# device mapping: no fill kernel for the flag and no device-to-host copy to read it. The header
# of _compress_sync is its 96 bytes as 192 lower-case hex digits (one str argument to convert).
# ``_packet_header`` copies the 96 header bytes of a device packet to a CPU tensor the same way.
_lib.define(
    "_compress_sync(Tensor x, str header_hex, int bits, int group_size, bool stochastic, int seed)"
    " -> (Tensor, int)"
)
_lib.define(
    "_decompress_sync(Tensor packet, ScalarType dtype, int[] shape, int bits, int group_size)"
    " -> (Tensor, int)"
)
_lib.define("_packet_header(Tensor packet) -> Tensor")

# The default for every device without a compiled kernel (and every device when the extension
# is not built). CompositeExplicitAutograd: a backend kernel (CPU, CUDA) registered by the
# extension wins over it on its own device.
_lib.impl("compress", _ref.compress_kernel, "CompositeExplicitAutograd")
_lib.impl("decompress", _ref.decompress_kernel, "CompositeExplicitAutograd")
_lib.impl("compress_private", _ref.compress_private_kernel, "CompositeExplicitAutograd")

# Loading the extension registers its CPU/CUDA kernels; None (with one warning) when not built.
EXTENSION = _ext.load()

compress = torch.ops.splitlora.compress.default
decompress = torch.ops.splitlora.decompress.default
compress_private = torch.ops.splitlora.compress_private.default
compress_sync = torch.ops.splitlora._compress_sync.default
decompress_sync = torch.ops.splitlora._decompress_sync.default
packet_header = torch.ops.splitlora._packet_header.default


def has_compiled_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a kernel of both ops for this dispatch key."""
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)
        for name in ("compress", "decompress")
    )


# Fixed once the extension is loaded (kernels register when it loads, and only then).
_CUDA_SYNC_OPS = all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA")
    for name in ("_compress_sync", "_decompress_sync", "_packet_header")
)


def has_cuda_sync_ops() -> bool:
    """Whether the CUDA kernels of the eager-mode helpers (_compress_sync, ...) are registered."""
    return _CUDA_SYNC_OPS
