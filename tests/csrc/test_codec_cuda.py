"""The codec on CUDA tensors: identical packets to the CPU, round trips and checks on the GPU.

They run against whichever backend serves CUDA tensors: the CUDA kernels of splitlora._C when it
was built with them, else the plain-torch kernels (which must give the same packets as well).
"""
import pytest
import torch

import splitlora._ext as ext
from codec_testutil import CODEC_MODE_IDS, CODEC_MODES, DTYPES, activations, expected_group_scales, packet_scales, roundtrip_error_bound
from splitlora import codec, codec_reference

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not ext.built_with_cuda(), reason="splitlora._C was built without CUDA kernels")
def test_cuda_backend_serves_cuda_tensors():
    assert codec.backend_for("cuda") == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, stochastic", CODEC_MODES, ids=CODEC_MODE_IDS)
@pytest.mark.parametrize("group_size", [16, 64, 512, 4096])
def test_cuda_packets_equal_cpu_packets(dtype, bits, stochastic, group_size):
    x = activations((5, 2001), dtype, seed=bits + group_size)  # not a multiple of any group size
    x[1, :600] = 0.0
    gpu = codec.compress(x.cuda(), bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(7))
    cpu = codec.compress(x, bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(7))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    y_gpu = codec.decompress(gpu)
    assert y_gpu.device.type == "cuda"
    assert torch.equal(y_gpu.cpu(), codec.decompress(cpu))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_round_trip_bound(dtype, bits):
    x = activations((64, 1000), dtype, seed=bits, device="cuda")
    packet = codec.compress(x, bits, 128)
    y = codec.decompress(packet)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    scales = packet_scales(packet)
    assert torch.equal(scales, expected_group_scales(x, bits, 128))
    assert roundtrip_error_bound(x, y, scales, 128) > 0.3


@pytest.mark.parametrize("shape", [(0,), (), (1,), (15,), (16,), (17,), (3, 5, 7)], ids=str)
def test_cuda_edge_shapes(shape):
    x = activations(shape, torch.bfloat16, seed=1, device="cuda")
    for bits in (2, 8, 16):
        packet = codec.compress(x, bits, 16)
        assert torch.equal(packet.cpu(), codec.compress(x.cpu(), bits, 16))
        assert codec.decompress(packet).shape == x.shape


def test_cuda_misaligned_input_and_packet():
    big = activations((4097,), torch.bfloat16, seed=2, device="cuda")
    view = big[1:]  # contiguous, but starts 2 bytes into the allocation
    assert torch.equal(codec.compress(view, 4, 64).cpu(), codec.compress(view.cpu(), 4, 64))
    packet = codec.compress(view, 4, 64)
    buf = torch.zeros(packet.numel() + 5, dtype=torch.uint8, device="cuda")
    buf[5:] = packet
    assert torch.equal(codec.decompress(buf[5:]), codec.decompress(packet))


@pytest.mark.parametrize("bits", [4, 16])
def test_cuda_non_finite_input_is_refused(bits):
    x = activations((3, 700), torch.float32, seed=3, device="cuda")
    x[2, 699] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.compress(x, bits, 64)
    x[2, 699] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.compress(x, bits, 4096)


def test_cuda_corrupted_scale_is_refused():
    packet = codec.compress(activations((1000,), torch.float32, device="cuda"), 8, 64)
    packet[96 + 4 * 3 : 96 + 4 * 4] = torch.tensor([0, 0, 0xC0, 0x7F], dtype=torch.uint8, device="cuda")  # NaN
    with pytest.raises(ValueError, match="scale"):
        codec.decompress(packet)


def test_cuda_reference_kernels_agree():
    # The plain-torch kernels also run on CUDA tensors (the fallback for CPU-only builds).
    x = activations((3, 999), torch.bfloat16, seed=4, device="cuda")
    for bits, stochastic in ((2, False), (8, False), (16, False), (4, True)):
        ours = codec.compress(x, bits, 64, stochastic=stochastic, generator=torch.Generator().manual_seed(2))
        ref = codec._compress(x, bits, 64, stochastic, torch.Generator().manual_seed(2),
                              kernel=codec_reference.compress_kernel)
        assert torch.equal(ours, ref)
        info = codec.packet_info(ours)
        assert torch.equal(codec.decompress(ours), codec._decode(ours, info, kernel=codec_reference.decompress_kernel))


def test_cuda_error_feedback():
    ef = codec.ErrorFeedback()
    x = activations((16, 256), torch.bfloat16, seed=5, device="cuda")
    for _ in range(3):
        packet = ef.compress(x, 2, 64)
    assert packet.device.type == "cuda" and ef.residual.device.type == "cuda"


def test_cuda_opcheck():
    x = activations((5, 40), torch.bfloat16, seed=2, device="cuda")
    header = list(codec._build_header(x.dtype, tuple(x.shape), 4, 32, True))
    torch.library.opcheck(torch.ops.splitlora.compress.default, (x, header, 4, 32, True, 9))
    packet = codec.compress(x, 4, 32)
    torch.library.opcheck(torch.ops.splitlora.decompress.default, (packet, torch.bfloat16, [5, 40], 4, 32))
