"""The CUDA compress kernels' lean path for 16-bit inputs, compiled for the host and checked
byte for byte against the CPU kernels' packets.

csrc/codec_chunk.cuh holds the per-chunk code of the CUDA kernels. tests/csrc/lean16_host.cpp
compiles that very source with the host's C++ compiler, csrc/cuda_host_shim.h standing in for the
CUDA intrinsics (IEEE float32 operations and FMA with the same rounding; rcp.approx as the
correctly rounded reciprocal or either neighbour, the 1 ulp it may be off). The harness plays
compress_kernel's launch on the lean path (blocks of kThreads threads, U chunks per thread) through
lean_thread_chunks, the function compress_block calls.

Covered without a GPU: lean_scale, lean_reciprocal, the FMA rounding with its boundary check and
the exact fallback, lean_pack, stochastic rounding's numbers, the tail of the last group, and the
addressing of scales and codes per block, thread and row. Not covered: what nvcc makes of the
source (tests/csrc/test_codec_cuda.py on a GPU), the absmax reduction across lanes and warps
(shared with the established path, which GPU runs have checked), and speed.
"""
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from codec_testutil import absmax_spread, activations, finite_nonnegative_16bit
from splitlora import _ops, codec

ROOT = Path(__file__).resolve().parents[2]
HEADER = codec.HEADER_BYTES
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]


@pytest.fixture(scope="module")
def lean16(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH")
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        pytest.skip(f"the shim's float32 arithmetic is only exact where the compiler keeps float in "
                    f"float32 registers (x86-64, AArch64), not on {platform.machine()}")
    lib = tmp_path_factory.mktemp("lean16") / "liblean16.so"
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall",
           "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "csrc" / "lean16_host.cpp"),
           "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"the host build of codec_chunk.cuh failed:\n{done.stderr[-4000:]}"
    so = ctypes.CDLL(str(lib))
    so.sl_lean16_compress.restype = ctypes.c_int
    so.sl_lean16_compress.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    return so


def cpu_packet(x, bits, group_size, stochastic, seed):
    """The CPU kernels' packet and non-finite flag (the op, so non-finite input gives a packet too)."""
    header = list(codec._build_header(x.dtype, tuple(x.shape), bits, group_size, stochastic))
    packet, flag = _ops.compress(x, header, bits, group_size, stochastic, seed)
    return packet, int(flag.item())


def lean_packet(lib, x, bits, group_size, stochastic, seed, rcp_ulps, like):
    """The host build's packet and flag: a buffer of the size of the packet `like`, whose scales and
    codes (at the offsets its header implies) the harness fills; the header bytes stay zero."""
    codes_off = HEADER + codec.packet_info(like).scale_bytes
    buf = np.zeros(like.numel(), dtype=np.uint8)
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    flag = lib.sl_lean16_compress(codec.DTYPE_CODES[x.dtype], bits, int(stochastic), seed, raw.ctypes.data,
                                  x.numel(), group_size, rcp_ulps, buf.ctypes.data, codes_off)
    assert flag in (0, 1), "the harness refused its arguments"
    return buf, flag


def assert_same_packet(lib, x, bits, group_size, stochastic=False, seed=0, rcp_ulps=0) -> int:
    """Asserts the host build writes the CPU kernels' scales and codes and flag; returns the flag."""
    packet, ref_flag = cpu_packet(x, bits, group_size, stochastic, seed)
    got, flag = lean_packet(lib, x, bits, group_size, stochastic, seed, rcp_ulps, like=packet)
    ref = packet.numpy()
    diff = np.nonzero(got[HEADER:] != ref[HEADER:])[0]
    assert diff.size == 0, (f"{diff.size} bytes differ after the header, the first at packet offset "
                            f"{HEADER + diff[0]}: lean {got[HEADER + diff[0]]}, CPU {ref[HEADER + diff[0]]}")
    assert flag == ref_flag
    return ref_flag


def every_value_under_each_absmax(dtype, group_size=4096):
    """For each absmax m of a spread: groups that hold m and, between them, every finite value of
    the dtype with |v| <= m (both signs); zero-padded to whole groups."""
    values = finite_nonnegative_16bit(dtype)
    parts = []
    for m in absmax_spread(dtype):
        mag = values[values <= m]
        v = np.concatenate([mag, -mag])
        per_group = group_size - 1
        n_groups = -(-v.size // per_group)
        block = np.zeros((n_groups, group_size), dtype=np.float32)
        block[:, 0] = m
        flat = block[:, 1:].reshape(-1)
        flat[:v.size] = v
        block[:, 1:] = flat.reshape(n_groups, per_group)
        parts.append(block.reshape(-1))
    return torch.from_numpy(np.concatenate(parts)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rcp_ulps", [-1, 0, 1], ids=["rcp-1ulp", "rcp-exact", "rcp+1ulp"])
def test_every_16bit_value_under_a_spread_of_absmax_gives_the_cpu_packet(lean16, dtype, bits, rcp_ulps):
    x = every_value_under_each_absmax(dtype)
    assert_same_packet(lean16, x, bits, 4096, rcp_ulps=rcp_ulps)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_rounding_gives_the_cpu_packet(lean16, dtype, bits):
    # A seed with high bits set: both halves of it feed the hash.
    seed = (1 << 61) + 0x9E3779B97F4A7C15 % (1 << 61)
    x = activations((3, 8192 + 40), dtype, seed=1)
    assert_same_packet(lean16, x, bits, 64, stochastic=True, seed=seed)
    # Every 16-bit value too, with groups whose absmax lands its scale on awkward values.
    assert_same_packet(lean16, every_value_under_each_absmax(dtype), bits, 4096, stochastic=True, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [16, 64, 4096])
@pytest.mark.parametrize("numel", [1, 7, 9, 4095, 8192, 3 * 8192 + 13])
def test_sizes_tails_and_group_sizes_give_the_cpu_packet(lean16, dtype, bits, group_size, numel):
    # 8192 elements are one compress block of 16-bit input: whole blocks, a partial last block,
    # and tails inside a chunk and inside a group.
    x = activations((numel,), dtype, seed=numel + group_size)
    assert_same_packet(lean16, x, bits, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_and_tiny_groups_give_the_cpu_packet(lean16, dtype):
    # All-zero groups (scale 0), and groups of subnormal-sized values whose bfloat16 scale lies
    # below 2^-125, where the reciprocal would not be a normal float and every element is exact.
    tiny = torch.tensor(1e-38 if dtype == torch.bfloat16 else 6e-8).to(dtype)
    x = torch.zeros(4 * 64, dtype=dtype)
    x[64:128] = tiny * torch.linspace(-1, 1, 64).to(dtype)
    x[128:192] = activations((64,), dtype, seed=3)
    for bits in (8, 4, 2):
        for stochastic in (False, True):
            assert_same_packet(lean16, x, bits, 64, stochastic=stochastic, seed=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_groups_raise_the_flag_and_give_the_cpu_packet(lean16, dtype, bad):
    x = activations((4 * 64,), dtype, seed=5)
    x[70] = bad
    assert assert_same_packet(lean16, x, 8, 64) == 1
