"""The C++ CPU kernels against the plain-torch reference, op registration, and the fallback."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_testutil import CODEC_MODE_IDS, CODEC_MODES, DTYPES, activations, has_cpp_cpu
from splitlora import codec, codec_reference

needs_cpp = pytest.mark.skipif(not has_cpp_cpu(), reason="splitlora._C is not built: no C++ CPU kernels to compare")


def _both(x, bits, group_size, stochastic, seed):
    """Packets of the dispatched op (C++ on CPU) and of the reference kernel, same generator state."""
    ext = codec.compress(x, bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(seed))
    ref = codec._compress(
        x, bits, group_size, stochastic, torch.Generator().manual_seed(seed), kernel=codec_reference.compress_kernel
    )
    return ext, ref


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, stochastic", CODEC_MODES, ids=CODEC_MODE_IDS)
@pytest.mark.parametrize("group_size", [16, 64, 4096])
def test_cpp_cpu_packets_equal_reference_packets(dtype, bits, stochastic, group_size):
    x = activations((3, 1000), dtype, seed=bits + group_size)  # 3000: not a multiple of any group size
    x[0, :200] = 0.0  # an all-zero group or two
    ext, ref = _both(x, bits, group_size, stochastic, seed=11)
    assert torch.equal(ext, ref)
    # And both decoders rebuild the same tensor from it.
    info = codec.packet_info(ext)
    y_ext = codec.decompress(ext)
    y_ref = codec._decode(ext, info, kernel=codec_reference.decompress_kernel)
    assert torch.equal(y_ext, y_ref)


@needs_cpp
def test_stochastic_packets_depend_on_the_generator_seed():
    x = activations((2000,), torch.float32, seed=1)
    a, _ = _both(x, 4, 64, True, seed=1)
    b, _ = _both(x, 4, 64, True, seed=2)
    assert not torch.equal(a, b)
    c = codec.compress(x, 4, 64)  # round to nearest differs from both
    assert not torch.equal(a[96:], c[96:])


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(0, 5000),
    group_size=st.sampled_from([16, 32, 64, 256, 1024, 4096]),
    bits=st.sampled_from([2, 4, 8, 16]),
    dtype=st.sampled_from(DTYPES),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_cpp_cpu_equals_reference(numel, group_size, bits, dtype, stochastic, seed):
    stochastic = stochastic and bits != 16
    x = activations((numel,), dtype, seed=seed % 1000)
    ext, ref = _both(x, bits, group_size, stochastic, seed)
    assert torch.equal(ext, ref)


def test_reference_hash_matches_the_32_bit_definition():
    # lowbias32 twice, written with Python ints (arbitrary precision, masked by hand).
    def lowbias32(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    seed = 0x2BCD_EF01_2345_6789
    index = [0, 1, 2, 12345, 2**32 - 1, 2**32, 2**40 + 7]
    expected = [lowbias32(lowbias32((i & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) ^ (i >> 32) ^ (seed >> 32)) for i in index]
    got = codec_reference.sr_hash(torch.tensor(index, dtype=torch.int64), seed).tolist()
    assert got == expected


@needs_cpp
def test_cpp_packet_size_matches_python():
    import splitlora._C as C

    for numel in (0, 1, 15, 16, 17, 1000, 123457):
        for bits in (2, 4, 8, 16):
            for group_size in (16, 64, 4096):
                assert C.packet_bytes(numel, group_size, bits) == codec.packed_size(numel, bits, group_size)
    assert C.format_version() == codec.FORMAT_VERSION and C.header_bytes() == codec.HEADER_BYTES
    assert isinstance(C.built_with_cuda(), bool)


def test_backend_for_names_a_known_backend():
    assert codec.backend_for("cpu") in ("cpp-cpu", "torch")
    assert codec.backend_for(torch.device("meta")) == "torch"
    if has_cpp_cpu():
        assert codec.backend_for("cpu") == "cpp-cpu"


def _op_args(x, bits, group_size, stochastic, seed=5):
    header = list(codec._build_header(x.dtype, tuple(x.shape), bits, group_size, stochastic))
    return (x, header, bits, group_size, stochastic, seed)


@pytest.mark.parametrize("bits,stochastic", [(4, False), (2, True), (16, False)])
def test_opcheck_compress(bits, stochastic):
    x = activations((5, 40), torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.splitlora.compress.default, _op_args(x, bits, 32, stochastic))


@pytest.mark.parametrize("bits", [8, 16])
def test_opcheck_decompress(bits):
    x = activations((5, 40), torch.float16, seed=2)
    packet = codec.compress(x, bits, 32)
    torch.library.opcheck(torch.ops.splitlora.decompress.default, (packet, torch.float16, [5, 40], bits, 32))


def test_fake_kernels_give_the_real_sizes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = activations((7, 33), torch.float32)
    real, _ = torch.ops.splitlora.compress(*_op_args(x, 4, 16, False))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake_packet, fake_flag = torch.ops.splitlora.compress(*_op_args(fx, 4, 16, False))
        fake_out, _ = torch.ops.splitlora.decompress(mode.from_tensor(real), torch.bfloat16, [7, 33], 4, 16)
    assert fake_packet.shape == real.shape and fake_packet.dtype == torch.uint8 and fake_flag.shape == (1,)
    assert fake_out.shape == (7, 33) and fake_out.dtype == torch.bfloat16


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["splitlora._C"] = None  # what a missing or unloadable build looks like to Python
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        from splitlora import codec, _ext
        _ext.load(); _ext.load()
        x = torch.load(sys.argv[1])
        packets = [codec.compress(x, b, 64) for b in (2, 4, 8, 16)]
        packets.append(codec.compress(x, 4, 64, stochastic=True, generator=torch.Generator().manual_seed(3)))
        decoded = [codec.decompress(p) for p in packets]
    notes = [w for w in caught if issubclass(w.category, _ext.ExtensionNotBuiltWarning)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    message = str(notes[0].message)
    assert "plain-torch" in message and "pip install" in message, message
    assert codec.backend_for("cpu") == "torch"
    torch.save({"packets": packets, "decoded": decoded}, sys.argv[2])
    """
)


def test_without_the_extension_the_plain_torch_codec_gives_the_same_packets(tmp_path):
    x = activations((9, 100), torch.bfloat16, seed=4)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / "out.pt")
    packets = [codec.compress(x, b, 64) for b in (2, 4, 8, 16)]
    packets.append(codec.compress(x, 4, 64, stochastic=True, generator=torch.Generator().manual_seed(3)))
    for mine, theirs, dec in zip(packets, out["packets"], out["decoded"]):
        assert torch.equal(mine, theirs)
        assert torch.equal(codec.decompress(mine), dec)
