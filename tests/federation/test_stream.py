"""splitlora.federation.stream: packets as bounded chunks, reassembled; malformed input refused."""
import struct

import pytest
import torch

from splitlora.federation.stream import (HEADER_BYTES, Control, Packet, Reassembler, StreamError, chunk_packet,
                                         encode_control, reassemble_all)


def _packet(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("n,chunk", [(0, 16), (1, 16), (16, 16), (17, 16), (1000, 7), (3 << 20, 1 << 20)])
def test_round_trip(n, chunk):
    p = _packet(n)
    messages = list(chunk_packet("activations", 5, p, chunk))
    assert len(messages) == max(1, -(-n // chunk))
    assert all(len(m) <= chunk + HEADER_BYTES for m in messages)
    (got,) = reassemble_all(messages, chunk_bytes=chunk)
    assert isinstance(got, Packet) and got.kind == "activations" and got.step == 5
    assert torch.equal(got.data, p)


def test_interleaved_controls_and_packets():
    a, b = _packet(50, 1), _packet(3, 2)
    messages = [encode_control({"type": "hello", "name": "x"}), *chunk_packet("labels", 1, a, 8),
                *chunk_packet("gradients", 2, b, 8), encode_control({"type": "done"})]
    got = reassemble_all(messages, chunk_bytes=8)
    assert isinstance(got[0], Control) and got[0].message == {"type": "hello", "name": "x"}
    assert torch.equal(got[1].data, a) and got[1].kind == "labels"
    assert torch.equal(got[2].data, b) and got[2].step == 2
    assert got[3].message["type"] == "done"


def test_oversized_claim_refused_before_allocating():
    messages = list(chunk_packet("adapters", 0, _packet(100), 64))
    with pytest.raises(StreamError, match="limit is 99 bytes"):
        Reassembler(max_packet_bytes=99, chunk_bytes=64).feed(messages[0])
    # A forged header announcing 2**60 bytes: refused, nothing reserved.
    forged = struct.pack("<4sBBBBqQQ", b"SLFD", 1, 1, 0, 0, 0, 1 << 60, 0) + b"xx"
    with pytest.raises(StreamError, match="announced"):
        Reassembler(max_packet_bytes=1 << 30).feed(forged)


def test_oversized_chunk_refused():
    (m,) = chunk_packet("labels", 0, _packet(100), 100)
    with pytest.raises(StreamError, match="larger than"):
        Reassembler(chunk_bytes=64).feed(m)


def test_truncated_stream_refused():
    messages = list(chunk_packet("activations", 3, _packet(100), 30))
    with pytest.raises(StreamError, match="ended 60 bytes into a 100-byte packet"):
        reassemble_all(messages[:2], chunk_bytes=30)


@pytest.mark.parametrize("mutate,match", [
    (lambda ms: [b"XXXX" + ms[0][4:]], "magic"),
    (lambda ms: [ms[0][:10]], "shorter than"),
    (lambda ms: [ms[0][:4] + bytes([9]) + ms[0][5:]], "version"),
    (lambda ms: [ms[0][:5] + bytes([7]) + ms[0][6:]], "message type"),
    (lambda ms: [ms[0][:6] + bytes([200]) + ms[0][7:]], "kind id"),
    (lambda ms: [ms[0], ms[2]], "does not continue"),  # a chunk skipped
    (lambda ms: [ms[1]], "starts at byte"),  # the first chunk missing
    (lambda ms: [ms[0], ms[0]], "does not continue"),  # a chunk repeated
    (lambda ms: [ms[0], encode_control({"type": "x"})], "middle of a packet"),
])
def test_corrupt_messages_refused(mutate, match):
    messages = list(chunk_packet("activations", 3, _packet(100), 30))
    with pytest.raises(StreamError, match=match):
        reassemble_all(mutate(messages), chunk_bytes=30)


def test_chunk_past_total_refused():
    (m,) = chunk_packet("labels", 0, _packet(10), 64)
    bad = m[:HEADER_BYTES - 16] + struct.pack("<QQ", 5, 0) + m[HEADER_BYTES:]  # claims 5 bytes, carries 10
    with pytest.raises(StreamError, match="past the packet"):
        Reassembler().feed(bad)


def test_bad_control_refused():
    m = encode_control({"a": 1})
    with pytest.raises(StreamError, match="not JSON"):
        Reassembler().feed(m[:HEADER_BYTES] + b"{not json}"[:len(m) - HEADER_BYTES].ljust(len(m) - HEADER_BYTES))
    with pytest.raises(ValueError, match="at most"):
        encode_control({"x": "y" * (70 << 10)})


def test_a_packet_is_a_1d_uint8_tensor():
    with pytest.raises(TypeError):
        list(chunk_packet("labels", 0, torch.zeros(3), 8))
    with pytest.raises(ValueError, match="unknown packet kind"):
        list(chunk_packet("weights", 0, _packet(3), 8))
