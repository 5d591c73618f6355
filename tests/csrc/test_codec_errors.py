"""Bad input and bad packets: every one is a ValueError (TypeError for non-tensors), never a crash."""
import pytest
import torch

from codec_testutil import DTYPES, activations, read_header, rewrite_header
from splitlora import codec


@pytest.fixture(scope="module")
def packet():
    return codec.compress(activations((6, 50), torch.bfloat16, seed=8), 4, 32)


def test_the_fixture_packet_is_valid(packet):
    assert codec.decompress(packet).shape == (6, 50)
    assert torch.equal(rewrite_header(packet), packet)  # the test helper rebuilds the same header


@pytest.mark.parametrize("length", [0, 1, 50, 95, 96, 97, 200, -1])
def test_truncated_packets(packet, length):
    cut = packet[: packet.numel() + length] if length < 0 else packet[:length]
    with pytest.raises(ValueError, match="truncated|bytes"):
        codec.decompress(cut)


def test_appended_bytes(packet):
    with pytest.raises(ValueError, match="bytes"):
        codec.decompress(torch.cat([packet, torch.zeros(1, dtype=torch.uint8)]))
    with pytest.raises(ValueError, match="bytes"):
        codec.decompress(torch.cat([packet, packet]))


@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_every_flipped_header_byte_is_caught(packet, flip):
    for i in range(96):
        bad = packet.clone()
        bad[i] ^= flip
        with pytest.raises(ValueError):
            codec.decompress(bad)
        with pytest.raises(ValueError):
            codec.packet_info(bad)


def test_wrong_magic(packet):
    with pytest.raises(ValueError, match="magic"):
        codec.decompress(rewrite_header(packet, magic=b"XLCD"))
    foreign = torch.randint(0, 256, (packet.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="magic"):
        codec.decompress(foreign)


def test_header_checksum_mismatch(packet):
    with pytest.raises(ValueError, match="checksum"):
        codec.decompress(rewrite_header(packet, fix_crc=False, group_size=64))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 2}, "version"),
        ({"dtype": 3}, "dtype"),
        ({"bits": 3}, "bits"),
        ({"bits": 16, "flags": 0}, "bytes"),  # valid fields, but the length no longer matches
        ({"flags": 2}, "flags"),
        ({"ndim": 9}, "ndim"),
        ({"reserved16": 1}, "reserved"),
        ({"reserved32": 7}, "reserved"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 8192}, "group_size"),
        ({"numel": 301}, "numel"),
        ({"shape": [6, -50, 0, 0, 0, 0, 0, 0], "numel": 300}, "shape"),
        ({"shape": [6, 50, 0, 0, 0, 0, 0, 3]}, "shape"),
        ({"shape": [2**40, 2**20] + [0] * 6, "numel": 2**60}, "bytes"),
        ({"shape": [2**31] * 2 + [0] * 6, "numel": 2**62, "bits": 16}, "bytes"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_inconsistent_header_with_a_valid_checksum(packet, changes, message):
    bad = rewrite_header(packet, **changes)
    with pytest.raises(ValueError, match=message):
        codec.decompress(bad)


def test_stochastic_flag_is_refused_for_bits16():
    p16 = codec.compress(activations((10,), torch.float32), 16)
    with pytest.raises(ValueError, match="flags"):
        codec.decompress(rewrite_header(p16, flags=1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_corrupted_scales_are_caught(packet, value):
    bad = packet.clone()
    scales = bad[96 : 96 + 4 * 10].view(torch.float32)  # 300 elements / 32 = 10 groups
    scales[7] = value
    with pytest.raises(ValueError, match="scale"):
        codec.decompress(bad)


def test_flipped_code_bits_decode_without_error(packet):
    # Documented limitation: every code value is valid, so payload corruption is not detectable.
    bad = packet.clone()
    bad[packet.numel() - 20] ^= 0x11  # codes of elements 24, 25 of group 8 (not padding)
    y = codec.decompress(bad)
    assert not torch.equal(y, codec.decompress(packet))


def test_wrong_packet_types(packet):
    with pytest.raises(ValueError, match="uint8"):
        codec.decompress(packet.float())
    with pytest.raises(ValueError, match="uint8"):
        codec.decompress(packet.view(torch.int8))
    with pytest.raises(ValueError, match="1-D"):
        codec.decompress(packet.view(1, -1))
    with pytest.raises(TypeError):
        codec.decompress(bytes(packet.tolist()))


def test_misaligned_and_strided_packets_still_decode(packet):
    buf = torch.zeros(packet.numel() + 3, dtype=torch.uint8)
    buf[3:] = packet
    assert torch.equal(codec.decompress(buf[3:]), codec.decompress(packet))
    doubled = torch.zeros(2 * packet.numel(), dtype=torch.uint8)
    doubled[::2] = packet
    assert torch.equal(codec.decompress(doubled[::2]), codec.decompress(packet))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(dtype, bits, value):
    x = activations((3, 70), dtype, seed=1)
    for pos in [(0, 0), (2, 69), (1, 33)]:
        bad = x.clone()
        bad[pos] = value
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.compress(bad, bits, 64)
    if bits != 16:
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.compress(bad, bits, 64, stochastic=True)


def test_float32_beyond_bfloat16_range_is_refused_at_bits16():
    x = torch.tensor([1.0, 3.4e38])
    with pytest.raises(ValueError, match="bfloat16 range"):
        codec.compress(x, 16)
    codec.compress(x, 8)  # quantized: fine, the scale is finite


@pytest.mark.parametrize("bits", [0, 1, 3, 32, True, 8.0, "8"])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        codec.compress(torch.ones(10), bits)


@pytest.mark.parametrize("group_size", [0, 8, 15, 48, 100, 8192, 64.0])
def test_unsupported_group_sizes(group_size):
    with pytest.raises(ValueError, match="group_size"):
        codec.compress(torch.ones(10), 8, group_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_unsupported_dtypes_name_the_allowed_ones(dtype):
    with pytest.raises(ValueError, match="float32, torch.float16 or torch.bfloat16"):
        codec.compress(torch.ones(10).to(dtype))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="stochastic"):
        codec.compress(torch.ones(10), 16, stochastic=True)
    with pytest.raises(ValueError, match="dimensions"):
        codec.compress(torch.ones([1] * 9))
    with pytest.raises(TypeError):
        codec.compress([1.0, 2.0])
    with pytest.raises(TypeError, match="generator"):
        codec.compress(torch.ones(10), 8, stochastic=True, generator=123)


def test_header_helper_reads_what_compress_wrote(packet):
    fields = read_header(packet)
    assert fields["magic"] == b"SLCD" and fields["bits"] == 4 and fields["shape"][:2] == [6, 50]
