"""Loads the compiled extension ``splitlora._C`` (C++ CPU kernels, CUDA kernels when built).

Loading the shared library is what registers its kernels with torch's dispatcher. When it is
missing, the plain-torch kernels of ``splitlora.codec_reference`` serve every call; that is
slower but produces the same packets, so it is a warning (once per process), never an error.
"""
from __future__ import annotations

import warnings

from .codec_reference import FORMAT_VERSION, HEADER_BYTES

BUILD_HINT = (
    "build it with `make build`, or `MAX_JOBS=2 python -m pip install --no-deps "
    "--no-build-isolation -e .` in the repository root (add SPLITLORA_BUILD_CUDA=1 for the CUDA kernels)"
)


class ExtensionNotBuiltWarning(UserWarning):
    """splitlora._C could not be imported; the plain-torch codec is used instead."""


_state = {"loaded": False, "module": None, "error": None}


def load():
    """Returns the module splitlora._C, or None (after warning once) when it cannot be imported."""
    if _state["loaded"]:
        return _state["module"]
    _state["loaded"] = True
    try:
        from . import _C  # noqa: PLC0415 - importing it registers the kernels
    except ImportError as exc:
        _state["error"] = exc
        warnings.warn(
            f"splitlora._C is not built or failed to load ({exc}); the codec falls back to its "
            f"plain-torch implementation, which gives the same packets but is several times slower. "
            f"To use the C++/CUDA kernels, {BUILD_HINT}.",
            ExtensionNotBuiltWarning,
            stacklevel=3,
        )
        return None
    if _C.format_version() != FORMAT_VERSION or _C.header_bytes() != HEADER_BYTES:
        # Its kernels are already registered and would write another format: refuse to go on.
        raise ImportError(
            f"splitlora._C was built for codec format version {_C.format_version()} but this "
            f"splitlora writes version {FORMAT_VERSION}: the build is stale; {BUILD_HINT}."
        )
    _state["module"] = _C
    return _C


def extension():
    """The loaded splitlora._C module or None; never warns twice."""
    return load()


def load_error():
    """The ImportError that kept splitlora._C from loading, or None."""
    load()
    return _state["error"]


def built_with_cuda() -> bool:
    module = load()
    return bool(module is not None and module.built_with_cuda())
