"""What the trainer puts on the wire: tensors and state dicts as uint8 packets.

Activations and their gradients go through the codec (`splitlora.codec`) when compression is on.
Everything else that crosses between parties (labels and attention masks in the plain variant,
uncompressed fp32 activations, adapter weights) is serialized with safetensors: a
self-describing byte string that the receiver parses without knowing shapes in advance, and whose
length is exactly what the communication accounting counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import codec

# Codec bit widths; 32 means "no compression": raw float32 tensors.
UNCOMPRESSED_BITS = 32


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A dict of tensors as one uint8 packet (safetensors bytes) on the CPU."""
    payload = _st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def unpack_tensors(packet: torch.Tensor, device: torch.device | str = "cpu") -> Dict[str, torch.Tensor]:
    """Inverse of `pack_tensors`; a packet that does not parse raises ValueError."""
    if not isinstance(packet, torch.Tensor) or packet.dtype != torch.uint8 or packet.dim() != 1:
        raise ValueError("a tensor packet must be a 1-D uint8 tensor (what pack_tensors returns)")
    try:
        tensors = _st_load(packet.cpu().numpy().tobytes())
    except Exception as err:  # safetensors raises its own error types for bad bytes
        raise ValueError(f"corrupt tensor packet ({len(packet)} bytes): {err}") from None
    return {k: v.to(device) for k, v in tensors.items()}


@dataclass(frozen=True)
class CodecSettings:
    """How one stream of activations or gradients is encoded."""

    bits: int = 8
    group_size: int = 64
    stochastic: bool = False

    @property
    def compressed(self) -> bool:
        return self.bits != UNCOMPRESSED_BITS


class TensorStream:
    """Encoder for one direction of one client's cut (e.g. client 2's activations going up).

    Keeps that stream's error-feedback residual and the generator for stochastic rounding, so
    both survive in checkpoints (`state_dict`) and a resumed run encodes exactly as an
    uninterrupted one would.
    """

    def __init__(self, settings: CodecSettings, *, error_feedback: bool = False, seed: int = 0,
                 variable_dim: Optional[int] = None) -> None:
        self.settings = settings
        # variable_dim: the dimension in which the stream's tensors may change (the sequence, when
        # batches are padded to their own longest; see codec.ErrorFeedback).
        self.feedback = (codec.ErrorFeedback(variable_dim=variable_dim)
                         if (error_feedback and settings.compressed) else None)
        self.generator = torch.Generator().manual_seed(seed) if settings.stochastic else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if not s.compressed:
            return pack_tensors({"x": x.to(torch.float32)})
        if self.feedback is not None:
            return self.feedback.compress(x, bits=s.bits, group_size=s.group_size,
                                          stochastic=s.stochastic, generator=self.generator)
        return codec.compress(x, bits=s.bits, group_size=s.group_size, stochastic=s.stochastic,
                              generator=self.generator)

    def decode(self, packet: torch.Tensor, dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """The tensor of `packet`, on `device` (default: the packet's) and in `dtype`."""
        if not self.settings.compressed:
            out = unpack_tensors(packet, packet.device)["x"]
        else:
            # Decode where the tensor is needed (e.g. a packet that came through host memory
            # decodes on the GPU).
            out = codec.decompress(packet if device is None else packet.to(device))
        return out.to(device=device or out.device, dtype=dtype or out.dtype)

    def state_dict(self) -> dict:
        state = {}
        if self.feedback is not None and self.feedback.residual is not None:
            state["residual"] = self.feedback.residual.detach().cpu().clone()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict({"residual": state.get("residual")})
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


class _Done:
    """A finished result with the interface of a Future."""

    def __init__(self, value: torch.Tensor) -> None:
        self._value = value

    def result(self) -> torch.Tensor:
        return self._value


class EncodeWorker:
    """Encodes packets in the background, so compressing one client's tensor overlaps the
    compute that follows it (the next client's forward, or this client's backward).

    One worker thread keeps encodes in submission order. On CUDA the work also runs on its own
    stream, ordered after the producer's stream by an event, so the GPU can run the compression
    kernels beside the next forward; a packet's future resolves only once its bytes are final
    (compress() reads the non-finite flag back to the host, which waits for its stream).
    Each TensorStream is only ever encoded by this one thread, so error-feedback residuals and
    stochastic-rounding generators advance exactly as they would inline: results are identical.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitlora-encode") if enabled else None
        self._cuda_stream = torch.cuda.Stream(device) if (enabled and device.type == "cuda") else None

    def submit(self, stream: TensorStream, x: torch.Tensor):
        if self._pool is None:
            return _Done(stream.encode(x))
        if self._cuda_stream is None:
            return self._pool.submit(stream.encode, x)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        side = self._cuda_stream

        def job():
            with torch.cuda.stream(side):
                side.wait_event(ready)
                # x was made on another stream: keep its memory from being reused before we are done.
                x.record_stream(side)
                return stream.encode(x)

        return self._pool.submit(job)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
