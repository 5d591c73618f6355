"""csrc/codec_cuda.cu compiles for an H100 (sm_90) with nvcc, on a machine without a GPU.

CI builds the extension without its CUDA kernels (no CUDA build of torch here), so a change that
breaks them would otherwise surface only when a GPU session builds them. nvcc compiles the file
against this torch's headers (bench.sass_count.compile_cubin, which supplies the one generated
header a CPU build of torch lacks); the test skips where nvcc is absent.
"""
import shutil

import pytest

from bench.sass_count import compile_cubin


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_codec_cuda_compiles_for_sm90(tmp_path):
    cubin = tmp_path / "codec.cubin"
    compile_cubin("sm_90", cubin)
    data = cubin.read_bytes()
    # Both compress paths and the decompress kernels are in it (their mangled names).
    for kernel in (b"compress_kernelINS0_4BF16ELi4ELb0ELb1E", b"compress_kernelINS0_4BF16ELi4ELb0ELb0E",
                   b"compress_kernelINS0_4BF16ELi2ELb1ELb1E", b"decompress_kernelINS0_4BF16ELi8E"):
        assert kernel in data, kernel
