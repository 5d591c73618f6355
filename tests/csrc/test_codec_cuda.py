"""The codec on CUDA tensors: identical packets to the CPU, round trips and checks on the GPU.

They run against whichever backend serves CUDA tensors: the CUDA kernels of splitlora._C when it
was built with them, else the plain-torch kernels (which must give the same packets as well).
"""
import pytest
import torch

import splitlora._ext as ext
from codec_testutil import (
    CODEC_MODE_IDS,
    CODEC_MODES,
    DTYPES,
    QUANT_BITS,
    activations,
    expected_group_scales,
    packet_scales,
    rewrite_header,
    roundtrip_error_bound,
)
from splitlora import _ops, codec, codec_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=["0", "1"], ids=["classic16", "lean16"])
def compress16_path(request, monkeypatch):
    """Every test on both compress paths of the CUDA kernels for 16-bit inputs: the established
    one and the lean one (SPLITLORA_CODEC_LEAN16=1, csrc/codec_cuda.cu), which must give the same
    packets, with either rounding. Float32 inputs take the established path either way."""
    monkeypatch.setenv("SPLITLORA_CODEC_LEAN16", request.param)
    return request.param


@pytest.mark.skipif(not ext.built_with_cuda(), reason="splitlora._C was built without CUDA kernels")
def test_cuda_backend_serves_cuda_tensors():
    assert codec.backend_for("cuda") == "cuda"
    assert _ops.has_cuda_sync_ops()  # the public API takes the one-sync path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, stochastic", CODEC_MODES, ids=CODEC_MODE_IDS)
# 16..256: groups within a warp row; 512/1024: across a thread's rows (bf16); 2048/4096: across
# warps (through shared memory). Float32 chunks hold 4 elements, so its thresholds are halved.
@pytest.mark.parametrize("group_size", [16, 64, 256, 512, 1024, 2048, 4096])
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


def _boundary_values(dtype, bits, group_size, seed):
    """Values on, and one float32 ulp beside, the rounding boundaries of their group (multiples of
    scale/2), plus groups that are all zero, partly zero, tiny (subnormal scales) and huge."""
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    ng = 24
    amax = torch.exp(torch.randn(ng, 1, generator=g) * 2)
    j = torch.randint(-2 * qmax, 2 * qmax + 1, (ng, group_size), generator=g).float()
    x = amax * j / (2 * qmax)
    x[:, 0] = amax[:, 0]
    step = torch.randint(-1, 2, x.shape, generator=g).float()
    x = torch.where(step != 0, torch.nextafter(x, x + step), x)
    x[1] = 0.0
    x[2, ::3] = 0.0
    x[3] *= 1e-40  # subnormal float32: scale far below 2^-125
    x[4] *= 2.0**-120
    huge = 1e35 if dtype != torch.float16 else 1.0
    x[5] *= huge
    x[6] = x[6].sign() * 3e38 if dtype != torch.float16 else x[6]
    return x.reshape(-1)[: ng * group_size - 7].to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("group_size", [64, 4096])
def test_cuda_rounding_boundaries_match_cpu(dtype, bits, stochastic, group_size):
    # The kernels multiply by the reciprocal of the scale and fall back to IEEE division near a
    # rounding boundary: these inputs sit on the boundaries, so both branches must match the CPU.
    x = _boundary_values(dtype, bits, group_size, seed=bits * 7 + group_size)
    assert torch.isfinite(x).all()
    for seed in (3, 4):
        gpu = codec.compress(x.cuda(), bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(seed))
        cpu = codec.compress(x, bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(codec.decompress(gpu).cpu(), codec.decompress(cpu))
        if not stochastic:
            break


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, stochastic", [(8, False), (2, True), (16, False)], ids=["8bit", "2bit-sr", "16bit"])
def test_cuda_many_blocks_with_a_partial_tail(dtype, bits, stochastic):
    # Whole blocks of 4096 elements take the unchecked path, the tail block the checked one.
    x = activations((3, 100_003), dtype, seed=11)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    gpu = codec.compress(x.cuda(), bits, 128, stochastic=stochastic, generator=gen())
    cpu = codec.compress(x, bits, 128, stochastic=stochastic, generator=gen())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(codec.decompress(gpu).cpu(), codec.decompress(cpu))


def test_cuda_ops_report_flags_as_tensors():
    # The bare ops (torch.compile's path) return their flags on the device, cleared per call.
    x = activations((3, 700), torch.float32, seed=3, device="cuda")
    header = list(codec._build_header(x.dtype, tuple(x.shape), 4, 64, False))
    packet, flag = torch.ops.splitlora.compress(x, header, 4, 64, False, 0)
    assert flag.device == x.device and flag.item() == 0
    y, bad = torch.ops.splitlora.decompress(packet, x.dtype, list(x.shape), 4, 64)
    assert bad.item() == 0 and torch.equal(y, codec.decompress(packet))
    x[1, 5] = float("inf")
    assert torch.ops.splitlora.compress(x, header, 4, 64, False, 0)[1].item() != 0
    packet[96:100] = torch.tensor([0, 0, 0x80, 0xFF], dtype=torch.uint8, device="cuda")  # -Inf scale
    assert torch.ops.splitlora.decompress(packet, x.dtype, list(x.shape), 4, 64)[1].item() != 0
    x[1, 5] = 0.0
    assert torch.ops.splitlora.compress(x, header, 4, 64, False, 0)[1].item() == 0


def test_cuda_flags_clear_between_calls():
    # The public API reads its flags from one pinned word per thread: a refused call must not
    # leave it set for the next one.
    x = activations((2, 500), torch.bfloat16, seed=6, device="cuda")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.compress(bad, 8, 64)
    packet = codec.compress(x, 8, 64)
    corrupt = packet.clone()
    corrupt[96:100] = torch.tensor([0, 0, 0x80, 0xBF], dtype=torch.uint8, device="cuda")  # -1.0
    with pytest.raises(ValueError, match="scale"):
        codec.decompress(corrupt)
    assert torch.equal(codec.decompress(packet).cpu(), codec.decompress(packet.cpu()))


def test_cuda_corrupted_header_is_refused():
    packet = codec.compress(activations((1000,), torch.float32, device="cuda"), 8, 64)
    bad = packet.clone()
    bad[20] ^= 1  # numel, under the CRC
    with pytest.raises(ValueError, match="checksum"):
        codec.decompress(bad)
    with pytest.raises(ValueError, match="holds"):
        codec.decompress(rewrite_header(packet, numel=500, shape=[500]))
    with pytest.raises(ValueError, match="shorter"):
        codec.decompress(packet[:50])


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_cuda_subnormal_groups_match_cpu(bits, stochastic):
    # Float32 subnormals: absmax / qmax rounds to zero (then every q is 0) or to a subnormal
    # scale (then the reciprocal shortcut is off and every element takes the IEEE division).
    g = torch.Generator().manual_seed(bits)
    ints = torch.randint(-60, 61, (12, 64), generator=g).double()
    exps = torch.tensor([-149, -148, -147, -146, -145, -144, -140, -135, -130, -127, -126, -100]).double()
    x = (ints * torch.pow(2.0, exps).view(-1, 1)).float().reshape(-1)
    assert (x.abs().max() > 0) and torch.equal(x.double(), (ints * torch.pow(2.0, exps).view(-1, 1)).reshape(-1))
    gen = lambda: torch.Generator().manual_seed(8)  # noqa: E731
    gpu = codec.compress(x.cuda(), bits, 64, stochastic=stochastic, generator=gen())
    cpu = codec.compress(x, bits, 64, stochastic=stochastic, generator=gen())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(codec.decompress(gpu).cpu(), codec.decompress(cpu))


@pytest.mark.skipif(not ext.built_with_cuda(), reason="splitlora._C was built without CUDA kernels")
def test_cuda_lean16_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("SPLITLORA_CODEC_LEAN16", "yes")
    x = activations((256,), torch.bfloat16, seed=3, device="cuda")
    with pytest.raises(RuntimeError, match="SPLITLORA_CODEC_LEAN16 must be 0 or 1"):
        codec.compress(x, 8, 64)
