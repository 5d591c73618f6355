"""Packets as a stream of bounded gRPC messages, and back.

A packet (a 1-D uint8 tensor: a codec packet or safetensors bytes, see splitlora.wire) of any
size crosses as messages of at most `chunk_bytes` payload each, so neither gRPC's message limit
(4 MiB by default) nor protobuf's 2 GiB applies. Every message is

    32-byte header: magic "SLFD", version, type, kind, 0, step (int64), total (uint64), offset (uint64)
    payload:        bytes [offset, offset + len) of the packet (type PACKET), or
                    a small JSON object (type CONTROL: hello, welcome, errors; never pickle)

The receiver checks the header before allocating anything: the total a peer announces is bounded
by `max_packet_bytes`, chunks must arrive in order and add up to the total exactly, and a message
that breaks any of this raises StreamError (the connection is then dropped, with that reason).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from ..transport.base import KINDS

MAGIC = b"SLFD"
VERSION = 1
PACKET, CONTROL = 1, 2
_HEADER = struct.Struct("<4sBBBBqQQ")
HEADER_BYTES = _HEADER.size  # 32
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_PACKET_BYTES = 4 << 30
MAX_CONTROL_BYTES = 64 << 10


class StreamError(ValueError):
    """A message that is not part of a well-formed packet stream (corrupt, oversized, out of order)."""


@dataclass
class Packet:
    kind: str
    step: int
    data: torch.Tensor  # 1-D uint8


@dataclass
class Control:
    message: dict


def encode_control(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_CONTROL_BYTES:
        raise ValueError(f"a control message is at most {MAX_CONTROL_BYTES} bytes; this one is {len(body)}")
    return _HEADER.pack(MAGIC, VERSION, CONTROL, 0, 0, 0, len(body), 0) + body


def chunk_packet(kind: str, step: int, packet: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The messages that carry `packet` (at least one, even for an empty packet)."""
    if kind not in KINDS:
        raise ValueError(f"unknown packet kind {kind!r}; kinds are {KINDS}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    data = packet.detach().cpu().contiguous()
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"a packet is a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    view = memoryview(data.numpy()).cast("B")
    total = len(view)
    kind_id = KINDS.index(kind)
    offset = 0
    while True:
        end = min(total, offset + chunk_bytes)
        yield _HEADER.pack(MAGIC, VERSION, PACKET, kind_id, 0, int(step), total, offset) + bytes(view[offset:end])
        offset = end
        if offset >= total:
            return


class Reassembler:
    """Turns one peer's messages back into packets and control messages, in order.

    `feed(message)` returns a Packet when the message completes one, a Control for a control
    message, None while a packet is still arriving; it raises StreamError for anything malformed.
    """

    def __init__(self, max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.max_packet_bytes = int(max_packet_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._buf: Optional[bytearray] = None
        self._kind = self._step = self._total = self._filled = 0

    @property
    def in_progress(self) -> bool:
        return self._buf is not None

    def feed(self, message: bytes):
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise StreamError(f"a message is bytes, got {type(message).__name__}")
        if len(message) < HEADER_BYTES:
            raise StreamError(f"a {len(message)}-byte message is shorter than the {HEADER_BYTES}-byte header")
        magic, version, mtype, kind_id, _, step, total, offset = _HEADER.unpack_from(message)
        if magic != MAGIC:
            raise StreamError("a message without the SLFD magic: not a splitlora federation stream")
        if version != VERSION:
            raise StreamError(f"stream version {version}, this program speaks version {VERSION}: update both sides "
                              f"to the same splitlora")
        body = memoryview(message)[HEADER_BYTES:]
        if mtype == CONTROL:
            if self._buf is not None:
                raise StreamError("a control message in the middle of a packet")
            if total != len(body) or total > MAX_CONTROL_BYTES:
                raise StreamError(f"a control message announcing {total} bytes carries {len(body)} "
                                  f"(at most {MAX_CONTROL_BYTES})")
            try:
                obj = json.loads(bytes(body).decode())
            except (UnicodeDecodeError, ValueError) as err:
                raise StreamError(f"a control message that is not JSON: {err}") from None
            if not isinstance(obj, dict):
                raise StreamError("a control message must be a JSON object")
            return Control(obj)
        if mtype != PACKET:
            raise StreamError(f"unknown message type {mtype}")
        if kind_id >= len(KINDS):
            raise StreamError(f"unknown packet kind id {kind_id}")
        if len(body) > self.chunk_bytes:
            raise StreamError(f"a {len(body)}-byte chunk is larger than the {self.chunk_bytes}-byte limit")
        if self._buf is None:
            # Bounded before allocating: a peer cannot make us reserve more than max_packet_bytes.
            if total > self.max_packet_bytes:
                raise StreamError(f"a peer announced a {total}-byte packet; the limit is "
                                  f"{self.max_packet_bytes} bytes (federation.max_packet_bytes)")
            if offset != 0:
                raise StreamError(f"a packet's first chunk starts at byte {offset}, not 0")
            self._buf = bytearray(total)
            self._kind, self._step, self._total, self._filled = kind_id, step, total, 0
        elif (kind_id, step, total) != (self._kind, self._step, self._total) or offset != self._filled:
            what = (f"{KINDS[kind_id]} of step {step}, {total} bytes at offset {offset}")
            self._reset()
            raise StreamError(f"a chunk ({what}) does not continue the packet in progress")
        end = offset + len(body)
        if end > total:
            self._reset()
            raise StreamError(f"a chunk runs to byte {end}, past the packet's announced {total} bytes")
        if total and not len(body):
            self._reset()
            raise StreamError("an empty chunk inside a non-empty packet")
        self._buf[offset:end] = body
        self._filled = end
        if self._filled < self._total:
            return None
        buf, kind, step = self._buf, KINDS[self._kind], self._step
        self._reset()
        data = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        return Packet(kind, step, data)

    def _reset(self) -> None:
        self._buf = None
        self._kind = self._step = self._total = self._filled = 0

    def finish(self) -> None:
        """The stream ended: a packet cut off in the middle is an error."""
        if self._buf is not None:
            got, total = self._filled, self._total
            self._reset()
            raise StreamError(f"the stream ended {got} bytes into a {total}-byte packet")


def reassemble_all(messages, **kwargs) -> List[object]:
    """Every packet and control message in `messages` (tests and tools)."""
    r = Reassembler(**kwargs)
    out = [x for x in (r.feed(m) for m in messages) if x is not None]
    r.finish()
    return out
