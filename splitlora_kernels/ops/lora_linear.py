"""Fused LoRA linear: Triton kernels, their launch functions and the autograd.Function.

    y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T

Shapes: x [..., in], weight [out, in] (any strides: GPT-2's Conv1D passes weight.T), lora_a [r, in],
lora_b [out, r], bias [out]. Rank r is padded to R_PAD = max(16, next power of two) inside the
kernels because tl.dot needs every dimension >= 16; padded lanes are masked to zero.

Kernels (all accumulate in fp32; none uses atomics, so results are deterministic):

* ``_lora_rowpass_kernel``: one sweep over the rows of a [M, D] input producing the thin product
  ``dropout(input) @ proj.T`` ([M, r]): xa = dropout(x) @ A.T in the forward (saved for the
  backward), and dY @ B in the backward where the dX GEMM does not produce it.
* ``_lora_matmul_kernel``: the base GEMM with the low-rank term added into the same accumulator
  before the store: forward acc = x @ W.T, then acc += (s * xa) @ B.T and + bias in the epilogue
  (xa is computed once per row block by the row pass and reused by every output tile of that
  row block). Backward dX: the K loop over dY tiles feeds both acc += dY @ W and
  dyb += dY @ B (one pass over dY for both terms); the epilogue adds s * (dyb @ A), masked by
  the regenerated dropout mask, and the first column of tiles stores dyb for dA.
* ``_lora_colpass_kernel``: reductions over tokens at rank r: dA = s * dyb.T @ dropout(x),
  dB = s * dY.T @ xa, and the bias gradient from the same dY tiles; split over tokens into fp32
  partials that are summed afterwards.
* ``_dropout_mask_kernel``: regenerates a dropout mask from its seed, for tests and debugging.

Dropout is never materialised: the keep decision for element (row, col) of x is
``tl.rand(seed, row * in + col) >= p`` and is recomputed wherever x's dropout matters (row pass
in the forward; dX epilogue and dA column pass in the backward). ``dropout_mask`` rebuilds the
same mask so tests can replay it through the reference.

Three CUDA paths exist, all fusing the low-rank branch, scaling, dropout and bias; they differ in
who computes the base product and where dY @ B comes from:
``"triton"``: base GEMMs in Triton; dY @ B accumulated inside the dX GEMM's K loop.
``"triton-pre"``: base GEMMs in Triton; dY @ B from a row pass over dY, loaded by the dX
epilogue (no extra MMA in the K loop, one more read of dY).
``"cublas"``: base products by cuBLAS with beta=1, accumulating onto a buffer that one Triton
kernel filled with the low-rank term (+ bias): the low-rank path stays fused in Triton, the base
GEMM is cuBLAS's. Low-rank gradients as in "triton-pre".
``DEFAULT_CUDA_PATH`` is "cublas": lowest GPU time on an H100 at 8192 tokens, d 4096, r 16
(bench/RESULTS.md: 889 us per forward+backward against 925 for "triton-pre" and 1030 for
"triton"; the Triton GEMMs run about 17% behind cuBLAS there). The environment variable
SPLITLORA_LORA_PATH overrides it.
"""
import logging
import math
import os
from typing import Optional, Tuple

import torch

from .reference import check_lora_linear_args, lora_linear_reference

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[ImportError] = None
except ImportError as exc:  # the CPU path must keep working on installs without triton
    _TRITON_IMPORT_ERROR = exc

    class _NoTriton:
        """Lets the kernel definitions below be parsed (never run) when triton is missing."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CUDA_PATHS = ("triton", "triton-pre", "cublas")
DEFAULT_CUDA_PATH = "cublas"
MAX_TRITON_RANK = 256


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Triton 3.6's interpreter returns garbage for bf16 tl.dot; UPCAST is only set when
    # interpreting bf16, so compiled kernels keep tensor-core bf16 operands.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _keep_mask(rows64, cols, n_cols, seed, p_drop):
    # The offset is the element's flat index in the logical [tokens, in] x, so every kernel that
    # reads the same element of x (whatever its tiling) draws the same number.
    offsets = rows64[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop


@triton.jit
def _apply_dropout(tile, rows64, cols, n_cols, seed, p_drop, drop_scale):
    keep = _keep_mask(rows64, cols, n_cols, seed, p_drop)
    return tl.where(keep, tile.to(tl.float32) * drop_scale, 0.0).to(tile.dtype)


@triton.jit
def _lora_rowpass_kernel(
    in_ptr, proj_ptr, out_ptr,
    M, D, R, seed, p_drop, drop_scale,
    stride_im, stride_id, stride_pr, stride_pd, stride_om, stride_or,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[M, R] = dropout(in)[M, D] @ proj[R, D].T, one program per block of rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        tile = tl.load(in_ptr + rows64[:, None] * stride_im + cols[None, :] * stride_id,
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            tile = _apply_dropout(tile, rows64, cols, D, seed, p_drop, drop_scale)
        proj = tl.load(proj_ptr + cols[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                       mask=col_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _mma(tile, proj, acc, UPCAST, PRECISION)
    tl.store(out_ptr + rows64[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_colpass_kernel(
    in_ptr, other_ptr, grad_ptr, colsum_ptr,
    M, D, R, rows_per_split, seed, p_drop, drop_scale, scaling,
    stride_im, stride_id, stride_xm, stride_xr, stride_gs, stride_gr, stride_cs,
    DROPOUT: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_COLSUM: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial reductions over one split of the rows: grad[s, R, D] = s * other.T @ dropout(in),
    colsum[s, D] = sum of in over the rows. Each program owns its output slice: no atomics, and
    the caller's sum over splits is deterministic."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    # [R_PAD, BLOCK_D] keeps the wide input tile as the dot's B operand (no transpose of it).
    acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    csum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        tile = tl.load(in_ptr + rows64[:, None] * stride_im + cols[None, :] * stride_id,
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            tile = _apply_dropout(tile, rows64, cols, D, seed, p_drop, drop_scale)
        if HAS_GRAD:
            other_t = tl.load(other_ptr + offs_r[:, None] * stride_xr + rows64[None, :] * stride_xm,
                              mask=r_mask[:, None] & row_mask[None, :], other=0.0)
            acc = _mma(other_t, tile, acc, UPCAST, PRECISION)
        if HAS_COLSUM:
            csum += tl.sum(tile.to(tl.float32), axis=0)
    if HAS_GRAD:
        tl.store(grad_ptr + pid_s * stride_gs + offs_r[:, None] * stride_gr + cols[None, :],
                 acc * scaling, mask=r_mask[:, None] & col_mask[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_s * stride_cs + cols, csum, mask=col_mask)


@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, lb_ptr, lr_ptr,
    M, N, K, R, seed, p_drop, drop_scale, scaling,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_lbk, stride_lbr, stride_lrr, stride_lrn,
    HAS_BIAS: tl.constexpr, LORA_MODE: tl.constexpr, STORE_L: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = a[M, K] @ b[K, N] + s * L[M, R] @ lr[R, N] + bias[N].

    LORA_MODE 0: no low-rank term. 1: L is loaded (precomputed). 2: L = a @ lb[K, R] is
    accumulated in the same K loop from the a tiles already on chip; with STORE_L the programs
    of the first column of tiles also write it to l (dA needs it).
    DROPOUT (backward dX only): the low-rank term is multiplied by the dropout mask of x at
    this tile's indices, x being [M, N] like the output (forward dropout lives in the row pass).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks sweep the columns together so b tiles stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Wrapped indices let the K loop load without row/column masks (faster loads); the rows and
    # columns they duplicate are dropped by the masked store.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R

    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA_MODE == 2:
        lb_ptrs = lb_ptr + offs_k[:, None] * stride_lbk + offs_r[None, :] * stride_lbr
        acc_l = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PRECISION)
        if LORA_MODE == 2:
            lb = tl.load(lb_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc_l = _mma(a, lb, acc_l, UPCAST, PRECISION)
            lb_ptrs += BLOCK_K * stride_lbk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    if LORA_MODE != 0:
        lr = tl.load(lr_ptr + offs_r[:, None] * stride_lrr + offs_n64[None, :] * stride_lrn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if LORA_MODE == 1:
            l = tl.load(l_ptr + offs_m64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        else:
            # Round like the unfused computation does (dY @ B materialised in the input dtype)
            # and so that the dot below runs on tensor cores.
            l = acc_l.to(lr.dtype)
            if STORE_L:
                if pid_n == 0:
                    tl.store(l_ptr + offs_m64[:, None] * stride_lm + offs_r[None, :] * stride_lr, l,
                             mask=m_mask[:, None] & r_mask[None, :])
        if DROPOUT:
            # dX of the low-rank branch passes back through the dropout that fed it: the mask
            # of x at this tile's indices, regenerated from the seed.
            low_rank = _mm(l, lr, UPCAST, PRECISION) * scaling
            keep = _keep_mask(offs_m64, offs_n, N, seed, p_drop)
            acc += tl.where(keep, low_rank * drop_scale, 0.0)
        else:
            # Accumulate straight into acc: a second [BLOCK_M, BLOCK_N] fp32 result would double
            # the accumulator registers and push the autotuner to smaller, slower tiles.
            l_scaled = (l.to(tl.float32) * scaling).to(lr.dtype)
            acc = _mma(l_scaled, lr, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, D, seed, p_drop, drop_scale,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    keep = _keep_mask(rows64, cols, D, seed, p_drop)
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], tl.where(keep, drop_scale, 0.0),
             mask=(rows < M)[:, None] & (cols < D)[None, :])


# ----------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------


def _mm_config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _pass_config(bm, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


def _prune_matmul_configs(configs, named_args, **kwargs):
    # With a large rank the fp32 low-rank accumulator and the [R_PAD, BLOCK_N] epilogue tile
    # compete with the main accumulator for registers; big tiles would spill.
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    # Exact fp32 ("ieee") runs on FMA units, where big tiles only cost compile time (tens of
    # seconds each) and registers.
    ieee = kwargs.get("PRECISION", named_args.get("PRECISION")) == "ieee"
    limit = 64 * 128 if ieee else (128 * 128 if r_pad >= 128 else None)
    if limit is None:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit]
    return small or configs


if _TRITON_IMPORT_ERROR is None:
    # Hopper (sm_90): 64-wide K steps feed wgmma; few configs, because each one is compiled and
    # timed on first use of a shape.
    _HOPPER_MATMUL_CONFIGS = [
        _mm_config(128, 256, 64, 8, 3),
        _mm_config(256, 128, 64, 8, 3),
        _mm_config(128, 128, 64, 8, 4),
        _mm_config(128, 128, 64, 4, 4),
        _mm_config(64, 128, 64, 4, 4),
        _mm_config(64, 64, 64, 4, 3),
    ]
    # Elsewhere (Ampere, Ada, ...): the tutorial's sane defaults.
    _DEFAULT_MATMUL_CONFIGS = [
        _mm_config(128, 128, 32, 4, 4),
        _mm_config(128, 64, 32, 4, 4),
        _mm_config(64, 128, 32, 4, 4),
        _mm_config(64, 64, 32, 4, 3),
    ]
    # The row and column passes stream one [tokens, features] tensor: wide tiles, deep pipelines.
    _ROWPASS_CONFIGS = [
        _pass_config(64, 128, 4, 3),
        _pass_config(128, 128, 8, 3),
        _pass_config(64, 256, 8, 3),
        _pass_config(32, 128, 4, 4),
    ]
    _COLPASS_CONFIGS = [
        _pass_config(64, 128, 4, 4),
        _pass_config(128, 128, 8, 3),
        _pass_config(64, 256, 8, 3),
        _pass_config(128, 64, 4, 4),
    ]
    _MATMUL_KEY = ["M", "N", "K", "R_PAD", "LORA_MODE", "STORE_L", "HAS_BIAS", "DROPOUT", "PRECISION"]
    _PASS_KEY = ["M", "D", "R_PAD", "DROPOUT", "PRECISION"]

    def _autotuned_matmul(configs):
        return triton.autotune(configs=configs, key=_MATMUL_KEY,
                               prune_configs_by={"early_config_prune": _prune_matmul_configs})(
            _lora_matmul_kernel)

    _matmul_hopper = _autotuned_matmul(_HOPPER_MATMUL_CONFIGS)
    _matmul_default = _autotuned_matmul(_DEFAULT_MATMUL_CONFIGS)
    _rowpass_tuned = triton.autotune(configs=_ROWPASS_CONFIGS, key=_PASS_KEY)(_lora_rowpass_kernel)
    _colpass_tuned = triton.autotune(configs=_COLPASS_CONFIGS, key=_PASS_KEY + ["HAS_GRAD", "HAS_COLSUM"])(
        _lora_colpass_kernel)

# Fixed small tiles for the interpreter (tests use shapes of a few dozen) and for runs with
# autotuning switched off (SPLITLORA_TRITON_AUTOTUNE=0, used by the GPU tests to avoid timing
# every config of every shape).
_INTERPRET_MATMUL_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
_INTERPRET_PASS_META = dict(BLOCK_M=32, BLOCK_D=32, num_warps=4, num_stages=1)
_FIXED_MATMUL_META = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
_FIXED_MATMUL_META_IEEE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
_FIXED_PASS_META = dict(BLOCK_M=64, BLOCK_D=64, num_warps=4, num_stages=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_INTERPRETER_PATCHED = False


def _patch_interpreter_scalar_index() -> None:
    """Make Triton 3.6's interpreter usable with numpy >= 2.3 (pinned here: 2.4).

    The interpreter holds scalars as 1-element arrays and converts them with int(array), which
    numpy now rejects for arrays of shape (1,), so any `range(0, K, BLOCK)` over a runtime bound
    fails. Re-register __index__ for the duration of each interpreted launch (the interpreter's
    own patch scope restores it afterwards). Compiled kernels are unaffected.
    """
    global _INTERPRETER_PATCHED
    if _INTERPRETER_PATCHED:
        return
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        _INTERPRETER_PATCHED = True  # this numpy still converts: nothing to patch
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _INTERPRETER_PATCHED = True


def _autotune_enabled() -> bool:
    return os.environ.get("SPLITLORA_TRITON_AUTOTUNE", "1") != "0"


_CAPABILITY: dict = {}


def _kernel_variant(kernel: str, device: torch.device, exact_fp32: bool = False):
    """(callable kernel, fixed meta or None) for the current mode and device."""
    if _interpreting():
        _patch_interpreter_scalar_index()
        raw = {"matmul": _lora_matmul_kernel, "rowpass": _lora_rowpass_kernel,
               "colpass": _lora_colpass_kernel}[kernel]
        return raw, (_INTERPRET_MATMUL_META if kernel == "matmul" else _INTERPRET_PASS_META)
    if not _autotune_enabled():
        raw = {"matmul": _lora_matmul_kernel, "rowpass": _lora_rowpass_kernel,
               "colpass": _lora_colpass_kernel}[kernel]
        if kernel != "matmul":
            return raw, _FIXED_PASS_META
        return raw, (_FIXED_MATMUL_META_IEEE if exact_fp32 else _FIXED_MATMUL_META)
    if kernel == "matmul":
        major = _CAPABILITY.get(device.index)
        if major is None:
            major = _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)[0]
        return (_matmul_hopper if major == 9 else _matmul_default), None
    return (_rowpass_tuned if kernel == "rowpass" else _colpass_tuned), None


_RAW_KERNELS = {"matmul": _lora_matmul_kernel, "rowpass": _lora_rowpass_kernel, "colpass": _lora_colpass_kernel}
# (kernel, device index, tuning key) -> launch meta of the config the autotuner picked.
_TUNED: dict = {}


def _launch(kernel: str, device: torch.device, grid_fn, tune_key: tuple, *args, **constexprs):
    """Launch `kernel`; `tune_key` must hold every argument the tile choice depends on (shape
    sizes, dtype, flags). After the autotuner has timed a key once, later calls launch the plain
    kernel with the remembered config: triton's Autotuner.run costs tens of microseconds of host
    time per call, which at a handful of launches per layer would exceed the GPU time."""
    fn, meta = _kernel_variant(kernel, device, constexprs.get("PRECISION") == "ieee")
    if meta is None:
        cache_key = (kernel, device.index) + tune_key
        meta = _TUNED.get(cache_key)
        if meta is None:
            fn[grid_fn](*args, **constexprs)
            best = fn.best_config
            _TUNED[cache_key] = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
            return
        fn = _RAW_KERNELS[kernel]
    fn[grid_fn(meta)](*args, **constexprs, **meta)


# ----------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: called from Python it goes through the JIT-function machinery and costs
    # microseconds per call, several times per launch.
    return -(-a // b)


def _rank_pad(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    upcast = _interpreting() and dtype == torch.bfloat16
    # fp32 follows torch's own matmul policy: TF32 only when the user allowed it.
    tf32 = dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
    return upcast, ("tf32" if tf32 else "ieee")


def _dropout_args(p: float, seed: int) -> Tuple[int, float, float]:
    return int(seed), float(p), (1.0 / (1.0 - p) if p > 0.0 else 1.0)


def _launch_rowpass(inp, proj, out, rank, *, p=0.0, seed=0):
    """out[M, r] = dropout(inp) @ proj.T with proj a [r, D] view."""
    M, D = inp.shape
    upcast, precision = _dot_flags(inp.dtype)
    seed, p, drop_scale = _dropout_args(p, seed)
    _launch(
        "rowpass", inp.device, lambda meta: (_cdiv(M, meta["BLOCK_M"]),), (inp.dtype, M, D, rank, p > 0.0),
        inp, proj, out, M, D, rank, seed, p, drop_scale,
        inp.stride(0), inp.stride(1), proj.stride(0), proj.stride(1), out.stride(0), out.stride(1),
        DROPOUT=p > 0.0, R_PAD=_rank_pad(rank), UPCAST=upcast, PRECISION=precision,
    )
    return out


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def _launch_colpass(inp, rank, *, other=None, want_colsum=False, scaling=1.0, p=0.0, seed=0):
    """Returns (scaling * other.T @ dropout(inp) as fp32 [r, D] or None, fp32 column sums of inp
    or None); inp is [M, D], other [M, r]."""
    M, D = inp.shape
    device = inp.device
    # Split the tokens so that about four programs per SM stream their share of the rows (with
    # 128-wide column tiles); the fp32 partials ([splits, r, D]) are small next to the input.
    d_tiles = _cdiv(D, 128)
    split = max(1, min(_cdiv(M, 128), _cdiv(4 * _num_sms(device), d_tiles)))
    rows_per_split = _cdiv(_cdiv(M, split), 128) * 128
    split = _cdiv(M, rows_per_split)
    grad = torch.empty((split, rank, D), device=device, dtype=torch.float32) if other is not None else None
    colsum = torch.empty((split, D), device=device, dtype=torch.float32) if want_colsum else None
    g_t = grad if grad is not None else inp
    c_t = colsum if colsum is not None else inp
    o_t = other if other is not None else inp
    upcast, precision = _dot_flags(inp.dtype)
    seed, p, drop_scale = _dropout_args(p, seed)
    _launch(
        "colpass", device, lambda meta: (_cdiv(D, meta["BLOCK_D"]), split),
        (inp.dtype, M, D, rank, p > 0.0, other is not None, want_colsum),
        inp, o_t, g_t, c_t,
        M, D, rank, rows_per_split, seed, p, drop_scale, float(scaling),
        inp.stride(0), inp.stride(1), o_t.stride(0), o_t.stride(1),
        g_t.stride(0) if grad is not None else 0, g_t.stride(1) if grad is not None else 0,
        c_t.stride(0) if colsum is not None else 0,
        DROPOUT=p > 0.0, HAS_GRAD=other is not None, HAS_COLSUM=want_colsum,
        R_PAD=_rank_pad(rank), UPCAST=upcast, PRECISION=precision,
    )
    return (grad.sum(0) if grad is not None else None, colsum.sum(0) if colsum is not None else None)


def _launch_matmul(a, b, c, *, rank=0, bias=None, lora_mode=0, l=None, lb=None, lr=None,
                   store_l=False, scaling=1.0, p=0.0, seed=0):
    """c[M, N] = a[M, K] @ b[K, N] (+ scaling * L @ lr) (+ bias); all arguments are 2-D views
    with arbitrary strides. lora_mode 1 takes L from `l` [M, r]; 2 computes L = a @ lb [K, r]
    in the K loop (and writes it to `l` with store_l). p > 0 masks the low-rank term with the
    dropout mask of an [M, N] x (dX of the backward)."""
    M, K = a.shape
    N = b.shape[1]
    device = a.device
    upcast, precision = _dot_flags(a.dtype)
    dummy = c
    l_t = l if l is not None else dummy
    lb_t = lb if lb is not None else dummy
    lr_t = lr if lr is not None else dummy
    bias_t = bias if bias is not None else dummy

    def s(t, given, dim):
        return t.stride(dim) if given is not None else 0

    seed, p, drop_scale = _dropout_args(p, seed)
    _launch(
        "matmul", device,
        lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),),
        (a.dtype, M, N, K, rank, lora_mode, store_l, bias is not None, p > 0.0, precision),
        a, b, c, bias_t, l_t, lb_t, lr_t,
        M, N, K, max(rank, 1), seed, p, drop_scale, float(scaling),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        s(l_t, l, 0), s(l_t, l, 1), s(lb_t, lb, 0), s(lb_t, lb, 1), s(lr_t, lr, 0), s(lr_t, lr, 1),
        HAS_BIAS=bias is not None, LORA_MODE=lora_mode, STORE_L=store_l, DROPOUT=p > 0.0,
        R_PAD=_rank_pad(max(rank, 1)), UPCAST=upcast, PRECISION=precision,
    )
    return c


def dropout_mask(x_shape, dropout_p: float, seed: int, device=None) -> torch.Tensor:
    """The scaled keep mask (0 or 1/(1-p), float32, shape `x_shape`) that the fused kernels use
    for `seed`: pass it as `dropout_mask` to `lora_linear_reference` to replay a fused call."""
    _require_triton()
    shape = tuple(x_shape)
    if not shape:
        raise ValueError("dropout_mask: x_shape must have at least one dimension (..., in_features)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_mask: dropout_p must be in [0, 1), got {dropout_p}")
    device = torch.device(device) if device is not None else torch.device("cuda")
    D = shape[-1]
    M = math.prod(shape[:-1])
    out = torch.empty((M, D), device=device, dtype=torch.float32)
    if out.numel():
        seed, p, drop_scale = _dropout_args(dropout_p, seed)
        if dropout_p == 0.0:
            out.fill_(1.0)
        else:
            if _interpreting():
                _patch_interpreter_scalar_index()
            _dropout_mask_kernel[(_cdiv(M, 32), _cdiv(D, 32))](
                out, M, D, seed, p, drop_scale, BLOCK_M=32, BLOCK_D=32)
    return out.reshape(shape)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator, so torch.manual_seed makes fused
    dropout reproducible (and no GPU synchronisation is needed to draw it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """Triton forward and backward of the LoRA linear. Arguments are validated by the callers
    (`lora_linear`, `lora_linear_triton`)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, path):
        out_features, in_features = weight.shape
        rank = lora_a.shape[0]
        lead = x.shape[:-1]
        x2d = x.reshape(-1, in_features)
        M = x2d.shape[0]
        xa = torch.empty((M, rank), device=x.device, dtype=x.dtype)
        _launch_rowpass(x2d, lora_a, xa, rank, p=dropout_p, seed=seed)
        y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
        if path != "cublas":
            _launch_matmul(x2d, weight.t(), y, rank=rank, bias=bias, lora_mode=1, l=xa, lr=lora_b.t(),
                           scaling=scaling)
        else:
            # cuBLAS with beta=1 reads the low-rank term and bias in its epilogue, where a
            # compute-bound GEMM has memory bandwidth to spare.
            _launch_matmul(x2d[:, :0], weight.t()[:0], y, rank=rank, bias=bias, lora_mode=1, l=xa,
                           lr=lora_b.t(), scaling=scaling)
            y.addmm_(x2d, weight.t())
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.path = scaling, dropout_p, seed, path
        ctx.x_shape = x.shape
        return y.reshape(*lead, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        need_bias = need_bias and ctx.has_bias
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        rank = lora_a.shape[0]
        out_features, in_features = weight.shape
        dy = grad_out.reshape(-1, out_features)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = dw = da = db = dbias = None
        path = ctx.path

        # dY @ B ([tokens, r]) feeds both dX and dA. The "triton" path accumulates it inside
        # the dX GEMM's K loop, on the dY tiles that GEMM loads anyway, and stores it for dA;
        # the other paths take it from one row pass over dY.
        dyb = None
        if need_x or need_a:
            dyb = torch.empty((dy.shape[0], rank), device=dy.device, dtype=dy.dtype)
            if not (need_x and path == "triton"):
                _launch_rowpass(dy, lora_b.t(), dyb, rank)
        if need_x:
            dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
            if path == "triton":
                _launch_matmul(dy, weight, dx, rank=rank, lora_mode=2, lb=lora_b, lr=lora_a, l=dyb,
                               store_l=need_a, scaling=s, p=p, seed=seed)
            elif path == "triton-pre":
                _launch_matmul(dy, weight, dx, rank=rank, lora_mode=1, l=dyb, lr=lora_a, scaling=s, p=p, seed=seed)
            else:
                # The low-rank term (masked by dropout) first, then cuBLAS adds dY @ W onto it.
                _launch_matmul(dy[:, :0], weight[:0], dx, rank=rank, lora_mode=1, l=dyb, lr=lora_a, scaling=s,
                               p=p, seed=seed)
                dx.addmm_(dy, weight)
        # dA = s * (dY @ B).T @ dropout(x) and dB = s * dY.T @ xa: reductions over tokens, one
        # column pass each (the bias gradient rides along with dB on the same dY tiles).
        if need_a:
            da = _launch_colpass(x2d, rank, other=dyb, scaling=s, p=p, seed=seed)[0].to(lora_a.dtype)
        if need_b or need_bias:
            db32, dbias32 = _launch_colpass(dy, rank, other=xa if need_b else None, want_colsum=need_bias,
                                            scaling=s)
            if need_b:
                db = db32.t().contiguous().to(lora_b.dtype)
            if need_bias:
                dbias = dbias32.to(ctx.bias_dtype)

        if need_w:
            # Full fine-tuning of this layer: dW = dY.T @ x (the base path has no dropout).
            if path != "cublas":
                dw = torch.empty((out_features, in_features), device=dy.device, dtype=weight.dtype)
                _launch_matmul(dy.t(), x2d, dw)
            else:
                dw = (dy.t() @ x2d).to(weight.dtype)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, da, db, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _require_triton():
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            "the fused LoRA kernels need triton (pip install triton); CPU tensors work without it "
            f"through the reference path ({_TRITON_IMPORT_ERROR})")


def _resolve_path(path: Optional[str]) -> str:
    path = path or os.environ.get("SPLITLORA_LORA_PATH") or DEFAULT_CUDA_PATH
    if path not in CUDA_PATHS:
        raise ValueError(f"path must be one of {CUDA_PATHS} (or set SPLITLORA_LORA_PATH to one), got {path!r}")
    return path


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    seed: Optional[int] = None,
    path: Optional[str] = None,
) -> torch.Tensor:
    """The Triton path of `lora_linear`, whatever the device: CUDA tensors, or CPU tensors when
    TRITON_INTERPRET=1 (how CI tests the kernels). `seed` fixes the dropout mask (see
    `dropout_mask`); `path` picks one of CUDA_PATHS (see the module docstring)."""
    _require_triton()
    check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"lora_linear_triton: x is on {x.device}, the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them in the interpreter); use lora_linear for CPU tensors")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lora_linear_triton: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    rank = lora_a.shape[0]
    if rank > MAX_TRITON_RANK:
        raise ValueError(f"lora_linear_triton: rank (lora_a.shape[0]) must be at most {MAX_TRITON_RANK}, "
                         f"got {rank}; use lora_linear, which falls back to the reference for larger ranks")
    return _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, seed, _resolve_path(path))


def _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, seed, path):
    p = float(dropout_p) if training else 0.0
    if seed is None:
        seed = draw_seed() if p > 0.0 else 0
    if x.shape[:-1].numel() == 0:
        return lora_linear_reference(x, weight, lora_a, lora_b, float(scaling), bias)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, float(scaling), p, int(seed), path)


def lora_linear_backend(x: torch.Tensor, lora_a: torch.Tensor) -> str:
    """Which implementation `lora_linear` uses for these inputs: one of CUDA_PATHS, or
    "reference" (plain torch)."""
    if x.device.type != "cuda" or _TRITON_IMPORT_ERROR is not None or lora_a.shape[0] > MAX_TRITON_RANK \
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "reference"
    return _resolve_path(None)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T.

    CUDA tensors run the fused Triton kernels; CPU tensors (and CUDA ones the kernels do not
    cover: rank > 256, float64, no triton) run the plain-torch reference, with dropout drawn by
    torch.bernoulli. `lora_linear_backend` tells which one serves a call.
    """
    check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    backend = lora_linear_backend(x, lora_a)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("lora_linear: %s backend for x %s %s on %s, rank %d", backend, tuple(x.shape),
                     x.dtype, x.device, lora_a.shape[0])
    if backend != "reference":
        return _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, None, backend)
    mask = None
    if dropout_p > 0.0 and training:
        mask = torch.empty_like(x).bernoulli_(1.0 - dropout_p) / (1.0 - dropout_p)
    return lora_linear_reference(x, weight, lora_a, lora_b, float(scaling), bias, mask)
