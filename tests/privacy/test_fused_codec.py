"""The private compress (clip + noise + quantize in one pass) of the C++ CPU kernel (and the CUDA
one, where a GPU is present) against the plain-torch oracle: byte-identical packets for the same
factors and noise seed.

Exactness: every backend clips with the same float32 factors (computed in torch) and draws the
same counter-hash noise; the noise is float32(sigma * Box-Muller in float64), and float64 log/cos
may differ in the last bit between libm implementations, which changes a float32 noise value in
about one element in 2^29, and a code only if that value also sits on a rounding boundary. The
seeds here are fixed, so the comparison is exact and deterministic.
"""
import pytest
import torch

from splitlora import _ops, codec, codec_reference
from splitlora.privacy import clip_and_noise, clip_factors

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = [(8, False), (8, True), (4, False), (4, True), (2, True), (16, False)]
# The C++ kernel must serve CPU tensors (else these tests would compare the oracle with itself).
needs_cpu_kernel = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("splitlora::compress_private", "CPU"),
    reason="extension not built")


def _header(x, bits, group_size, stochastic):
    return list(codec._build_header(x.dtype, tuple(x.shape), bits, group_size, stochastic))


def _case(dtype, shape=(3, 37, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.logspace(-1, 1.5, shape[0])[:, None, None]).to(dtype)
    mask = torch.ones(shape[:2], dtype=torch.long)
    mask[0, 30:] = 0
    mask[2, 5:] = 0
    return x, mask


@needs_cpu_kernel
@pytest.mark.parametrize("bits, stochastic", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [16, 64])
def test_cpu_kernel_writes_the_oracle_packet(dtype, bits, stochastic, group_size):
    x, mask = _case(dtype)
    factors = clip_factors(x, 5.0, mask)
    args = (x, factors, _header(x, bits, group_size, stochastic), bits, group_size, stochastic, 1234567, 0.8, 987654321)
    kernel, kflag = _ops.compress_private(*args)  # dispatches to the C++ CPU kernel
    oracle, oflag = codec_reference.compress_private_kernel(*args)
    assert torch.equal(kernel, oracle)
    assert int(kflag) == int(oflag) == 0


@needs_cpu_kernel
def test_cpu_kernel_without_mask_and_without_noise():
    x, _ = _case(torch.float32)
    factors = clip_factors(x, 2.0)
    args = (x, factors, _header(x, 8, 64, False), 8, 64, False, 0, 0.0, 42)
    assert torch.equal(_ops.compress_private(*args)[0], codec_reference.compress_private_kernel(*args)[0])


@needs_cpu_kernel
def test_the_noise_changes_the_packet_and_the_seed_picks_it():
    x, mask = _case(torch.float32)
    f = clip_factors(x, 5.0, mask)
    h = _header(x, 8, 64, False)
    a = _ops.compress_private(x, f, h, 8, 64, False, 0, 0.8, 1)[0]
    b = _ops.compress_private(x, f, h, 8, 64, False, 0, 0.8, 2)[0]
    c = _ops.compress_private(x, f, h, 8, 64, False, 0, 0.0, 1)[0]
    assert not torch.equal(a, b) and not torch.equal(a, c)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compress_with_clip_is_clip_and_noise_then_compress(dtype):
    """The public pair: the fused codec and the plain-torch clip_and_noise draw the same noise
    from the same generator state, so the fused packet equals compressing the oracle's float32
    output under x's header."""
    x, mask = _case(dtype)
    fused = codec.compress(x, 8, 64, clip=5.0, noise_multiplier=0.8, mask=mask,
                           noise_generator=torch.Generator().manual_seed(7))
    y = clip_and_noise(x.float(), 5.0, 0.8, generator=torch.Generator().manual_seed(7), mask=mask)
    plain = codec._compress(y, 8, 64, False, None, wire_dtype=dtype)
    assert torch.equal(fused, plain)
    out = codec.decompress(fused)
    assert out.dtype == dtype and out.shape == x.shape
    assert (out[mask == 0] == 0).all()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_private_packet_has_the_configured_noise(dtype, device):
    """What the receiver decodes minus the un-noised (clipped) packet's decode: mean 0, std sigma
    (8-bit quantization and the cast to dtype add small errors, well inside the tolerance)."""
    x = (torch.randn(64, 64, 64) * 1e-4).to(dtype).to(device)  # inside the bound: clipping leaves it unchanged
    clip, mult = 1.0, 0.5
    noisy = codec.decompress(codec.compress(x, 8, 64, clip=clip, noise_multiplier=mult,
                                            noise_generator=torch.Generator().manual_seed(0)))
    clean = codec.decompress(codec.compress(x, 8, 64, clip=clip, noise_multiplier=0.0))
    d = (noisy.double() - clean.double()).cpu().reshape(-1)
    sigma = mult * clip
    assert abs(d.mean().item()) < 5 * sigma / d.numel() ** 0.5
    assert abs(d.std().item() / sigma - 1) < 0.01  # a wrong sigma (e.g. noise_multiplier alone at clip 2) fails


@needs_cpu_kernel
def test_old_packets_still_decode_and_plain_compress_is_unchanged():
    x, _ = _case(torch.float32)
    packet = codec.compress(x, 8, 64)
    assert torch.equal(packet, codec_reference.compress_kernel(x, _header(x, 8, 64, False), 8, 64, False, 0)[0])
    torch.testing.assert_close(codec.decompress(packet), x, rtol=0.02, atol=0.02 * float(x.abs().max()))


def test_compress_private_arguments_are_checked():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="need clip"):
        codec.compress(x, 8, 64, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip must be a positive"):
        codec.compress(x, 8, 64, clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="mask must have the leading shape"):
        codec.compress(x, 8, 64, clip=1.0, noise_multiplier=1.0, mask=torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="number of factors must divide"):
        _ops.compress_private(x, torch.ones(5), _header(x, 8, 64, False), 8, 64, False, 0, 1.0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not torch._C._dispatch_has_kernel_for_dispatch_key(
    "splitlora::compress_private", "CUDA"), reason="no CUDA device, or splitlora._C built without CUDA kernels")
@pytest.mark.parametrize("bits, stochastic", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_writes_the_oracle_packet(dtype, bits, stochastic):
    x, mask = _case(dtype, shape=(5, 301, 96))
    x, mask = x.cuda(), mask.cuda()
    factors = clip_factors(x, 5.0, mask)
    args = (x, factors, _header(x, bits, 64, stochastic), bits, 64, stochastic, 99, 0.8, 31337)
    kernel, kflag = _ops.compress_private(*args)
    oracle, _ = codec_reference.compress_private_kernel(*args)
    # CUDA's float64 log/cos may differ from torch's in the last bit: allow a handful of codes.
    same = (kernel == oracle).double().mean().item()
    assert torch.equal(kernel[:96], oracle[:96]) and same > 1 - 1e-5, same
    assert int(kflag) == 0
