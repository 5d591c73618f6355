"""Smashed-data codec: quantize and pack the tensors that cross the cut into a wire packet.

``compress(x)`` returns one 1-D ``torch.uint8`` tensor on x's device that holds everything needed
to rebuild x; ``decompress(packet)`` rebuilds it (same shape and dtype) on the packet's device.

Quantization (bits 2, 4, 8): symmetric absmax per group of ``group_size`` consecutive elements of
the flattened (row-major) tensor, ``scale = absmax / (2^(bits-1) - 1)``, codes ``round(x/scale)``
(half to even) or, with ``stochastic=True``, unbiased stochastic rounding. Round to nearest keeps
``|x - decompress(compress(x))| <= scale/2`` per element, up to the final cast to x's dtype;
all-zero groups come back as exact zeros. Bits 16 sends bfloat16 (no scales). Every backend (C++
CPU, CUDA, plain torch) writes byte-identical packets, for stochastic rounding too, given the same
generator state: the arithmetic is pinned down in ``csrc/codec.h``.

Wire format, version 1 (all little-endian)::

    0   magic b"SLCD"           4   version u16          6   dtype u8 (0 f32, 1 f16, 2 bf16)
    7   bits u8 (2/4/8/16)      8   flags u8 (bit0 stochastic)   9   ndim u8 (<= 8)
    10  reserved u16 = 0        12  group_size u32       16  numel u64
    24  shape int64[8] (unused dims 0)                   88  CRC32 of bytes [0, 88)
    92  reserved u32 = 0
    96  scales float32[ceil(numel/group_size)], zero-padded to a multiple of 16 (none for bits 16)
    ..  codes: per group group_size*bits/8 bytes (last group padded with zero codes), element j
        of a byte in bits [j*bits, (j+1)*bits), code = q + 2^(bits-1); bits 16: numel bfloat16

What ``decompress`` checks, raising ValueError: the magic, version, CRC of the header (so any
flipped header byte is caught), every header field, that the packet length is exactly the one
the header implies (which also bounds every allocation by the real packet size), and that the
stored scales are finite and non-negative. Flipped bits inside the codes cannot be detected:
every code value is a valid one. Integrity of the payload is the transport's job.

Backends: the ops ``torch.ops.splitlora.compress/decompress`` (see ``splitlora._ops``) run the
compiled kernels of ``splitlora._C`` where it was built for the device, else the plain-torch
kernels of ``splitlora.codec_reference``. ``backend_for(device)`` says which one serves a device,
and each call logs it at debug level on the logger ``splitlora.codec``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import struct
import zlib
from collections.abc import Sequence

import torch

from . import _ops
from . import codec_reference as _ref
from .codec_reference import (
    DTYPE_CODES,
    FLAG_STOCHASTIC,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    MAX_GROUP_SIZE,
    MAX_NDIM,
    MIN_GROUP_SIZE,
    SUPPORTED_BITS,
)

__all__ = [
    "ErrorFeedback",
    "PacketInfo",
    "backend_for",
    "compress",
    "decompress",
    "packed_size",
    "packet_info",
]

logger = logging.getLogger(__name__)

_DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_DTYPE_NAMES = "torch.float32, torch.float16 or torch.bfloat16"
_FIELDS = struct.Struct("<4sHBBBBHIQ8q")  # everything the CRC covers: bytes [0, 88)
_TAIL = struct.Struct("<II")  # CRC32, reserved
assert _FIELDS.size + _TAIL.size == HEADER_BYTES


@dataclasses.dataclass(frozen=True)
class PacketInfo:
    """The parsed header of a packet, plus the section sizes it implies."""

    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    bits: int
    group_size: int
    numel: int
    stochastic: bool
    num_groups: int
    scale_bytes: int
    code_bytes: int
    packet_bytes: int


# --- argument checks --------------------------------------------------------------------------


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def _check_group_size(group_size) -> int:
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE
        or group_size & (group_size - 1)
    ):
        raise ValueError(
            f"group_size must be a power of two between {MIN_GROUP_SIZE} and {MAX_GROUP_SIZE}, "
            f"got {group_size!r}"
        )
    return group_size


def _check_input(x, name="x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"{name} must have dtype {_DTYPE_NAMES}, got {x.dtype}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"{name} may have at most {MAX_NDIM} dimensions, got {x.dim()}")


# --- sizes and backends -----------------------------------------------------------------------


def packed_size(shape_or_numel, bits: int = 8, group_size: int = 64) -> int:
    """Exact byte count of the packet ``compress`` writes for this shape (or element count)."""
    _check_bits(bits)
    _check_group_size(group_size)
    if isinstance(shape_or_numel, bool):
        raise TypeError("shape_or_numel must be an int or a sequence of ints, got bool")
    if isinstance(shape_or_numel, int):
        numel = shape_or_numel
    elif isinstance(shape_or_numel, (Sequence, torch.Size)):
        dims = [int(d) for d in shape_or_numel]
        if any(d < 0 for d in dims):
            raise ValueError(f"shape must have non-negative dims, got {tuple(dims)}")
        numel = math.prod(dims)
    else:
        raise TypeError(f"shape_or_numel must be an int or a sequence of ints, got {type(shape_or_numel).__name__}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return _ref.packet_bytes(numel, group_size, bits)


def backend_for(device) -> str:
    """Which kernels serve the codec on ``device``: "cpp-cpu", "cuda" or "torch" (plain torch)."""
    device = torch.device(device)
    if device.type == "cpu" and _ops.has_compiled_kernel("CPU"):
        return "cpp-cpu"
    if device.type == "cuda" and _ops.has_compiled_kernel("CUDA"):
        return "cuda"
    return "torch"


# --- header -----------------------------------------------------------------------------------


def _build_header(dtype: torch.dtype, shape, bits: int, group_size: int, stochastic: bool) -> bytes:
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    fields = _FIELDS.pack(
        MAGIC,
        FORMAT_VERSION,
        DTYPE_CODES[dtype],
        bits,
        FLAG_STOCHASTIC if stochastic else 0,
        len(shape),
        0,
        group_size,
        math.prod(shape),
        *dims,
    )
    return fields + _TAIL.pack(zlib.crc32(fields), 0)


@functools.lru_cache(maxsize=256)
def _header_hex(dtype: torch.dtype, shape: tuple, bits: int, group_size: int, stochastic: bool) -> str:
    # What _ops.compress_sync takes. A stream sends tensors of one shape again and again, so the
    # bytes (and the CRC over them) are built once per signature.
    return _build_header(dtype, shape, bits, group_size, stochastic).hex()


def _eager_cuda(t: torch.Tensor) -> bool:
    """Whether the synchronising CUDA helpers of splitlora._ops may serve tensor t."""
    return t.is_cuda and _ops.has_cuda_sync_ops() and not torch.compiler.is_compiling()


def _corrupt(what: str) -> ValueError:
    return ValueError(f"not a valid splitlora codec packet: {what}")


@functools.lru_cache(maxsize=256)  # pure function of its arguments; errors are not cached
def _parse_header(head: bytes, packet_len: int) -> PacketInfo:
    magic, version, dtype_code, bits, flags, ndim, reserved16, group_size, numel, *dims = _FIELDS.unpack_from(head)
    crc, reserved32 = _TAIL.unpack_from(head, _FIELDS.size)
    if magic != MAGIC:
        raise _corrupt(f"magic is {magic!r}, expected {MAGIC!r} (foreign data, or not the start of a packet)")
    if version != FORMAT_VERSION:
        raise _corrupt(
            f"format version {version}; this splitlora reads version {FORMAT_VERSION} "
            f"(sender runs another splitlora release, or the header is corrupted)"
        )
    if zlib.crc32(head[: _FIELDS.size]) != crc:
        raise _corrupt("header checksum mismatch (the header was corrupted in transit)")
    if reserved16 or reserved32:
        raise _corrupt("reserved header fields are not zero")
    if dtype_code not in _DTYPE_FROM_CODE:
        raise _corrupt(f"unknown dtype code {dtype_code}")
    if bits not in SUPPORTED_BITS:
        raise _corrupt(f"bits is {bits}, expected one of {SUPPORTED_BITS}")
    if flags & ~FLAG_STOCHASTIC or (bits == 16 and flags):
        raise _corrupt(f"unknown flags {flags:#04x} for bits {bits}")
    if ndim > MAX_NDIM:
        raise _corrupt(f"ndim is {ndim}, at most {MAX_NDIM} allowed")
    try:
        _check_group_size(group_size)
    except ValueError as exc:
        raise _corrupt(str(exc)) from None
    shape = tuple(dims[:ndim])
    if any(d < 0 for d in shape) or any(dims[ndim:]):
        raise _corrupt(f"invalid shape fields {tuple(dims)} for ndim {ndim}")
    if math.prod(shape) != numel:
        raise _corrupt(f"numel {numel} does not match shape {shape}")
    expected = _ref.packet_bytes(numel, group_size, bits)
    if packet_len != expected:
        raise _corrupt(
            f"packet holds {packet_len} bytes but its header describes {expected} "
            f"(truncated, padded, or not one whole packet)"
        )
    return PacketInfo(
        version=version,
        dtype=_DTYPE_FROM_CODE[dtype_code],
        shape=shape,
        bits=bits,
        group_size=group_size,
        numel=numel,
        stochastic=bool(flags & FLAG_STOCHASTIC),
        num_groups=_ref.num_groups(numel, group_size) if bits != 16 else 0,
        scale_bytes=_ref.scale_bytes(numel, group_size, bits),
        code_bytes=_ref.code_bytes(numel, group_size, bits),
        packet_bytes=expected,
    )


def _check_packet(packet) -> None:
    if not isinstance(packet, torch.Tensor):
        raise TypeError(f"packet must be a torch.Tensor of dtype torch.uint8, got {type(packet).__name__}")
    if packet.dtype != torch.uint8:
        raise ValueError(f"packet must be a torch.uint8 tensor (as compress returns it), got dtype {packet.dtype}")
    if packet.dim() != 1:
        raise ValueError(f"packet must be 1-D, got shape {tuple(packet.shape)}")
    if packet.numel() < HEADER_BYTES:
        raise _corrupt(f"{packet.numel()} bytes is shorter than the {HEADER_BYTES}-byte header (truncated)")


def packet_info(packet: torch.Tensor) -> PacketInfo:
    """Parses and validates the header of ``packet`` (one small host copy for a device packet)."""
    _check_packet(packet)
    if _eager_cuda(packet) and packet.is_contiguous():
        head = _ops.packet_header(packet).numpy().tobytes()  # pinned copy, one stream sync
    else:
        head = bytes(packet[:HEADER_BYTES].cpu().tolist())
    return _parse_header(head, packet.numel())


# --- compress / decompress --------------------------------------------------------------------


def _draw_seed(generator) -> int:
    # One randint call, so a caller can reproduce a stochastic packet from the generator state.
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _private_args(x, clip, noise_multiplier, mask, noise_generator):
    """(factors, sigma, noise_seed) of the private compress, or None without clip."""
    if clip is None:
        if noise_multiplier or mask is not None or noise_generator is not None:
            raise ValueError("compress: noise_multiplier, mask and noise_generator need clip (the per-example L2 "
                             "bound the noise is scaled to); pass clip=... or leave them out")
        return None
    # Imported here: splitlora.privacy builds on this module's reference, not the other way round.
    from .privacy.clip import check_clip_args, clip_factors
    from .privacy.noise import draw_seed

    check_clip_args(clip, noise_multiplier)
    if x.dim() < 1:
        raise ValueError("compress: clip needs x with a leading batch dimension (one example per leading index)")
    return clip_factors(x, float(clip), mask), float(noise_multiplier) * float(clip), draw_seed(noise_generator)


def _compress(x, bits, group_size, stochastic, generator, *, wire_dtype=None, kernel=None, private=None):
    _check_input(x)
    _check_bits(bits)
    _check_group_size(group_size)
    if stochastic and bits == 16:
        raise ValueError("stochastic rounding applies to bits 2, 4 and 8; bits=16 sends bfloat16 unchanged")
    seed = _draw_seed(generator) if stochastic else 0
    wire_dtype = x.dtype if wire_dtype is None else wire_dtype
    stochastic = bool(stochastic)
    if private is not None:
        # One op: clip, noise and quantize in one pass over x (csrc/codec.h); its flag is read
        # back with .item() (no _sync variant: the factors' reduction already synchronised).
        factors, sigma, noise_seed = private
        header = list(_build_header(wire_dtype, tuple(x.shape), bits, group_size, stochastic))
        packet, flag = _ops.compress_private(x.detach(), factors, header, bits, group_size, stochastic, seed,
                                             sigma, noise_seed)
        nonfinite = x.numel() and flag.item()
    elif kernel is None and _eager_cuda(x):
        # One call: kernel, one stream sync, the non-finite flag as a host int.
        header = _header_hex(wire_dtype, tuple(x.shape), bits, group_size, stochastic)
        packet, nonfinite = _ops.compress_sync(x.detach(), header, bits, group_size, stochastic, seed)
    else:
        header = list(_build_header(wire_dtype, tuple(x.shape), bits, group_size, stochastic))
        op = _ops.compress if kernel is None else kernel
        packet, flag = op(x.detach(), header, bits, group_size, stochastic, seed)
        nonfinite = x.numel() and flag.item()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "compress backend=%s device=%s shape=%s dtype=%s bits=%d group_size=%d stochastic=%s bytes=%d",
            backend_for(x.device) if kernel is None else "torch (reference)",
            x.device, tuple(x.shape), x.dtype, bits, group_size, stochastic, packet.numel(),
        )
    if nonfinite:
        if bits == 16:
            raise ValueError(
                "compress: x contains NaN or Inf, or values beyond the bfloat16 range; the codec "
                "only carries finite values (check the forward/backward pass for overflow)"
            )
        raise ValueError(
            "compress: x contains NaN or Inf; the codec only carries finite values "
            "(check the forward/backward pass for overflow, e.g. fp16 activations or a too-high learning rate)"
        )
    return packet


def compress(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 64,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    clip: float | None = None,
    noise_multiplier: float = 0.0,
    mask: torch.Tensor | None = None,
    noise_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantizes and packs ``x`` (float32, float16 or bfloat16, any shape) into a uint8 packet.

    bits: 8, 4 or 2 (absmax quantization per group) or 16 (bfloat16 passthrough).
    group_size: power of two in [16, 4096]; elements per scale.
    stochastic: unbiased stochastic rounding instead of round-to-nearest; its random numbers come
        from a counter hash seeded by one ``torch.randint`` draw from ``generator`` (or torch's
        default CPU generator), so a seeded generator gives the same packet on every backend.

    clip: differential privacy at the cut, fused into the same pass: each example (leading index
        of x) is scaled to L2 norm <= clip over its real elements (``mask``, shape x.shape[:k],
        0 = padding, zeroed), then N(0, (noise_multiplier * clip)^2) is added to the real
        elements before quantization; the noise seed is one draw from ``noise_generator`` (None:
        the OS CSPRNG). Exactly ``splitlora.privacy.clip_and_noise`` followed by compress of its
        float32 result; the packet is an ordinary one.

    Raises ValueError for non-finite input, unsupported dtypes, bits or group sizes.
    Non-contiguous inputs give the packet of their contiguous copy.
    """
    _check_input(x)
    private = _private_args(x, clip, noise_multiplier, mask, noise_generator)
    return _compress(x, bits, group_size, stochastic, generator, private=private)


def _decode(packet, info: PacketInfo, kernel=None):
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.dtype, device=packet.device)
    if not packet.is_contiguous():
        packet = packet.contiguous()
    if packet.data_ptr() % 16:
        # A packet sliced out of a larger receive buffer may start anywhere; the kernels read
        # float32 scales and vectors, which need alignment. Rare, and a copy of the packet only.
        packet = packet.clone()
    if kernel is None and _eager_cuda(packet):
        out, bad_scales = _ops.decompress_sync(packet, info.dtype, list(info.shape), info.bits, info.group_size)
    else:
        op = _ops.decompress if kernel is None else kernel
        out, flag = op(packet, info.dtype, list(info.shape), info.bits, info.group_size)
        bad_scales = info.bits != 16 and flag.item()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "decompress backend=%s device=%s shape=%s dtype=%s bits=%d group_size=%d bytes=%d",
            backend_for(packet.device) if kernel is None else "torch (reference)",
            packet.device, info.shape, info.dtype, info.bits, info.group_size, packet.numel(),
        )
    if info.bits != 16 and bad_scales:
        raise _corrupt("a stored scale is negative, NaN or Inf (the payload was corrupted)")
    return out


def decompress(packet: torch.Tensor) -> torch.Tensor:
    """Rebuilds the tensor of a ``compress`` packet, with its shape and dtype, on the packet's device.

    Raises ValueError for truncated, corrupted or foreign packets (see the module docstring for
    what is checked) and TypeError for a non-tensor.
    """
    info = packet_info(packet)
    return _decode(packet, info)


# --- error feedback ---------------------------------------------------------------------------


class ErrorFeedback:
    """Error feedback for one stream (one client, one direction) of compressed tensors.

    Each ``compress(x)`` sends ``x + residual`` and keeps as the new residual what the receiver
    will miss: ``(x + residual) - decompress(packet)``, in float32. Over T steps the sum of what
    the receiver decodes then differs from the sum of the inputs by the last residual only (one
    step's quantization error) instead of an error that grows with T.

    The residual has the shape of the stream's tensors; a different shape is a ValueError until
    ``reset()``. With ``variable_dim=d`` the tensors may differ in dimension d only (activations of
    batches padded to their own longest sequence: [batch, length, hidden] with variable_dim=1):
    the residual then spans the longest seen, each ``compress`` adds and renews its leading
    slice, and the rest waits for a longer tensor. ``state_dict()`` / ``load_state_dict()`` let a
    trainer checkpoint it.
    """

    def __init__(self, variable_dim: int | None = None) -> None:
        self._residual: torch.Tensor | None = None
        self.variable_dim = variable_dim

    @property
    def residual(self) -> torch.Tensor | None:
        return self._residual

    def reset(self) -> None:
        self._residual = None

    def compress(
        self,
        x: torch.Tensor,
        bits: int = 8,
        group_size: int = 64,
        *,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Like ``splitlora.codec.compress`` but on ``x`` plus the stream's residual."""
        _check_input(x)
        residual = self._residual
        partial = residual is not None and residual.shape != x.shape
        if partial:
            residual = self._leading_slice(x)
        corrected = x.detach().to(torch.float32, copy=True)
        if residual is not None:
            corrected += residual.to(corrected.device)
        # Quantize the float32 sum itself (no cast to x.dtype first), but tell the receiver to
        # rebuild x's dtype: the header's dtype, not the kernel input's, decides that.
        packet = _compress(corrected, bits, group_size, stochastic, generator, wire_dtype=x.dtype)
        decoded = _decode(packet, packet_info(packet))
        missed = corrected.sub_(decoded.to(torch.float32))
        if partial:
            residual.copy_(missed)  # a view of the stream's residual
        else:
            self._residual = missed
        return packet

    def _leading_slice(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the residual that x's shape covers (a view), after growing the residual
        with zeros where x is longer in `variable_dim`; a ValueError for any other change."""
        residual = self._residual
        d = self.variable_dim
        same_elsewhere = (d is not None and residual.dim() == x.dim() and -x.dim() <= d < x.dim()
                          and all(a == b for i, (a, b) in enumerate(zip(residual.shape, x.shape))
                                  if i != d % x.dim()))
        if not same_elsewhere:
            allowed = "" if d is None else f" (they may differ in dimension {d} only)"
            raise ValueError(
                f"ErrorFeedback: this stream carried tensors of shape {tuple(residual.shape)}, got "
                f"{tuple(x.shape)}{allowed}; call reset() when the stream's shape changes on purpose "
                f"(or use one ErrorFeedback per stream)"
            )
        d %= x.dim()
        if x.shape[d] > residual.shape[d]:
            grow = list(residual.shape)
            grow[d] = x.shape[d] - residual.shape[d]
            self._residual = residual = torch.cat([residual, residual.new_zeros(grow)], dim=d)
        return residual.narrow(d, 0, x.shape[d])

    def state_dict(self) -> dict:
        return {"residual": None if self._residual is None else self._residual.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "residual" not in state:
            raise ValueError("ErrorFeedback.load_state_dict expects the dict state_dict() returned, with key 'residual'")
        residual = state["residual"]
        if residual is None:
            self._residual = None
            return
        if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
            raise ValueError(f"ErrorFeedback state 'residual' must be a float tensor or None, got {type(residual).__name__}")
        self._residual = residual.detach().to(torch.float32, copy=True)
