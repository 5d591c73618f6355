"""Builds the extension splitlora._C: C++ CPU kernels always, CUDA kernels when possible.

SPLITLORA_BUILD_CUDA=1 forces the CUDA kernels (fails if nvcc or a CUDA torch is missing),
SPLITLORA_BUILD_CUDA=0 skips them; unset, they are built when nvcc and a CUDA build of torch
are both present.
"""
import glob
import os

from setuptools import setup


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    import torch

    flag = os.environ.get("SPLITLORA_BUILD_CUDA", "").strip()
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            raise RuntimeError(
                "SPLITLORA_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}. "
                "Install a CUDA build of torch and nvcc, or set SPLITLORA_BUILD_CUDA=0."
            )
        return True
    if flag not in ("",):
        raise RuntimeError(f"SPLITLORA_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    return have


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    if _want_cuda():
        cuda_sources = sorted(glob.glob("csrc/*.cu"))
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch_list:
            # Default to the GPU generations people fine-tune on; override with TORCH_CUDA_ARCH_LIST.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0"
        return [
            CUDAExtension(
                "splitlora._C",
                cpp_sources + cuda_sources,
                define_macros=[("SPLITLORA_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        ]
    return [CppExtension("splitlora._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


def _install_requires():
    import torch

    # The extension links against this torch's C++ ABI: require the same release at run time.
    built_against = torch.__version__.split("+")[0]
    return [
        f"torch=={built_against}",
        "numpy",
        "transformers>=4.45",
        "safetensors",
        "pyyaml",
        "tqdm",
    ]


setup(
    install_requires=_install_requires(),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
