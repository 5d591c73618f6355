"""Fused LoRA linear: Triton kernels, their launch functions and the autograd.Functions.

    y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T

Shapes: x [..., in], weight [out, in] (any strides: GPT-2's Conv1D passes weight.T), lora_a [r, in],
lora_b [out, r], bias [out]. Rank r is padded to R_PAD = max(16, next power of two) inside the
kernels because tl.dot needs every dimension >= 16; padded lanes are masked to zero.

Kernels (all accumulate in fp32; none uses atomics, so results are deterministic):

* ``_lora_rowpass_kernel``: one program per block of rows sweeps a [M, K] input for the thin
  product L = dropout(input) @ proj.T ([M, r]) and, with EPILOGUE, then sweeps the output
  columns writing s * L @ up (+ bias) ([M, N], masked by the dropout mask with OUT_DROPOUT) while
  L is still in registers. Forward: L = xa = dropout(x) @ A.T (stored for the backward) and the
  epilogue writes the low-rank term of y. Backward: L = dY @ B (stored for dA) and the epilogue
  writes the low-rank term of dX. One launch per direction for the whole low-rank branch; on
  mid-sized problems (too few rows to fill the GPU, see ``_launch_rowpass``) two: L, then the
  epilogue alone (LOAD_L) over a 2-D grid of output tiles.
* ``_lora_matmul_kernel``: a Triton GEMM with the low-rank term added into its accumulator
  (paths "triton" and "triton-pre"; see below).
* ``_lora_colpass_kernel``: reductions over tokens at rank r, both in one launch (a third grid
  axis picks the task): dA = s * dyb.T @ dropout(x) and dB = s * dY.T @ xa with the bias
  gradient from the same dY tiles. Large problems split the tokens into fp32 partials that
  ``_lora_finish_kernel`` sums in a fixed order (and casts, and transposes dB) in one more
  launch; small ones use one split and store the final gradients directly.
* ``_dropout_mask_kernel``: regenerates a dropout mask from its seed, for tests and debugging.

Dropout is never materialised: the keep decision for element (row, col) of x is
``tl.rand(seed, row * in + col) >= p`` and is recomputed wherever x's dropout matters (row pass
in the forward; dX epilogue and dA column pass in the backward). ``dropout_mask`` rebuilds the
same mask so tests can replay it through the reference.

CUDA paths (``CUDA_PATHS``); all but "torch" fuse the low-rank branch, scaling, dropout and bias:
``"cublas"`` (``DEFAULT_CUDA_PATH``): the base products are cuBLAS GEMMs with beta=1 that
accumulate onto the low-rank term (+ bias) written by the row-pass epilogue, so each direction
costs one Triton launch plus one cuBLAS call; then one column pass (+ one finishing launch).
``"triton"`` / ``"triton-pre"``: base GEMMs in Triton (``_lora_matmul_kernel``), dY @ B either
accumulated in the dX GEMM's K loop ("triton") or taken from a row pass ("triton-pre"). On an
H100 the Triton GEMMs run about 17% behind cuBLAS at 8192 tokens, d 4096 (bench/RESULTS.md).
``"torch"``: no Triton at all, cuBLAS GEMMs in one autograd.Function (three ops forward, up to
eight backward), the cheapest unfused way, kept for comparison; dropout > 0 runs the "cublas"
path instead (the mask must come from the seed). It is not picked by size: measured on an H100
from 2048 tokens x 768 up, it was not consistently cheaper on the host than the fused path
(two launches forward, three or four backward, each no costlier on the host than one cuBLAS
call; the two paths' host times differ by less than their run-to-run noise) and it takes more
GPU time (bench/RESULTS.md). ``lora_linear`` runs ``DEFAULT_CUDA_PATH``;
SPLITLORA_LORA_PATH forces another. Within the fused paths the sizes do pick kernel variants:
one merged row-pass launch or two (_MERGED_ROWPASS_MAX), one column-pass split or fp32
partials plus a finishing launch (_COLPASS_ONE_SPLIT_MAX).

Host cost. A layer with GPU times in the tens of microseconds is limited by how fast the host
enqueues its work, so launches bypass triton's generic ``JITFunction.run`` (argument binding,
specialization, cache-key strings, one cuPointerGetAttribute per tensor) once a kernel variant
has been compiled: ``_launch`` keys its own cache on exactly what triton specializes on (dtypes,
16-byte alignment of the pointers, the integer arguments, the constexprs) and calls the compiled
kernel's launcher with raw pointers. The first call of a variant (and every call while a triton
launch hook such as proton's is installed) takes triton's ordinary path.

torch.compile. Under compile, `lora_linear` / `lora_linear_triton` call the torch.library custom
ops ``splitlora::lora_linear_fwd`` and ``splitlora::lora_linear_bwd`` (fake kernels for tracing,
autograd through register_autograd), so dynamo never traces into the launch code (data_ptr(), the
seed's .item()): ``torch.compile(model, fullgraph=True)`` of FusedLoRALinear layers or a patched
PEFT model has no graph break. There the dropout seed is an int64 CPU tensor drawn by
torch.randint from the default CPU generator inside the graph, read on the host only inside the op.
"""
import logging
import math
import os
from typing import List, Optional, Tuple

import torch

from .reference import check_lora_linear_args, lora_linear_reference

try:
    import triton
    import triton.language as tl
    from triton import knobs as _triton_knobs

    _TRITON_IMPORT_ERROR: Optional[ImportError] = None
except ImportError as exc:  # the CPU path must keep working on installs without triton
    _TRITON_IMPORT_ERROR = exc
    _triton_knobs = None

    class _NoTriton:
        """Lets the kernel definitions below be parsed (never run) when triton is missing."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CUDA_PATHS = ("triton", "triton-pre", "cublas", "torch")
DEFAULT_CUDA_PATH = "cublas"
MAX_TRITON_RANK = 256


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Argument order, for every kernel: pointers, then the scalars that never change the compiled
# code (seed, dropout probability and scale, scaling), then the integers (sizes and strides),
# then the constexpr flags, then the tile sizes. `_launch` relies on it.


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
def _thin_product(
    in_ptr, proj_ptr, rows64, row_mask, offs_r, r_mask, K,
    stride_im, stride_ik, stride_pk, stride_pr, seed, p_drop, drop_scale,
    IN_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """L [BLOCK_M, R_PAD] = dropout(in[rows, :K]) @ proj[:R, :K].T for the row passes of
    lora_linear and multi_lora (padded rank lanes masked by r_mask are zero)."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        tile = tl.load(in_ptr + rows64[:, None] * stride_im + cols[None, :] * stride_ik,
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if IN_DROPOUT:
            tile = _apply_dropout(tile, rows64, cols, K, seed, p_drop, drop_scale)
        proj = tl.load(proj_ptr + cols[:, None] * stride_pk + offs_r[None, :] * stride_pr,
                       mask=col_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _mma(tile, proj, acc, UPCAST, PRECISION)
    # Rounded to the input dtype like the unfused computation rounds x @ A.T (or dY @ B), and so
    # that the epilogue's dot runs on tensor cores.
    return acc.to(in_ptr.dtype.element_ty)


@triton.jit
def _lowrank_epilogue(
    l, up_ptr, out_ptr, bias_ptr, rows64, row_mask, offs_r, r_mask, n_lo, n_hi, N,
    stride_ur, stride_un, stride_om, stride_on, stride_bias,
    seed, p_drop, drop_scale, scaling,
    OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[rows, n_lo:n_hi] = s * l @ up[:R, n_lo:n_hi] (+ bias), through the dropout mask of an
    [M, N] x with OUT_DROPOUT: the row passes' low-rank term of y (forward) or dX (backward)."""
    if not OUT_DROPOUT:
        l = (l.to(tl.float32) * scaling).to(l.dtype)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = cols_n < N
        up = tl.load(up_ptr + offs_r[:, None] * stride_ur + cols_n[None, :] * stride_un,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        term = _mm(l, up, UPCAST, PRECISION)
        if OUT_DROPOUT:
            # dX of the low-rank branch passes back through the dropout that fed it: the mask of
            # x at these indices, regenerated from the seed.
            keep = _keep_mask(rows64, cols_n, N, seed, p_drop)
            term = tl.where(keep, term * scaling * drop_scale, 0.0)
        if HAS_BIAS:
            term += tl.load(bias_ptr + cols_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * stride_om + cols_n[None, :] * stride_on,
                 term.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_rowpass_kernel(
    in_ptr, proj_ptr, l_ptr, out_ptr, up_ptr, bias_ptr,
    seed, p_drop, drop_scale, scaling,
    M, K, N, R,
    stride_im, stride_ik, stride_pr, stride_pk, stride_lm, stride_lr,
    stride_om, stride_on, stride_ur, stride_un, stride_bias,
    IN_DROPOUT: tl.constexpr, LOAD_L: tl.constexpr, STORE_L: tl.constexpr, EPILOGUE: tl.constexpr,
    OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """L[M, R] = dropout(in)[M, K] @ proj[R, K].T, stored to l with STORE_L; with EPILOGUE also
    out[M, N] = s * L @ up[R, N] (+ bias), masked by the dropout mask of an [M, N] x with
    OUT_DROPOUT. Without LOAD_L one program per block of rows computes L and sweeps all N
    columns (L never leaves registers); with LOAD_L, L is read from l and each program writes
    one [BLOCK_M, BLOCK_N] tile (grid: row blocks x column blocks)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    if LOAD_L:
        l = tl.load(l_ptr + rows64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        n_lo = tl.program_id(1) * BLOCK_N
        n_hi = n_lo + BLOCK_N
    else:
        l = _thin_product(in_ptr, proj_ptr, rows64, row_mask, offs_r, r_mask, K,
                          stride_im, stride_ik, stride_pk, stride_pr, seed, p_drop, drop_scale,
                          IN_DROPOUT, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_K)
        if STORE_L:
            tl.store(l_ptr + rows64[:, None] * stride_lm + offs_r[None, :] * stride_lr, l,
                     mask=row_mask[:, None] & r_mask[None, :])
        n_lo = 0
        n_hi = N
    if EPILOGUE:
        _lowrank_epilogue(l, up_ptr, out_ptr, bias_ptr, rows64, row_mask, offs_r, r_mask, n_lo, n_hi, N,
                          stride_ur, stride_un, stride_om, stride_on, stride_bias,
                          seed, p_drop, drop_scale, scaling,
                          OUT_DROPOUT, HAS_BIAS, UPCAST, PRECISION, BLOCK_N)


@triton.jit
def _colpass_body(
    in_ptr, other_ptr, grad_ptr, colsum_ptr, pid_d, pid_s,
    seed, p_drop, drop_scale, scaling,
    M, D, R, rows_per_split, row_base,
    stride_im, stride_id, stride_xm, stride_xr, stride_gs, stride_gr, stride_gd, stride_cs, stride_cd,
    DROPOUT: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_COLSUM: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # row_base: the index, in the tensor the dropout mask was drawn for, of in_ptr's row 0 (a
    # caller that passes a slice of the rows keeps the mask of the whole tensor).
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
            tile = _apply_dropout(tile, rows64 + row_base, cols, D, seed, p_drop, drop_scale)
        if HAS_GRAD:
            other_t = tl.load(other_ptr + offs_r[:, None] * stride_xr + rows64[None, :] * stride_xm,
                              mask=r_mask[:, None] & row_mask[None, :], other=0.0)
            acc = _mma(other_t, tile, acc, UPCAST, PRECISION)
        if HAS_COLSUM:
            csum += tl.sum(tile.to(tl.float32), axis=0)
    if HAS_GRAD:
        tl.store(grad_ptr + pid_s * stride_gs + offs_r[:, None] * stride_gr + cols[None, :] * stride_gd,
                 (acc * scaling).to(grad_ptr.dtype.element_ty), mask=r_mask[:, None] & col_mask[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_s * stride_cs + cols * stride_cd, csum.to(colsum_ptr.dtype.element_ty),
                 mask=col_mask)


@triton.jit(do_not_specialize=["seed"])
def _lora_colpass_kernel(
    x_ptr, dyb_ptr, ga_ptr, dy_ptr, xa_ptr, gb_ptr, cs_ptr,
    seed, p_drop, drop_scale, scaling,
    M, DA, DB, R, rows_per_split,
    stride_xm, stride_xd, stride_dybm, stride_dybr, stride_gas, stride_gar, stride_gad,
    stride_dym, stride_dyd, stride_xam, stride_xar, stride_gbs, stride_gbr, stride_gbd, stride_css, stride_csd,
    TASK_A: tl.constexpr, TASK_B_GRAD: tl.constexpr, TASK_B_COLSUM: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reductions over one split of the tokens. Task A: ga[s, R, DA] = s * dyb.T @ dropout(x).
    Task B: gb[s, R, DB] = s * dY.T @ xa and cs[s, DB] = column sums of dY. With both tasks the
    third grid axis picks one. Each program owns its output slice: no atomics."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    if TASK_A and (TASK_B_GRAD or TASK_B_COLSUM):
        run_a = pid_t == 0
    else:
        run_a = TASK_A
    if run_a:
        if pid_d * BLOCK_D < DA:
            _colpass_body(x_ptr, dyb_ptr, ga_ptr, cs_ptr, pid_d, pid_s, seed, p_drop, drop_scale, scaling,
                          M, DA, R, rows_per_split, 0,
                          stride_xm, stride_xd, stride_dybm, stride_dybr, stride_gas, stride_gar, stride_gad, 0, 0,
                          DROPOUT, True, False, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
    else:
        if pid_d * BLOCK_D < DB:
            _colpass_body(dy_ptr, xa_ptr, gb_ptr, cs_ptr, pid_d, pid_s, seed, p_drop, drop_scale, scaling,
                          M, DB, R, rows_per_split, 0,
                          stride_dym, stride_dyd, stride_xam, stride_xar, stride_gbs, stride_gbr, stride_gbd,
                          stride_css, stride_csd,
                          False, TASK_B_GRAD, TASK_B_COLSUM, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_D)


@triton.jit
def _sum_splits(src_ptr, j, n, S, stride_s, S_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # Sum over the S splits of a [S, n] fp32 array at columns j, S_BLOCK splits per load.
    j_mask = j < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    offs_s = tl.arange(0, S_BLOCK)
    for s0 in range(0, S, S_BLOCK):
        ss = s0 + offs_s
        part = tl.load(src_ptr + ss.to(tl.int64)[:, None] * stride_s + j[None, :],
                       mask=(ss < S)[:, None] & j_mask[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    return acc


@triton.jit
def _lora_finish_kernel(
    ga_ptr, gb_ptr, cs_ptr, da_ptr, db_ptr, dbias_ptr,
    S, NA, NB, NC, R, DB, tiles_a, tiles_b, stride_gas, stride_gbs, stride_css,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    S_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sums the column pass's fp32 partials over the splits (a fixed reduction order, so
    deterministic) and writes dA ([R, DA], NA = R * DA elements), dB ([DB, R], transposing the
    [R, DB] partials) and dbias ([DB]) in their own dtypes. Programs [0, tiles_a) take dA, the
    next tiles_b take dB, the rest dbias; each sums BLOCK output elements."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if HAS_A and pid < tiles_a:
        j = pid * BLOCK + offs
        acc = _sum_splits(ga_ptr, j, NA, S, stride_gas, S_BLOCK, BLOCK)
        tl.store(da_ptr + j, acc.to(da_ptr.dtype.element_ty), mask=j < NA)
    elif HAS_B and pid < tiles_a + tiles_b:
        j = (pid - tiles_a) * BLOCK + offs
        acc = _sum_splits(gb_ptr, j, NB, S, stride_gbs, S_BLOCK, BLOCK)
        r = j // DB
        d = j - r * DB
        tl.store(db_ptr + d.to(tl.int64) * R + r, acc.to(db_ptr.dtype.element_ty), mask=j < NB)
    elif HAS_BIAS:
        j = (pid - tiles_a - tiles_b) * BLOCK + offs
        acc = _sum_splits(cs_ptr, j, NC, S, stride_css, S_BLOCK, BLOCK)
        tl.store(dbias_ptr + j, acc.to(dbias_ptr.dtype.element_ty), mask=j < NC)


@triton.jit(do_not_specialize=["seed"])
def _lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, lb_ptr, lr_ptr,
    seed, p_drop, drop_scale, scaling,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_lbk, stride_lbr, stride_lrr, stride_lrn, stride_bias,
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
            low_rank = _mm(l, lr, UPCAST, PRECISION) * scaling
            keep = _keep_mask(offs_m64, offs_n, N, seed, p_drop)
            acc += tl.where(keep, low_rank * drop_scale, 0.0)
        else:
            # Accumulate straight into acc: a second [BLOCK_M, BLOCK_N] fp32 result would double
            # the accumulator registers and push the autotuner to smaller, slower tiles.
            l_scaled = (l.to(tl.float32) * scaling).to(lr.dtype)
            acc = _mma(l_scaled, lr, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
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


def _row_config(bm, bk, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _col_config(bm, bd, warps, stages):
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


def _prune_rowpass_configs(configs, named_args, **kwargs):
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    # Tile sizes a mode does not use would only make the autotuner time the same kernel twice.
    if arg("LOAD_L"):
        unused = "BLOCK_K"
    elif not arg("EPILOGUE"):
        unused = "BLOCK_N"
    else:
        unused = None
    seen, unique = set(), []
    for c in configs:
        sig = (tuple(sorted((k, v) for k, v in c.kwargs.items() if k != unused)), c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            unique.append(c)
    # The [BLOCK_M, R_PAD] L tile lives through the whole epilogue: keep it and the
    # [BLOCK_M, BLOCK_N] output tile within registers at large ranks.
    if arg("R_PAD", 16) >= 128:
        unique = [c for c in unique if c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 128] or unique
    return unique


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
    # The row pass streams a [tokens, K] tensor in (wide K tiles, deep pipelines) and, with the
    # epilogue, a [tokens, N] tensor out; small row blocks keep enough programs in flight.
    _ROWPASS_CONFIGS = [
        _row_config(32, 128, 128, 4, 3),
        _row_config(64, 128, 128, 4, 3),
        _row_config(64, 128, 256, 8, 3),
        _row_config(16, 256, 256, 4, 3),
        _row_config(32, 256, 256, 8, 3),
        _row_config(128, 128, 128, 8, 3),
        _row_config(128, 64, 256, 8, 3),
    ]
    _COLPASS_CONFIGS = [
        _col_config(64, 128, 4, 4),
        _col_config(128, 128, 8, 3),
        _col_config(64, 256, 8, 3),
        _col_config(128, 64, 4, 4),
        _col_config(128, 32, 4, 4),
    ]
    _MATMUL_KEY = ["M", "N", "K", "R_PAD", "LORA_MODE", "STORE_L", "HAS_BIAS", "DROPOUT", "PRECISION"]
    _ROWPASS_KEY = ["M", "K", "N", "R_PAD", "IN_DROPOUT", "LOAD_L", "STORE_L", "EPILOGUE", "OUT_DROPOUT", "PRECISION"]
    _COLPASS_KEY = ["M", "DA", "DB", "R_PAD", "rows_per_split", "TASK_A", "TASK_B_GRAD", "TASK_B_COLSUM",
                    "DROPOUT", "PRECISION"]

    def _autotuned_matmul(configs):
        return triton.autotune(configs=configs, key=_MATMUL_KEY,
                               prune_configs_by={"early_config_prune": _prune_matmul_configs})(
            _lora_matmul_kernel)

    _matmul_hopper = _autotuned_matmul(_HOPPER_MATMUL_CONFIGS)
    _matmul_default = _autotuned_matmul(_DEFAULT_MATMUL_CONFIGS)
    _rowpass_tuned = triton.autotune(configs=_ROWPASS_CONFIGS, key=_ROWPASS_KEY,
                                     prune_configs_by={"early_config_prune": _prune_rowpass_configs})(
        _lora_rowpass_kernel)
    _colpass_tuned = triton.autotune(configs=_COLPASS_CONFIGS, key=_COLPASS_KEY)(_lora_colpass_kernel)

# Fixed small tiles for the interpreter (tests use shapes of a few dozen) and for runs with
# autotuning switched off (SPLITLORA_TRITON_AUTOTUNE=0, used by the GPU tests to avoid timing
# every config of every shape).
_INTERPRET_META = {
    "matmul": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1),
    "rowpass": dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1),
    "colpass": dict(BLOCK_M=32, BLOCK_D=32, num_warps=4, num_stages=1),
}
_FIXED_META = {
    "matmul": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    "rowpass": dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "colpass": dict(BLOCK_M=64, BLOCK_D=64, num_warps=4, num_stages=3),
}
_FIXED_MATMUL_META_IEEE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_interpreted() -> bool:
    """Whether triton.jit wrapped the kernels for its interpreter (TRITON_INTERPRET=1 at import):
    fixed for the life of the process."""
    if _TRITON_IMPORT_ERROR is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lora_rowpass_kernel, InterpretedFunction)


_INTERPRETED = _kernels_interpreted()
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


# ----------------------------------------------------------------------------------------------
# Launching with little host work
# ----------------------------------------------------------------------------------------------

_CAPABILITY: dict = {}


def _tuner(kernel: str, dev: int):
    if kernel == "matmul":
        major = _CAPABILITY.get(dev)
        if major is None:
            major = _CAPABILITY[dev] = torch.cuda.get_device_capability(dev)[0]
        return _matmul_hopper if major == 9 else _matmul_default
    return {"rowpass": _rowpass_tuned, "colpass": _colpass_tuned}.get(kernel)


def _fixed_meta(kernel: str, flags: tuple) -> dict:
    if kernel == "finish":
        return dict(S_BLOCK=8, BLOCK=_FINISH_BLOCK, num_warps=4, num_stages=1)
    if kernel == "matmul" and "ieee" in flags:
        return _FIXED_MATMUL_META_IEEE
    return _FIXED_META[kernel]


_FINISH_BLOCK = 512
_RAW_KERNELS = {"matmul": _lora_matmul_kernel, "rowpass": _lora_rowpass_kernel,
                "colpass": _lora_colpass_kernel, "finish": _lora_finish_kernel}
_TILE_NAMES = {"matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), "rowpass": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
               "colpass": ("BLOCK_M", "BLOCK_D"), "finish": ("S_BLOCK", "BLOCK")}
# How many leading scalars (seed, p_drop, drop_scale, scaling) never change the compiled code.
_FREE_SCALARS = {"matmul": 4, "rowpass": 4, "colpass": 4, "finish": 0}


def register_launch_kernel(name: str, kernel, *, tiles: Tuple[str, ...], free_scalars: int, fixed_meta: dict,
                           interpret_meta: dict) -> None:
    """Lets `_launch` run another module's @triton.jit kernel by `name` (how multi_lora's kernels
    share this launcher: the interpreter patch, the cache of compiled variants launched with
    little host work). `tiles`: the kernel's tile constexprs, in signature order, last in its
    argument list; `free_scalars`: how many leading scalar arguments never change the compiled
    code (a dropout seed, say); `fixed_meta` / `interpret_meta`: the tiles (and num_warps,
    num_stages) on a GPU and in the interpreter. Such kernels are not autotuned."""
    _RAW_KERNELS[name] = kernel
    _TILE_NAMES[name] = tuple(tiles)
    _FREE_SCALARS[name] = int(free_scalars)
    _FIXED_META[name] = dict(fixed_meta)
    _INTERPRET_META[name] = dict(interpret_meta)


# Launch key -> tile meta the autotuner picked (or the fixed one), and launch key -> a callable
# that launches the compiled kernel directly. The key holds everything triton specializes a
# compiled kernel on, so a hit can skip triton's binder.
_TUNED: dict = {}
_FAST: dict = {}
_FAST_LIMIT = 4096

if _TRITON_IMPORT_ERROR is None and torch.cuda.is_available():
    _current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
        lambda dev: torch.cuda.current_stream(dev).cuda_stream)
else:  # only reached by the compiled path, which needs CUDA
    _current_device = _raw_stream = None


def _hooks_installed() -> bool:
    hook = _triton_knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook is not None))


def _make_fast(compiled, grid, tile_values):
    """A callable(stream, args) that launches `compiled` over `grid` with runtime `args` (pointers
    as integers, then scalars, then constexpr flags; tile values are appended here)."""
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    launcher = compiled.run  # loads the module on first access
    raw = getattr(launcher, "launch", None)
    if (raw is not None and type(launcher).__name__ == "CudaLauncher" and getattr(launcher, "num_ctas", 1) == 1
            and not launcher.global_scratch_size and not launcher.profile_scratch_size):
        function, packed = compiled.function, compiled.packed_metadata
        coop, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl

        def fast(stream, args):
            # The arguments of triton's generated C launcher (driver.py, make_launcher): grid,
            # stream, function, cooperative/PDL flags, the two scratch buffers, kernel metadata,
            # launch metadata and the two launch hooks, then every kernel argument.
            raw(g0, g1, g2, stream, function, coop, pdl, None, None, packed, None, None, None, *args, *tile_values)

        return fast
    runner = compiled[(g0, g1, g2)]  # other backends: the compiled kernel's own runner

    def generic(stream, args):
        runner(*args, *tile_values, stream=stream)

    return generic


def _launch(kernel: str, grid_fn, ptrs: tuple, scalars: tuple, flags: tuple) -> None:
    """Launch `kernel` over grid_fn(meta) with arguments ptrs + scalars + flags (signature order;
    tile sizes come from the autotuner, the fixed configs or the interpreter's)."""
    if _INTERPRETED:
        _patch_interpreter_scalar_index()
        meta = _INTERPRET_META.get(kernel) or _fixed_meta(kernel, flags)
        _RAW_KERNELS[kernel][grid_fn(meta)](*ptrs, *scalars, *flags, **meta)
        return
    addrs = [t.data_ptr() for t in ptrs]
    dev = _current_device()
    key = (kernel, dev, flags, scalars[_FREE_SCALARS[kernel]:], tuple([t.dtype for t in ptrs]),
           tuple([a & 15 for a in addrs]))
    fast = _FAST.get(key)
    if fast is not None and not _hooks_installed():
        fast(_raw_stream(dev), (*addrs, *scalars, *flags))
        return
    _launch_slow(kernel, key, dev, grid_fn, ptrs, scalars, flags)


# The token-count arguments of the autotuned kernels. Training with each batch padded to its own
# longest sequence gives a new token count nearly every step; autotuning each one (compiling and
# timing every config of every kernel: about 100 s a step for GPT-2 medium on an H100) would
# dwarf the training, and the best tile hardly moves within a factor of two of rows. So a tile is
# tuned once per power-of-two bucket of these arguments and reused for the bucket's other counts.
_TOKEN_ARGS = {"matmul": ("M",), "rowpass": ("M",), "colpass": ("M", "rows_per_split")}
_TOKEN_ARG_INDEX: dict = {}
# Tuning key (the launch key with its token counts bucketed) -> the tile meta tuned for it.
_TUNED_BUCKETS: dict = {}


def _token_bucket(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())


def _tuning_key(kernel: str, key: tuple, n_ptrs: int) -> tuple:
    """`key` (see _launch) with the kernel's token-count scalars rounded up to a power of two."""
    index = _TOKEN_ARG_INDEX.get(kernel)
    if index is None:
        names = _RAW_KERNELS[kernel].arg_names
        first = n_ptrs + _FREE_SCALARS[kernel]  # the key's scalars start after the free ones
        index = _TOKEN_ARG_INDEX[kernel] = tuple(names.index(a) - first for a in _TOKEN_ARGS.get(kernel, ()))
    scalars = list(key[3])
    for i in index:
        scalars[i] = _token_bucket(scalars[i])
    return key[:3] + (tuple(scalars),) + key[4:]


def _launch_slow(kernel, key, dev, grid_fn, ptrs, scalars, flags):
    meta = _TUNED.get(key)
    if meta is None:
        tuner = _tuner(kernel, dev) if _autotune_enabled() else None
        if tuner is None:
            meta = _TUNED[key] = _fixed_meta(kernel, flags)
        else:
            bucket = _tuning_key(kernel, key, len(ptrs))
            meta = _TUNED_BUCKETS.get(bucket)
            if meta is None:
                tuner[grid_fn](*ptrs, *scalars, *flags)
                _TUNED[key] = _TUNED_BUCKETS[bucket] = tuner.best_config.all_kwargs()
                return
            _TUNED[key] = meta
    grid = grid_fn(meta)
    compiled = _RAW_KERNELS[kernel][grid](*ptrs, *scalars, *flags, **meta)
    if compiled is None or _hooks_installed():
        return
    if len(_FAST) >= _FAST_LIMIT:  # many distinct shapes (variable sequence lengths): start over
        _FAST.clear()
    _FAST[key] = _make_fast(compiled, grid, tuple(meta[name] for name in _TILE_NAMES[kernel]))


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
    upcast = _INTERPRETED and dtype == torch.bfloat16
    # fp32 follows torch's own matmul policy: TF32 only when the user allowed it.
    if dtype != torch.float32:
        return upcast, "tf32"
    return upcast, ("tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee")


def _dropout_args(p: float, seed: int) -> Tuple[int, float, float]:
    # 31 bits: the seed is then always an i32 kernel argument (one compiled variant).
    return int(seed) & 0x7FFFFFFF, float(p), (1.0 / (1.0 - p) if p > 0.0 else 1.0)


_SMS: dict = {}
# Column pass: problems up to this many elements (tokens * (in + out)) reduce over all tokens in
# one split, storing final gradients directly; larger ones split the tokens into groups of a
# multiple of _SPLIT_ROWS. Tests lower both to exercise the split path on small shapes.
_COLPASS_ONE_SPLIT_MAX = 1 << 22
_SPLIT_ROWS = 128
# Row pass with an epilogue: one merged launch below this many elements (tokens * (K + N)) or
# with enough rows to fill the GPU, else two (see _launch_rowpass). Tests lower it to cover both.
_MERGED_ROWPASS_MAX = 1 << 23


def _num_sms(dev) -> int:
    if _INTERPRETED:
        return 2
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[dev]


def _launch_rowpass(inp, proj, l, rank, *, p=0.0, seed=0, out=None, up=None, bias=None, scaling=1.0,
                    out_dropout=False):
    """l[M, r] = dropout(inp) @ proj.T (proj a [r, K] view), stored when `l` is given; with `out`,
    also out[M, N] = scaling * l @ up (+ bias) (up a [r, N] view), masked by the dropout mask of
    an [M, N] x when out_dropout (then p and seed describe that mask).

    One launch (L stays in registers) unless the problem is large enough for GPU time to count
    (M * (K + N) >= _MERGED_ROWPASS_MAX elements) while having too few rows to fill the GPU with
    the merged kernel's M / BLOCK_M programs (M < 32 rows per SM): then two launches, the
    second over a 2-D grid of output tiles."""
    M, K = inp.shape
    upcast, precision = _dot_flags(inp.dtype)
    seed, p, drop_scale = _dropout_args(p, seed)
    in_dropout, out_dropout = p > 0.0 and not out_dropout, p > 0.0 and out_dropout
    r_pad = _rank_pad(rank)
    s_im, s_ik = inp.stride()
    s_pr, s_pk = proj.stride()
    dummy = inp
    if out is None or M * (K + out.shape[1]) < _MERGED_ROWPASS_MAX or M >= 32 * _num_sms(inp.device.index):
        s_lm, s_lr = l.stride() if l is not None else (0, 0)
        if out is not None:
            N = out.shape[1]
            s_om, s_on = out.stride()
            s_ur, s_un = up.stride()
        else:
            N, s_om, s_on, s_ur, s_un = 0, 0, 0, 0, 0
        _launch(
            "rowpass", lambda meta: (_cdiv(M, meta["BLOCK_M"]),),
            (inp, proj, l if l is not None else dummy, out if out is not None else dummy,
             up if up is not None else dummy, bias if bias is not None else dummy),
            (seed, p, drop_scale, float(scaling), M, K, N, rank,
             s_im, s_ik, s_pr, s_pk, s_lm, s_lr, s_om, s_on, s_ur, s_un,
             bias.stride(0) if bias is not None else 0),
            (in_dropout, False, l is not None, out is not None, out_dropout, bias is not None,
             r_pad, upcast, precision),
        )
        return
    if l is None:
        l = torch.empty((M, rank), device=inp.device, dtype=inp.dtype)
    s_lm, s_lr = l.stride()
    N = out.shape[1]
    _launch(
        "rowpass", lambda meta: (_cdiv(M, meta["BLOCK_M"]),),
        (inp, proj, l, dummy, dummy, dummy),
        (seed, p, drop_scale, 1.0, M, K, 0, rank, s_im, s_ik, s_pr, s_pk, s_lm, s_lr, 0, 0, 0, 0, 0),
        (in_dropout, False, True, False, False, False, r_pad, upcast, precision),
    )
    s_om, s_on = out.stride()
    s_ur, s_un = up.stride()
    _launch(
        "rowpass", lambda meta: (_cdiv(M, meta["BLOCK_M"]), _cdiv(N, meta["BLOCK_N"])),
        (dummy, dummy, l, out, up, bias if bias is not None else dummy),
        (seed, p, drop_scale, float(scaling), M, 0, N, rank, 0, 0, 0, 0, s_lm, s_lr, s_om, s_on, s_ur, s_un,
         bias.stride(0) if bias is not None else 0),
        (False, True, False, True, out_dropout, bias is not None, r_pad, upcast, precision),
    )


def _launch_colpass(x2d, dyb, dy, xa, rank, *, need_a, need_b, need_bias, scaling, p, seed, bias_dtype):
    """(dA [r, in], dB [out, r], dbias [out]) in their dtypes, each None unless asked for:
    dA = s * dyb.T @ dropout(x), dB = s * dY.T @ xa, dbias = column sums of dY."""
    M, DA = x2d.shape
    DB = dy.shape[1]
    dtype = x2d.dtype
    device = x2d.device
    task_b = need_b or need_bias
    d_tiles = (_cdiv(DA, 128) if need_a else 0) + (_cdiv(DB, 128) if task_b else 0)
    if M * (DA + DB) <= _COLPASS_ONE_SPLIT_MAX:
        # Small: one split, final gradients stored directly (no partials, no finishing launch).
        split, rows_per_split = 1, M
    else:
        # Split the tokens so that about four programs per SM stream their share of the rows
        # (with 128-wide column tiles); the fp32 partials are small next to the inputs.
        split = max(1, min(_cdiv(M, _SPLIT_ROWS), _cdiv(4 * _num_sms(device.index), d_tiles)))
        rows_per_split = _cdiv(_cdiv(M, split), _SPLIT_ROWS) * _SPLIT_ROWS
        split = _cdiv(M, rows_per_split)
    da = torch.empty((rank, DA), device=device, dtype=dtype) if need_a else None
    db = torch.empty((DB, rank), device=device, dtype=dtype) if need_b else None
    dbias = torch.empty((DB,), device=device, dtype=bias_dtype) if need_bias else None
    if split == 1:
        ga, gb, cs = da, db, dbias
        ga_st = (0, DA, 1) if need_a else (0, 0, 0)
        gb_st = (0, 1, rank) if need_b else (0, 0, 0)  # dB [DB, r] seen as [r, DB]
        cs_st = (0, 1) if need_bias else (0, 0)
    else:
        f32 = torch.float32
        ga = torch.empty((split, rank, DA), device=device, dtype=f32) if need_a else None
        gb = torch.empty((split, rank, DB), device=device, dtype=f32) if need_b else None
        cs = torch.empty((split, DB), device=device, dtype=f32) if need_bias else None
        ga_st = (rank * DA, DA, 1) if need_a else (0, 0, 0)
        gb_st = (rank * DB, DB, 1) if need_b else (0, 0, 0)
        cs_st = (DB, 1) if need_bias else (0, 0)
    upcast, precision = _dot_flags(dtype)
    seed, p, drop_scale = _dropout_args(p, seed)
    x_st = x2d.stride() if need_a else (0, 0)
    dyb_st = dyb.stride() if need_a else (0, 0)
    dy_st = dy.stride() if task_b else (0, 0)
    xa_st = xa.stride() if need_b else (0, 0)
    dummy = x2d if need_a else dy
    n_tasks = int(need_a) + int(task_b)
    dmax = max(DA if need_a else 0, DB if task_b else 0)
    r_pad = _rank_pad(rank)
    _launch(
        "colpass", lambda meta: (_cdiv(dmax, meta["BLOCK_D"]), split, n_tasks),
        (x2d if need_a else dummy, dyb if need_a else dummy, ga if need_a else dummy,
         dy if task_b else dummy, xa if need_b else dummy, gb if need_b else dummy, cs if need_bias else dummy),
        (seed, p, drop_scale, float(scaling), M, DA, DB, rank, rows_per_split,
         *x_st, *dyb_st, *ga_st, *dy_st, *xa_st, *gb_st, *cs_st),
        (need_a, need_b, need_bias, p > 0.0, r_pad, upcast, precision),
    )
    if split > 1:
        na = rank * DA if need_a else 0
        nb = rank * DB if need_b else 0
        nc = DB if need_bias else 0
        _launch(
            "finish",
            lambda meta: (_cdiv(na, meta["BLOCK"]) + _cdiv(nb, meta["BLOCK"]) + _cdiv(nc, meta["BLOCK"]),),
            (ga if need_a else dummy, gb if need_b else dummy, cs if need_bias else dummy,
             da if need_a else dummy, db if need_b else dummy, dbias if need_bias else dummy),
            (split, na, nb, nc, rank, DB, _cdiv(na, _FINISH_BLOCK), _cdiv(nb, _FINISH_BLOCK),
             ga_st[0], gb_st[0], cs_st[0]),
            (need_a, need_b, need_bias),
        )
    return da, db, dbias


def _launch_matmul(a, b, c, *, rank=0, bias=None, lora_mode=0, l=None, lb=None, lr=None,
                   store_l=False, scaling=1.0, p=0.0, seed=0):
    """c[M, N] = a[M, K] @ b[K, N] (+ scaling * L @ lr) (+ bias); all arguments are 2-D views
    with arbitrary strides. lora_mode 1 takes L from `l` [M, r]; 2 computes L = a @ lb [K, r]
    in the K loop (and writes it to `l` with store_l). p > 0 masks the low-rank term with the
    dropout mask of an [M, N] x (dX of the backward)."""
    M, K = a.shape
    N = b.shape[1]
    upcast, precision = _dot_flags(a.dtype)
    seed, p, drop_scale = _dropout_args(p, seed)
    dummy = c
    s_l = l.stride() if l is not None else (0, 0)
    s_lb = lb.stride() if lb is not None else (0, 0)
    s_lr = lr.stride() if lr is not None else (0, 0)
    _launch(
        "matmul", lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),),
        (a, b, c, bias if bias is not None else dummy, l if l is not None else dummy,
         lb if lb is not None else dummy, lr if lr is not None else dummy),
        (seed, p, drop_scale, float(scaling), M, N, K, max(rank, 1),
         *a.stride(), *b.stride(), *c.stride(), *s_l, *s_lb, *s_lr, bias.stride(0) if bias is not None else 0),
        (bias is not None, lora_mode, store_l, p > 0.0, _rank_pad(max(rank, 1)), upcast, precision),
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
            if _INTERPRETED:
                _patch_interpreter_scalar_index()
            _dropout_mask_kernel[(_cdiv(M, 32), _cdiv(D, 32))](
                out, M, D, seed, p, drop_scale, BLOCK_M=32, BLOCK_D=32)
    return out.reshape(shape)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator, so torch.manual_seed makes fused
    dropout reproducible (and no GPU synchronisation is needed to draw it)."""
    return int(_draw_seed_tensor().item())


def _draw_seed_tensor() -> torch.Tensor:
    # int64[1] on the CPU, from torch's default CPU generator.
    return torch.randint(0, 2**31 - 1, (1,))


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def _fused_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, path):
    """The launches of the fused forward: (y [..., out], x2d [M, in], xa [M, r])."""
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    x2d = x.reshape(-1, in_features)
    M = x2d.shape[0]
    xa = torch.empty((M, rank), device=x.device, dtype=x.dtype)
    y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    if path == "cublas":
        # One launch writes xa and the low-rank term (+ bias); cuBLAS with beta=1 reads that
        # term in its epilogue, where a compute-bound GEMM has memory bandwidth to spare.
        _launch_rowpass(x2d, lora_a, xa, rank, p=dropout_p, seed=seed, out=y, up=lora_b.t(), bias=bias,
                        scaling=scaling)
        y.addmm_(x2d, weight.t())
    else:
        _launch_rowpass(x2d, lora_a, xa, rank, p=dropout_p, seed=seed)
        _launch_matmul(x2d, weight.t(), y, rank=rank, bias=bias, lora_mode=1, l=xa, lr=lora_b.t(),
                       scaling=scaling)
    return y.view(*x.shape[:-1], out_features), x2d, xa


def _fused_backward(grad_out, x2d, weight, lora_a, lora_b, xa, s, p, seed, path, needs, bias_dtype, x_shape):
    """The launches of the fused backward: (dx, dw, da, db, dbias), each None unless `needs`
    (need_x, need_w, need_a, need_b, need_bias) asks for it."""
    need_x, need_w, need_a, need_b, need_bias = needs
    rank = lora_a.shape[0]
    out_features, in_features = weight.shape
    dy = grad_out.reshape(-1, out_features)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = dw = da = db = dbias = None

    # dY @ B ([tokens, r]) feeds both dX and dA. The cublas path computes it in the row pass
    # whose epilogue writes dX's low-rank term; "triton" accumulates it inside the dX GEMM's
    # K loop; "triton-pre" takes it from a row pass and loads it in the dX GEMM's epilogue.
    dyb = None
    if need_a or (need_x and path != "cublas"):
        dyb = torch.empty((dy.shape[0], rank), device=dy.device, dtype=dy.dtype)
    if need_x:
        dx = torch.empty((x2d.shape[0], in_features), device=dy.device, dtype=dy.dtype)
        if path == "cublas":
            # The low-rank term (masked by dropout) first, then cuBLAS adds dY @ W onto it.
            _launch_rowpass(dy, lora_b.t(), dyb, rank, p=p, seed=seed, out=dx, up=lora_a, scaling=s,
                            out_dropout=True)
            dx.addmm_(dy, weight)
        elif path == "triton":
            _launch_matmul(dy, weight, dx, rank=rank, lora_mode=2, lb=lora_b, lr=lora_a, l=dyb,
                           store_l=need_a, scaling=s, p=p, seed=seed)
        else:
            _launch_rowpass(dy, lora_b.t(), dyb, rank)
            _launch_matmul(dy, weight, dx, rank=rank, lora_mode=1, l=dyb, lr=lora_a, scaling=s, p=p, seed=seed)
    elif need_a:
        _launch_rowpass(dy, lora_b.t(), dyb, rank)
    # dA = s * (dY @ B).T @ dropout(x), dB = s * dY.T @ xa and dbias: one column pass over x
    # and dY together (plus one launch summing its partials on large problems).
    if need_a or need_b or need_bias:
        da, db, dbias = _launch_colpass(x2d, dyb, dy, xa, rank, need_a=need_a, need_b=need_b,
                                        need_bias=need_bias, scaling=s, p=p, seed=seed,
                                        bias_dtype=bias_dtype)
    if need_w:
        # Full fine-tuning of this layer: dW = dY.T @ x (the base path has no dropout).
        if path != "cublas":
            dw = torch.empty((out_features, in_features), device=dy.device, dtype=weight.dtype)
            _launch_matmul(dy.t(), x2d, dw)
        else:
            dw = (dy.t() @ x2d).to(weight.dtype)
    if dx is not None:
        dx = dx.view(x_shape)
    return dx, dw, da, db, dbias


class LoRALinearFunction(torch.autograd.Function):
    """Triton forward and backward of the LoRA linear (int seed): what `lora_linear` and
    `lora_linear_triton` run in eager mode. Under torch.compile they call the custom ops
    ``splitlora::lora_linear_fwd`` / ``lora_linear_bwd`` instead, which run the same launches
    (_fused_forward / _fused_backward). Arguments are validated by the callers."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, path):
        y, x2d, xa = _fused_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, path)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.path = scaling, dropout_p, seed, path
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        needs = (need_x, need_w, need_a, need_b, need_bias and ctx.has_bias)
        grads = _fused_backward(grad_out, x2d, weight, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, ctx.seed,
                                ctx.path, needs, ctx.bias_dtype, ctx.x_shape)
        return (*grads, None, None, None, None)


class LoRALinearTorchFunction(torch.autograd.Function):
    """The "torch" path: cuBLAS GEMMs only, no dropout (callers route dropout > 0 elsewhere),
    with the fewest ops that compute the same function (three forward, up to eight backward)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling):
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        xa = torch.mm(x2d, lora_a.t())
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        ctx.has_bias = bias is not None
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        s = ctx.scaling
        dy = grad_out.reshape(-1, weight.shape[0])
        dx = dw = da = db = dbias = None
        dyb = torch.mm(dy, lora_b) if (need_x or need_a) else None
        if need_x:
            dx = torch.mm(dy, weight)
            dx.addmm_(dyb, lora_a, alpha=s)
            dx = dx.view(ctx.x_shape)
        if need_a:
            da = torch.mm(dyb.t(), x2d).mul_(s)
        if need_b:
            db = torch.mm(dy.t(), xa).mul_(s)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        if need_w:
            dw = torch.mm(dy.t(), x2d)
        return dx, dw, da, db, dbias, None


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library): what torch.compile sees
# ----------------------------------------------------------------------------------------------
# ``splitlora::lora_linear_fwd`` and ``splitlora::lora_linear_bwd`` wrap the whole forward and
# backward, so torch.compile (dynamo, AOTAutograd, FakeTensor) never traces into the launch code
# (raw data_ptr()s, the seed read on the host): it sees two opaque ops with fake kernels giving
# their output shapes, and the backward op tied to the forward by register_autograd.
#
# ``path`` picks the implementation: one of the fused CUDA_PATHS but "torch" (the Triton/cuBLAS
# launches of _fused_forward/_fused_backward, unchanged; CUDA tensors, or CPU tensors with
# TRITON_INTERPRET=1), or "reference" (plain torch: CPU tensors and what the kernels do not cover).
# Dropout: the fused paths take the kernels' ``seed`` as an int64 tensor of one element (drawn
# on the CPU, so reading it inside the op is no device synchronisation; the launch passes it to
# the kernels as an int, as before); the reference path takes the scaled keep ``mask`` drawn
# outside the op (torch.bernoulli, an ordinary op that compile traces), saved for the backward.
# Gradients the backward is not asked for come back as empty tensors (custom ops return no None).
#
# Only code traced by torch.compile calls these ops (`lora_linear` / `lora_linear_triton` check
# torch.compiler.is_compiling()): in eager mode the custom op's autograd wrapper costs several
# times the host time of LoRALinearFunction.apply (measured on CPU: ~250 us against ~55 us per
# call with autograd), and host time is what small layers are limited by on the GPU. Eager calls
# therefore keep LoRALinearFunction (fused paths) and lora_linear_reference (reference path), which
# compute the same function with the same seed / mask: the compiled tests check that they agree.
# No double backward through the ops (lora_linear_bwd has no autograd formula), as for the
# autograd.Function.


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _reference_forward(x, weight, lora_a, lora_b, bias, scaling, mask):
    # The arithmetic of lora_linear_reference, keeping xa (for dB) as a second output.
    x_lora = x if mask is None else x * mask.to(x.dtype)
    xa = torch.nn.functional.linear(x_lora, lora_a)
    y = torch.nn.functional.linear(x, weight, bias) + scaling * torch.nn.functional.linear(xa, lora_b)
    return y, xa.reshape(-1, lora_a.shape[0])


def _reference_backward(grad_out, x, weight, lora_a, lora_b, xa, scaling, mask, needs):
    # What torch's autograd computes for lora_linear_reference, in the same order.
    need_x, need_w, need_a, need_b, need_bias = needs
    out_features, in_features = weight.shape
    dy = grad_out.reshape(-1, out_features)
    x2d = x.reshape(-1, in_features)
    m2d = None if mask is None else mask.to(x.dtype).expand(x.shape).reshape(-1, in_features)
    dx = dw = da = db = dbias = None
    g_low = dy * scaling
    if need_x or need_a:
        g_xa = g_low @ lora_b
    if need_x:
        g_xlora = g_xa @ lora_a
        if m2d is not None:
            g_xlora = g_xlora * m2d
        dx = (dy @ weight + g_xlora).view(x.shape)
    if need_w:
        dw = dy.t() @ x2d
    if need_a:
        da = g_xa.t() @ (x2d if m2d is None else x2d * m2d)
    if need_b:
        db = g_low.t() @ xa
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, da, db, dbias


@torch.library.custom_op("splitlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    path: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [..., out], xa [M, r]): the LoRA linear and the thin product dropout(x) @ lora_a.T
    (saved for the backward). Inputs are validated by the callers (`lora_linear`)."""
    if path == "reference":
        return _reference_forward(x, weight, lora_a, lora_b, bias, scaling, mask)
    seed_i = _seed_int(seed)
    if x.is_cuda and x.get_device() != _current_device():
        # Compiled kernels are loaded into, and launched on, the current device's context.
        with torch.cuda.device(x.device):
            y, _, xa = _fused_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed_i, path)
    else:
        y, _, xa = _fused_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed_i, path)
    return y, xa


@lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, mask, path):
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    m = x.numel() // in_features
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, rank))


@torch.library.custom_op("splitlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    path: str,
    needs: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, da, db, dbias) of lora_linear_fwd for grad_out (dy); `needs` (need_x, need_w,
    need_a, need_b, need_bias) says which are computed, the others are empty tensors."""
    needs = tuple(bool(n) for n in needs)
    if path == "reference":
        grads = _reference_backward(grad_out, x, weight, lora_a, lora_b, xa, scaling, mask, needs)
    else:
        args = (grad_out, x.reshape(-1, weight.shape[1]), weight, lora_a, lora_b, xa, scaling, dropout_p,
                _seed_int(seed), path, needs, grad_out.dtype, x.shape)
        if grad_out.is_cuda and grad_out.get_device() != _current_device():
            with torch.cuda.device(grad_out.device):
                grads = _fused_backward(*args)
        else:
            grads = _fused_backward(*args)
    return tuple(g.contiguous() if g is not None else grad_out.new_empty((0,)) for g in grads)


@lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(grad_out, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, mask, path, needs):
    out_features = weight.shape[0]
    shapes = (x.shape, weight.shape, lora_a.shape, lora_b.shape, (out_features,))
    dtypes = (grad_out.dtype, weight.dtype, grad_out.dtype, grad_out.dtype, grad_out.dtype)
    return tuple(grad_out.new_empty(tuple(shape) if need else (0,), dtype=dtype)
                 for need, shape, dtype in zip(needs, shapes, dtypes))


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, mask, path = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa, seed, mask)
    ctx.mark_non_differentiable(xa)
    ctx.has_bias = bias is not None
    ctx.scaling, ctx.dropout_p, ctx.path = scaling, dropout_p, path


def _lora_linear_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_b, xa, seed, mask = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    needs = [need_x, need_w, need_a, need_b, need_bias and ctx.has_bias]
    grads = lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed, mask,
                            ctx.path, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


lora_linear_fwd.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup_context)


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


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _valid_cuda_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p) -> bool:
    """True when the arguments are certainly valid CUDA inputs: the common case, checked with a
    few cheap comparisons. False means "ask check_lora_linear_args", which raises or accepts."""
    try:
        if not (x.is_cuda and type(scaling) is float and math.isfinite(scaling)
                and (type(dropout_p) is float or type(dropout_p) is int) and 0.0 <= dropout_p < 1.0):
            return False
        dtype, dev = x.dtype, x.get_device()
        ws, as_, bs = weight.shape, lora_a.shape, lora_b.shape
        if not (len(ws) == 2 and len(as_) == 2 and len(bs) == 2 and x.dim() >= 1 and as_[0] >= 1
                and x.shape[-1] == ws[1] == as_[1] and bs[0] == ws[0] and bs[1] == as_[0]
                and dtype in _KERNEL_DTYPES and weight.dtype is dtype and lora_a.dtype is dtype
                and lora_b.dtype is dtype and weight.get_device() == dev and lora_a.get_device() == dev
                and lora_b.get_device() == dev and weight.is_cuda and lora_a.is_cuda and lora_b.is_cuda):
            return False
        if bias is not None and not (bias.dim() == 1 and bias.shape[0] == ws[0] and bias.dtype is dtype
                                     and bias.is_cuda and bias.get_device() == dev):
            return False
        return True
    except (AttributeError, TypeError):
        return False


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
    TRITON_INTERPRET=1 (how CI tests the kernels). `seed` (an int, or an int64 tensor of one
    element, best on the CPU: a CUDA one is read with a device synchronisation) fixes the dropout
    mask (see `dropout_mask`); `path` picks one of CUDA_PATHS (see the module docstring)."""
    _require_triton()
    if not _valid_cuda_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p):
        check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    if x.device.type != "cuda" and not (_INTERPRETED and _interpreting()):
        raise ValueError(
            f"lora_linear_triton: x is on {x.device}, the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them in the interpreter); use lora_linear for CPU tensors")
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"lora_linear_triton: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    rank = lora_a.shape[0]
    if rank > MAX_TRITON_RANK:
        raise ValueError(f"lora_linear_triton: rank (lora_a.shape[0]) must be at most {MAX_TRITON_RANK}, "
                         f"got {rank}; use lora_linear, which falls back to the reference for larger ranks")
    return _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, seed, _resolve_path(path))


def _seed_tensor(seed) -> torch.Tensor:
    """The dropout seed as the int64 CPU tensor of one element the custom ops take: drawn from
    torch's default CPU generator when None (the draw of `draw_seed`, so torch.manual_seed makes
    fused dropout reproducible, and no GPU synchronisation is needed to draw or read it)."""
    if seed is None:
        return _draw_seed_tensor()
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64)


def _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, seed, path):
    p = float(dropout_p) if training else 0.0
    if x.numel() == 0:
        return lora_linear_reference(x, weight, lora_a, lora_b, float(scaling), bias)
    if path == "torch":
        if p == 0.0:
            return LoRALinearTorchFunction.apply(x, weight, lora_a, lora_b, bias, float(scaling))
        path = "cublas"  # the mask must come from the seed, as in the fused kernels
    if torch.compiler.is_compiling():
        # Traced by torch.compile: the custom op, with the seed as a tensor (no .item() here).
        seed_t = _seed_tensor(seed) if p > 0.0 else None
        return lora_linear_fwd(x, weight, lora_a, lora_b, bias, float(scaling), p, seed_t, None, path)[0]
    # Eager: the autograd.Function directly, which runs the same launches with the same seed but
    # costs less host time per call than the custom op's autograd wrapper.
    if seed is None:
        seed = draw_seed() if p > 0.0 else 0
    if x.is_cuda and x.get_device() != _current_device():
        # Compiled kernels are loaded into, and launched on, the current device's context.
        with torch.cuda.device(x.device):
            return LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, float(scaling), p, int(seed), path)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, float(scaling), p, int(seed), path)


def lora_linear_backend(x: torch.Tensor, lora_a: torch.Tensor) -> str:
    """Which implementation `lora_linear` uses for these inputs: one of CUDA_PATHS, or
    "reference" (plain torch on CPU tensors and what the kernels do not cover)."""
    if not x.is_cuda or _TRITON_IMPORT_ERROR is not None or lora_a.shape[0] > MAX_TRITON_RANK \
            or x.dtype not in _KERNEL_DTYPES:
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
    # The common case (valid CUDA inputs) is recognised with a few cheap comparisons: at small
    # sizes every microsecond of host time shows.
    if not _valid_cuda_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p):
        check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    backend = lora_linear_backend(x, lora_a)
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug("lora_linear: %s backend for x %s %s on %s, rank %d", backend, tuple(x.shape),
                     x.dtype, x.device, lora_a.shape[0])
    if backend != "reference":
        return _run_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, None, backend)
    mask = None
    if dropout_p > 0.0 and training:
        mask = torch.empty_like(x).bernoulli_(1.0 - dropout_p) / (1.0 - dropout_p)
    if torch.compiler.is_compiling() and x.numel() > 0:
        # The same arithmetic as one custom op (what the CUDA paths are under compile too).
        return lora_linear_fwd(x, weight, lora_a, lora_b, bias, float(scaling), 0.0, None, mask, "reference")[0]
    return lora_linear_reference(x, weight, lora_a, lora_b, float(scaling), bias, mask)
