"""Batched multi-adapter LoRA linear: one frozen base weight, G adapters of different ranks, rows
grouped by adapter (the HSplitLoRA server running every client's adapters in one launch).

    y[rows of g] = x[rows of g] @ weight.T + bias + s_g * (x[rows of g] @ A_g.T) @ B_g.T

Shapes: x [..., in] (flattened to [M, in]), weight [out, in] (any strides), bias [out] or None,
lora_as[g] [r_g, in], lora_bs[g] [out, r_g], r_g in 1..256 and free to differ between groups,
scalings one number or G numbers, offsets G+1 row boundaries: the rows of group g are
[offsets[g], offsets[g+1]) of the flattened x (0 = offsets[0] <= ... <= offsets[G] = M; empty
groups are allowed). Sort the batch by adapter first: `offsets_from_sizes` turns per-adapter row
counts into offsets.

What runs (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; fp32 accumulation everywhere,
no atomics, so results are deterministic):

* Packing. The adapters are concatenated into two flat buffers (one ``torch.cat`` each: A_g
  stored [r_g, in] at a_off[g], B_g stored [out, r_g] at b_off[g]), with no rank padding in memory;
  an int64 table on the device holds the offsets, ranks, buffer offsets and the backward's work
  items, and a float32 tensor the scalings (two small host-to-device copies per forward).
* Forward: ONE Triton launch (``_multi_rowpass_kernel``) for all groups, then ONE cuBLAS GEMM for
  the shared base weight. Each program takes BLOCK_M rows, finds the groups overlapping them
  (a vectorised count over the offsets) and, per group, computes L = x_g @ A_g.T in fp32 (ranks
  padded in registers to R_PAD = max(16, next power of two of the largest rank), lanes past r_g
  masked), stores it (xa, for dB) and sweeps the output columns writing s_g * L @ B_g.T + bias
  for that group's rows. Row blocks may straddle groups: rows are masked per group, so a block
  holding k groups makes k passes (only blocks at group boundaries). Then cuBLAS adds x @ W.T
  onto y (beta=1), as lora_linear's default "cublas" path does.
* Backward, dX: the same kernel with the roles swapped (L = dY @ B_g, stored for dA, epilogue
  s_g * L @ A_g) in one launch, then cuBLAS adds dY @ W.
* Backward, dA_g / dB_g / dbias: ONE launch (``_multi_colpass_kernel``) over (column tiles x
  work items x {A, B}); a work item is a group, or on large problems a chunk of a group's rows
  (never straddling groups). Each program reduces its rows at rank r_g (lora_linear's column-pass
  body, reused) and stores dA_g [r_g, in] and dB_g [out, r_g] straight into flat gradient buffers
  when each group is one item; otherwise fp32 partials that ``_multi_finish_kernel`` sums per
  group in a fixed order in one more launch (which also sums dbias over groups when G > 1).
  dW (full fine-tuning of the base) is one cuBLAS GEMM.

So a forward costs 1 Triton launch + 1 GEMM (+ the packing copies), a backward 1 + 1 GEMM for dX
and 1 (small problems with a single group) or 2 launches for all adapter and bias gradients,
whatever G. Dropout on the adapters' branch (dropout_p > 0 while training) is lora_linear's
seeded mask over the whole flattened x, applied in the forward row pass, the dX epilogue and dA's
column pass; `dropout_mask(x.shape, p, seed)` replays it for the reference. Not done yet: the
two-launch row pass lora_linear uses when few rows must fill a large GPU, and autotuning (fixed
tiles). Ranks above 256 and float64 run the reference.

CPU tensors (without the interpreter) run ``multi_lora_linear_reference``: lora_linear_reference
per group, concatenated, which is also the test oracle.
"""
import importlib
import logging
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

# The submodule, not the function of the same name that splitlora_kernels.ops re-exports.
_ll = importlib.import_module(__package__ + ".lora_linear")
from .lora_linear import MAX_TRITON_RANK, _KERNEL_DTYPES, _TRITON_IMPORT_ERROR, tl, triton
from .reference import check_dropout_p, lora_linear_reference

if _TRITON_IMPORT_ERROR is None:
    from .lora_linear import _colpass_body, _lowrank_epilogue, _sum_splits, _thin_product
else:  # the kernels below are parsed, never run
    _colpass_body = _lowrank_epilogue = _sum_splits = _thin_product = None

logger = logging.getLogger(__name__)

Offsets = Union[Sequence[int], torch.Tensor]
Scalings = Union[float, Sequence[float], torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# The int64 table (see _Plan): offsets [G+1] | ranks [G] | a_off [G] | b_off [G] |
# item_group [n] | item_lo [n] | item_hi [n] | item_first [G+1] (the items of group g are
# item_first[g] .. item_first[g+1]-1).


@triton.jit(do_not_specialize=["seed"])
def _multi_rowpass_kernel(
    in_ptr, proj_ptr, l_ptr, out_ptr, up_ptr, bias_ptr, table_ptr, scal_ptr,
    seed, p_drop, drop_scale,
    M, K, N, G,
    stride_im, stride_ik, stride_lm, stride_lr, stride_om, stride_on, stride_bias,
    BACKWARD: tl.constexpr, STORE_L: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    IN_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per group g overlapping this block of rows: L = dropout(in_g) @ P_g.T ([rows, r_g]), stored to
    l with STORE_L; with EPILOGUE also out = s_g * L @ U_g (+ bias) for the group's rows, masked by
    the dropout mask of an [M, N] x with OUT_DROPOUT.
    Forward (BACKWARD False): in = x [M, K=in], P_g = A_g [r_g, in], U_g = B_g.T, out = y.
    Backward: in = dY [M, K=out], P_g = B_g.T, U_g = A_g [r_g, N=in], out = dX.
    proj_ptr / up_ptr are the flat buffers holding A_g [r_g, in] and B_g [out, r_g] back to back.
    Dropout is lora_linear's: the keep decision for x[row, col] is drawn from (seed, row * in + col)
    with the row of the whole flattened x, so every group sees its rows' part of one mask."""
    pid = tl.program_id(0)
    row_start = pid * BLOCK_M
    row_last = tl.minimum(row_start + BLOCK_M, M) - 1
    # The group of row r is the number of groups ending at or before r (empty groups included),
    # so the groups overlapping this block are g_lo..g_hi.
    g_lo = pid * 0
    g_hi = pid * 0
    for g0 in range(0, G, 64):
        gs = g0 + tl.arange(0, 64)
        ends = tl.load(table_ptr + 1 + gs, mask=gs < G, other=M)
        g_lo += tl.sum((ends <= row_start).to(tl.int32), axis=0)
        g_hi += tl.sum((ends <= row_last).to(tl.int32), axis=0)
    rows = row_start + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    for g in range(g_lo, g_hi + 1):
        lo = tl.load(table_ptr + g)
        hi = tl.load(table_ptr + g + 1)
        if hi > lo:
            rank = tl.load(table_ptr + G + 1 + g).to(tl.int32)
            scaling = tl.load(scal_ptr + g)
            a_off = tl.load(table_ptr + 2 * G + 1 + g)
            b_off = tl.load(table_ptr + 3 * G + 1 + g)
            if BACKWARD:
                p_base = proj_ptr + b_off  # B_g [K=out, r]: P[r, k] at k * r + r_idx
                u_base = up_ptr + a_off    # A_g [r, N=in]
                s_pr = 1
                s_pk = rank
                s_ur = N
                s_un = 1
            else:
                p_base = proj_ptr + a_off  # A_g [r, K=in]
                u_base = up_ptr + b_off    # B_g [N=out, r]: U[r, n] at n * r + r_idx
                s_pr = K
                s_pk = 1
                s_ur = 1
                s_un = rank
            row_mask = (rows >= lo) & (rows < hi)
            r_mask = offs_r < rank
            l = _thin_product(in_ptr, p_base, rows64, row_mask, offs_r, r_mask, K,
                              stride_im, stride_ik, s_pk, s_pr, seed, p_drop, drop_scale,
                              IN_DROPOUT, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_K)
            if STORE_L:
                tl.store(l_ptr + rows64[:, None] * stride_lm + offs_r[None, :] * stride_lr, l,
                         mask=row_mask[:, None] & r_mask[None, :])
            if EPILOGUE:
                _lowrank_epilogue(l, u_base, out_ptr, bias_ptr, rows64, row_mask, offs_r, r_mask, 0, N, N,
                                  s_ur, s_un, stride_om, stride_on, stride_bias,
                                  seed, p_drop, drop_scale, scaling,
                                  OUT_DROPOUT, HAS_BIAS, UPCAST, PRECISION, BLOCK_N)


@triton.jit(do_not_specialize=["seed"])
def _multi_colpass_kernel(
    x_ptr, dyb_ptr, ga_ptr, dy_ptr, xa_ptr, gb_ptr, cs_ptr, table_ptr, scal_ptr,
    seed, p_drop, drop_scale,
    G, n_items, DA, DB,
    stride_xm, stride_xd, stride_dybm, stride_dybr, stride_dym, stride_dyd, stride_xam, stride_xar,
    stride_gas, stride_gbs, stride_css,
    TASK_A: tl.constexpr, TASK_B_GRAD: tl.constexpr, TASK_B_COLSUM: tl.constexpr,
    PARTIAL: tl.constexpr, CS_PARTIAL: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reductions over the rows of one work item (a group or a chunk of one), at the group's rank.
    Task A: s_g * dyb[rows, :r].T @ dropout(x[rows]) -> dA_g [r, DA] (DROPOUT: the forward's mask,
    drawn for x's own rows: the item's first row is lo). Task B: s_g * xa[rows, :r].T @ dY[rows]
    -> dB_g [DB, r] (stored transposed) and column sums of dY[rows]. Final gradients go into the
    flat buffers at the group's offset; with PARTIAL, fp32 partials [item, r, D] instead (and with
    CS_PARTIAL the column sums go to [item, DB]) for _multi_finish_kernel."""
    pid_d = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_t = tl.program_id(2)
    items = table_ptr + 4 * G + 1
    g = tl.load(items + pid_i)
    lo = tl.load(items + n_items + pid_i)
    hi = tl.load(items + 2 * n_items + pid_i)
    n_rows = (hi - lo).to(tl.int32)
    rank = tl.load(table_ptr + G + 1 + g).to(tl.int32)
    scaling = tl.load(scal_ptr + g)
    if TASK_A and (TASK_B_GRAD or TASK_B_COLSUM):
        run_a = pid_t == 0
    else:
        run_a = TASK_A
    if run_a:
        if pid_d * BLOCK_D < DA:
            if PARTIAL:
                ga = ga_ptr + pid_i.to(tl.int64) * stride_gas
            else:
                ga = ga_ptr + tl.load(table_ptr + 2 * G + 1 + g)
            _colpass_body(x_ptr + lo * stride_xm, dyb_ptr + lo * stride_dybm, ga, cs_ptr, pid_d, 0,
                          seed, p_drop, drop_scale, scaling, n_rows, DA, rank, n_rows, lo,
                          stride_xm, stride_xd, stride_dybm, stride_dybr, 0, DA, 1, 0, 0,
                          DROPOUT, True, False, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
    else:
        if pid_d * BLOCK_D < DB:
            if CS_PARTIAL:
                cs = cs_ptr + pid_i.to(tl.int64) * stride_css
            else:
                cs = cs_ptr
            if PARTIAL:
                gb = gb_ptr + pid_i.to(tl.int64) * stride_gbs
                _colpass_body(dy_ptr + lo * stride_dym, xa_ptr + lo * stride_xam, gb, cs, pid_d, 0,
                              0, 0.0, 1.0, scaling, n_rows, DB, rank, n_rows, lo,
                              stride_dym, stride_dyd, stride_xam, stride_xar, 0, DB, 1, 0, 1,
                              False, TASK_B_GRAD, TASK_B_COLSUM, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
            else:
                # dB_g [DB, r] seen as [r, DB]: row stride 1, column stride r.
                gb = gb_ptr + tl.load(table_ptr + 3 * G + 1 + g)
                _colpass_body(dy_ptr + lo * stride_dym, xa_ptr + lo * stride_xam, gb, cs, pid_d, 0,
                              0, 0.0, 1.0, scaling, n_rows, DB, rank, n_rows, lo,
                              stride_dym, stride_dyd, stride_xam, stride_xar, 0, 1, rank, 0, 1,
                              False, TASK_B_GRAD, TASK_B_COLSUM, R_PAD, UPCAST, PRECISION, BLOCK_M, BLOCK_D)


@triton.jit
def _multi_finish_kernel(
    ga_ptr, gb_ptr, cs_ptr, da_ptr, db_ptr, dbias_ptr, table_ptr,
    G, n_items, DA, DB, stride_gas, stride_gbs, stride_css,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    S_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sums the column pass's fp32 partials over each group's items (fixed order: deterministic)
    into dA_g [r, DA] and dB_g [DB, r] (transposing the [r, DB] partials), and the column sums over
    all items into dbias. Grid: (element tiles, groups, 3 tasks); a task not asked for, and the
    bias task outside group 0, returns at once."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    task = tl.program_id(2)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    rank = tl.load(table_ptr + G + 1 + g).to(tl.int32)
    first = tl.load(table_ptr + 4 * G + 1 + 3 * n_items + g)
    count = (tl.load(table_ptr + 4 * G + 1 + 3 * n_items + g + 1) - first).to(tl.int32)
    if HAS_A and task == 0:
        n = rank * DA
        if pid * BLOCK < n:
            acc = _sum_splits(ga_ptr + first * stride_gas, j, n, count, stride_gas, S_BLOCK, BLOCK)
            dst = da_ptr + tl.load(table_ptr + 2 * G + 1 + g)
            tl.store(dst + j, acc.to(da_ptr.dtype.element_ty), mask=j < n)
    elif HAS_B and task == 1:
        n = rank * DB
        if pid * BLOCK < n:
            acc = _sum_splits(gb_ptr + first * stride_gbs, j, n, count, stride_gbs, S_BLOCK, BLOCK)
            r = j // DB
            d = j - r * DB
            dst = db_ptr + tl.load(table_ptr + 3 * G + 1 + g)
            tl.store(dst + d.to(tl.int64) * rank + r, acc.to(db_ptr.dtype.element_ty), mask=j < n)
    elif HAS_BIAS and task == 2:
        if g == 0:
            if pid * BLOCK < DB:
                acc = _sum_splits(cs_ptr, j, DB, n_items, stride_css, S_BLOCK, BLOCK)
                tl.store(dbias_ptr + j, acc.to(dbias_ptr.dtype.element_ty), mask=j < DB)


# These kernels go through lora_linear's launcher (`_launch`: interpreter patching, a cache of
# compiled variants launched with little host work), with fixed tiles (no autotuning). The first
# three scalars of the row and column passes (the dropout seed, p and 1/(1-p)) never change the
# compiled code.
_ll.register_launch_kernel(
    "multi_rowpass", _multi_rowpass_kernel, tiles=("BLOCK_M", "BLOCK_K", "BLOCK_N"), free_scalars=3,
    fixed_meta=dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3),
    interpret_meta=dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1))
_ll.register_launch_kernel(
    "multi_colpass", _multi_colpass_kernel, tiles=("BLOCK_M", "BLOCK_D"), free_scalars=3,
    fixed_meta=dict(BLOCK_M=64, BLOCK_D=64, num_warps=4, num_stages=3),
    interpret_meta=dict(BLOCK_M=16, BLOCK_D=32, num_warps=4, num_stages=1))
_ll.register_launch_kernel(
    "multi_finish", _multi_finish_kernel, tiles=("S_BLOCK", "BLOCK"), free_scalars=0,
    fixed_meta=dict(S_BLOCK=8, BLOCK=512, num_warps=4, num_stages=1),
    interpret_meta=dict(S_BLOCK=4, BLOCK=128, num_warps=4, num_stages=1))

# Column pass: problems up to this many elements (M * (in + out)) reduce each group's rows in one
# program per column tile and store final gradients; larger ones cut groups into chunks of a
# multiple of _SPLIT_ROWS rows (fp32 partials + one finishing launch). Tests lower both.
_COLPASS_ONE_ITEM_MAX = 1 << 22
_SPLIT_ROWS = 128


# ----------------------------------------------------------------------------------------------
# Validation and the reference
# ----------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def offsets_from_sizes(sizes: Sequence[int]) -> List[int]:
    """Row boundaries [0, n_0, n_0 + n_1, ...] of groups with `sizes` rows each, in order."""
    out = [0]
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"offsets_from_sizes: sizes[{i}] must be a non-negative integer, got {n!r}")
        out.append(out[-1] + int(n))
    return out


def check_multi_lora_args(x, weight, lora_as, lora_bs, scalings, offsets, bias=None,
                          name: str = "multi_lora_linear") -> Tuple[List[int], List[float]]:
    """Raise ValueError naming the argument at fault; return (offsets, scalings) as Python lists."""
    for arg, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have shape [..., in_features], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must have shape [out_features, in_features], got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: x.shape[-1] must equal weight.shape[1] (in_features={in_features}), "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name}: bias must have shape [out_features={out_features}] or be None, "
                         f"got {tuple(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(lora_as, torch.Tensor) or not isinstance(lora_as, (list, tuple)):
        raise ValueError(f"{name}: lora_as must be a list of G tensors [r_g, in_features], "
                         f"got {type(lora_as).__name__}")
    if isinstance(lora_bs, torch.Tensor) or not isinstance(lora_bs, (list, tuple)):
        raise ValueError(f"{name}: lora_bs must be a list of G tensors [out_features, r_g], "
                         f"got {type(lora_bs).__name__}")
    G = len(lora_as)
    if G == 0:
        raise ValueError(f"{name}: lora_as must hold at least one adapter, got an empty list")
    if len(lora_bs) != G:
        raise ValueError(f"{name}: lora_bs must hold one tensor per adapter (G={G}, the length of lora_as), "
                         f"got {len(lora_bs)}")
    named = {"x": x, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    for g, (a, b) in enumerate(zip(lora_as, lora_bs)):
        for arg, t in ((f"lora_as[{g}]", a), (f"lora_bs[{g}]", b)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if a.dim() != 2 or a.shape[1] != in_features:
            raise ValueError(f"{name}: lora_as[{g}] must have shape [rank, in_features={in_features}], "
                             f"got {tuple(a.shape)}")
        rank = a.shape[0]
        if rank < 1:
            raise ValueError(f"{name}: lora_as[{g}] has rank 0 (shape {tuple(a.shape)}); every adapter "
                             "needs rank >= 1 (give rows without an adapter a group with a zero lora_bs)")
        if b.dim() != 2 or tuple(b.shape) != (out_features, rank):
            raise ValueError(f"{name}: lora_bs[{g}] must have shape [out_features={out_features}, "
                             f"rank={rank}] (rank from lora_as[{g}]), got {tuple(b.shape)}")
        named[f"lora_as[{g}]"] = a
        named[f"lora_bs[{g}]"] = b
    for arg, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: {arg}.dtype must equal x.dtype ({x.dtype}), got {t.dtype}; "
                             "cast the adapters and base weights to one dtype first")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} must be on x's device ({x.device}), got {t.device}")
    scal = _normalize_scalings(scalings, G, name)
    offs = _normalize_offsets(offsets, G, _rows(x), name)
    return offs, scal


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _normalize_scalings(scalings, G: int, name: str) -> List[float]:
    if isinstance(scalings, torch.Tensor):
        if scalings.dim() > 1:
            raise ValueError(f"{name}: scalings must be a number or G={G} numbers, got a tensor of shape "
                             f"{tuple(scalings.shape)}")
        scalings = scalings.tolist()
    if isinstance(scalings, numbers.Real) and not isinstance(scalings, bool):
        values = [scalings] * G
    elif isinstance(scalings, (list, tuple)):
        if len(scalings) != G:
            raise ValueError(f"{name}: scalings must hold one number per adapter (G={G}), got {len(scalings)}")
        values = list(scalings)
    else:
        raise ValueError(f"{name}: scalings must be a number or a list of G={G} numbers (lora_alpha / r_g), "
                         f"got {type(scalings).__name__}")
    for g, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"{name}: scalings[{g}] must be a finite number (lora_alpha / r_g), got {s!r}")
    return [float(s) for s in values]


def _normalize_offsets(offsets, G: int, M: int, name: str) -> List[int]:
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.dtype.is_floating_point or offsets.dtype.is_complex \
                or offsets.dtype == torch.bool:
            raise ValueError(f"{name}: offsets must be a 1-D integer tensor or list of G+1={G + 1} row "
                             f"boundaries, got a {offsets.dtype} tensor of shape {tuple(offsets.shape)}")
        offsets = offsets.tolist()  # a device sync for CUDA offsets: pass a list to avoid it
    if not isinstance(offsets, (list, tuple)):
        raise ValueError(f"{name}: offsets must be a list (or 1-D integer tensor) of G+1={G + 1} row "
                         f"boundaries, got {type(offsets).__name__}")
    if len(offsets) != G + 1:
        raise ValueError(f"{name}: offsets must hold G+1={G + 1} row boundaries (one more than the "
                         f"number of adapters), got {len(offsets)}")
    for i, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, numbers.Integral):
            raise ValueError(f"{name}: offsets[{i}] must be an integer, got {o!r}")
    offs = [int(o) for o in offsets]
    if offs[0] != 0 or offs[-1] != M:
        raise ValueError(f"{name}: offsets must start at 0 and end at the number of rows of x "
                         f"(M={M}, the product of x.shape[:-1]), got offsets[0]={offs[0]}, offsets[-1]={offs[-1]}")
    for g in range(G):
        if offs[g + 1] < offs[g]:
            raise ValueError(f"{name}: offsets must be non-decreasing (group g holds rows offsets[g] to "
                             f"offsets[g+1]-1), got offsets[{g}]={offs[g]} > offsets[{g + 1}]={offs[g + 1]}")
    return offs


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Scalings,
    offsets: Offsets,
    bias: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain torch: `lora_linear_reference` on each group's rows, concatenated (autograd gives the
    backward). The CPU path of `multi_lora_linear` and the oracle of the Triton kernels.
    `dropout_mask`: the scaled keep mask (0 or 1/(1-p)) of x's shape for the adapters' branch, e.g.
    `dropout_mask(x.shape, p, seed)` to replay what the kernels drew."""
    offs, scal = check_multi_lora_args(x, weight, lora_as, lora_bs, scalings, offsets, bias,
                                       name="multi_lora_linear_reference")
    if dropout_mask is not None and tuple(dropout_mask.shape) != tuple(x.shape):
        raise ValueError(f"multi_lora_linear_reference: dropout_mask must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(dropout_mask.shape)}")
    return _reference(x, weight, lora_as, lora_bs, scal, offs, bias, dropout_mask)


def _reference(x, weight, lora_as, lora_bs, scal: List[float], offs: List[int], bias, mask=None):
    """multi_lora_linear_reference on arguments already checked (scalings and offsets as lists):
    the entry points validate once, not again on the way to it."""
    out_features, in_features = weight.shape
    x2d = x.reshape(-1, in_features)
    mask2d = mask.reshape(-1, in_features) if mask is not None else None
    parts = [lora_linear_reference(x2d[offs[g]:offs[g + 1]], weight, a, b, scal[g], bias,
                                   mask2d[offs[g]:offs[g + 1]] if mask2d is not None else None)
             for g, (a, b) in enumerate(zip(lora_as, lora_bs))]
    return torch.cat(parts, 0).reshape(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------


class _Plan:
    """Host-side description of a call: group sizes, ranks, flat-buffer offsets, backward work
    items, and their device copies (the int64 table and the float32 scalings)."""

    def __init__(self, offsets, ranks, scalings, in_features, out_features, device):
        G = len(ranks)
        M = offsets[-1]
        self.G, self.M = G, M
        self.offsets, self.ranks, self.scalings = offsets, ranks, scalings
        self.a_off, self.b_off = [], []
        a = b = 0
        for r in ranks:
            self.a_off.append(a)
            self.b_off.append(b)
            a += r * in_features
            b += out_features * r
        self.a_numel, self.b_numel = a, b
        self.r_max = max(ranks)
        self.r_pad = _ll._rank_pad(self.r_max)
        # Backward work items: one per group on small problems, else chunks of a group's rows
        # sized so that about four programs per SM are busy (128-wide column tiles, both tasks).
        if M * (in_features + out_features) <= _COLPASS_ONE_ITEM_MAX:
            chunk = max(M, 1)
        else:
            d_tiles = _ll._cdiv(in_features, 128) + _ll._cdiv(out_features, 128)
            target = max(1, _ll._cdiv(4 * _ll._num_sms(device.index), d_tiles))
            chunk = max(_SPLIT_ROWS, _ll._cdiv(_ll._cdiv(M, target), _SPLIT_ROWS) * _SPLIT_ROWS)
        item_g, item_lo, item_hi, item_first = [], [], [], [0]
        for g in range(G):
            lo, hi = offsets[g], offsets[g + 1]
            n = max(1, _ll._cdiv(hi - lo, chunk))  # an empty group still gets one (zero) item
            for i in range(n):
                item_g.append(g)
                item_lo.append(min(lo + i * chunk, hi))
                item_hi.append(min(lo + (i + 1) * chunk, hi))
            item_first.append(len(item_g))
        self.n_items = len(item_g)
        self.partial = self.n_items > G
        table = offsets + ranks + self.a_off + self.b_off + item_g + item_lo + item_hi + item_first
        self.table = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        self.scal = torch.tensor(scalings, dtype=torch.float32).to(device, non_blocking=True)


def _launch_multi_rowpass(inp, proj_flat, l, out, up_flat, bias, plan, *, backward, store_l, epilogue,
                          p=0.0, seed=0, in_dropout=False, out_dropout=False):
    M, K = inp.shape
    N = out.shape[1] if out is not None else 0
    upcast, precision = _ll._dot_flags(inp.dtype)
    dummy = inp
    s_lm, s_lr = l.stride() if l is not None else (0, 0)
    s_om, s_on = out.stride() if out is not None else (0, 0)
    seed, p, drop_scale = _ll._dropout_args(p, seed)
    _ll._launch(
        "multi_rowpass", lambda meta: (_ll._cdiv(M, meta["BLOCK_M"]),),
        (inp, proj_flat, l if l is not None else dummy, out if out is not None else dummy,
         up_flat if up_flat is not None else dummy, bias if bias is not None else dummy, plan.table, plan.scal),
        (seed, p, drop_scale, M, K, N, plan.G, *inp.stride(), s_lm, s_lr, s_om, s_on,
         bias.stride(0) if bias is not None else 0),
        (backward, store_l, epilogue, bias is not None, in_dropout and p > 0.0, out_dropout and p > 0.0,
         plan.r_pad, upcast, precision),
    )


def _launch_multi_colpass(x2d, dyb, dy, xa, plan, *, need_a, need_b, need_bias, bias_dtype, p=0.0, seed=0):
    """Flat dA (the dA_g [r_g, in] back to back), flat dB (the dB_g [out, r_g]) and dbias [out],
    each None unless asked for. dA takes x through the forward's dropout mask (p, seed)."""
    M, DA = x2d.shape
    DB = dy.shape[1]
    dtype, device = x2d.dtype, x2d.device
    task_b = need_b or need_bias
    partial = plan.partial
    cs_partial = need_bias and plan.n_items > 1
    da = torch.empty(plan.a_numel, device=device, dtype=dtype) if need_a else None
    db = torch.empty(plan.b_numel, device=device, dtype=dtype) if need_b else None
    dbias = torch.empty((DB,), device=device, dtype=bias_dtype) if need_bias else None
    f32 = torch.float32
    ga = torch.empty((plan.n_items, plan.r_max, DA), device=device, dtype=f32) if need_a and partial else da
    gb = torch.empty((plan.n_items, plan.r_max, DB), device=device, dtype=f32) if need_b and partial else db
    cs = torch.empty((plan.n_items, DB), device=device, dtype=f32) if cs_partial else dbias
    dummy = x2d if need_a else dy
    upcast, precision = _ll._dot_flags(dtype)
    n_tasks = int(need_a) + int(task_b)
    dmax = max(DA if need_a else 0, DB if task_b else 0)
    _ll._launch(
        "multi_colpass", lambda meta: (_ll._cdiv(dmax, meta["BLOCK_D"]), plan.n_items, n_tasks),
        (x2d if need_a else dummy, dyb if need_a else dummy, ga if need_a else dummy,
         dy if task_b else dummy, xa if need_b else dummy, gb if need_b else dummy,
         cs if need_bias else dummy, plan.table, plan.scal),
        (*_ll._dropout_args(p, seed), plan.G, plan.n_items, DA, DB,
         *(x2d.stride() if need_a else (0, 0)), *(dyb.stride() if need_a else (0, 0)),
         *(dy.stride() if task_b else (0, 0)), *(xa.stride() if need_b else (0, 0)),
         plan.r_max * DA if need_a and partial else 0, plan.r_max * DB if need_b and partial else 0,
         DB if cs_partial else 0),
        (need_a, need_b, need_bias, partial, cs_partial, need_a and p > 0.0, plan.r_pad, upcast, precision),
    )
    fin_a, fin_b = need_a and partial, need_b and partial
    if fin_a or fin_b or cs_partial:
        n_max = max(plan.r_max * DA if fin_a else 0, plan.r_max * DB if fin_b else 0, DB if cs_partial else 0)
        _ll._launch(
            "multi_finish", lambda meta: (_ll._cdiv(n_max, meta["BLOCK"]), plan.G, 3),
            (ga if fin_a else dummy, gb if fin_b else dummy, cs if cs_partial else dummy,
             da if fin_a else dummy, db if fin_b else dummy, dbias if cs_partial else dummy, plan.table),
            (plan.G, plan.n_items, DA, DB, plan.r_max * DA, plan.r_max * DB, DB),
            (fin_a, fin_b, cs_partial),
        )
    return da, db, dbias


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # One copy for all adapters (torch.cat of flattened views); each A_g / B_g keeps its own
    # contiguous [r_g, D] layout inside, so the kernels read them without rank padding.
    return torch.cat([t.reshape(-1) for t in tensors])


class MultiLoRALinearFunction(torch.autograd.Function):
    """Triton forward and backward of the multi-adapter LoRA linear. Inputs: x, weight, bias (or
    None), the _Plan, the dropout probability and seed, then the G lora_as followed by the G
    lora_bs. Validated by the callers."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, dropout_p, seed, *adapters):
        G = plan.G
        lora_as, lora_bs = adapters[:G], adapters[G:]
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        M = x2d.shape[0]
        a_flat, b_flat = _flatten(lora_as), _flatten(lora_bs)
        xa = torch.empty((M, plan.r_max), device=x.device, dtype=x.dtype)
        y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
        # One launch writes xa and every group's low-rank term (+ bias); cuBLAS adds x @ W.T.
        _launch_multi_rowpass(x2d, a_flat, xa, y, b_flat, bias, plan, backward=False, store_l=True, epilogue=True,
                              p=dropout_p, seed=seed, in_dropout=True)
        y.addmm_(x2d, weight.t())
        ctx.save_for_backward(x2d, weight, a_flat, b_flat, xa)
        ctx.plan = plan
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, a_flat, b_flat, xa = ctx.saved_tensors
        plan = ctx.plan
        G = plan.G
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        need_as = ctx.needs_input_grad[6:6 + G]
        need_bs = ctx.needs_input_grad[6 + G:6 + 2 * G]
        p, seed = ctx.dropout_p, ctx.seed
        need_a, need_b = any(need_as), any(need_bs)
        out_features, in_features = weight.shape
        dy = grad_out.reshape(-1, out_features)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        M = dy.shape[0]
        dx = dw = dbias = None
        dyb = torch.empty((M, plan.r_max), device=dy.device, dtype=dy.dtype) if need_a else None
        if need_x:
            # dY @ B_g (kept for dA) and s_g * (dY @ B_g) @ A_g in one launch, then cuBLAS adds dY @ W.
            dx = torch.empty((M, in_features), device=dy.device, dtype=dy.dtype)
            _launch_multi_rowpass(dy, b_flat, dyb, dx, a_flat, None, plan, backward=True, store_l=need_a,
                                  epilogue=True, p=p, seed=seed, out_dropout=True)
            dx.addmm_(dy, weight)
            dx = dx.view(ctx.x_shape)
        elif need_a:
            _launch_multi_rowpass(dy, b_flat, dyb, None, None, None, plan, backward=True, store_l=True,
                                  epilogue=False)
        da = db = None
        if need_a or need_b or need_bias:
            da, db, dbias = _launch_multi_colpass(x2d, dyb, dy, xa, plan, need_a=need_a, need_b=need_b,
                                                  need_bias=need_bias, bias_dtype=ctx.bias_dtype, p=p, seed=seed)
        if need_w:
            dw = (dy.t() @ x2d).to(weight.dtype)
        das = [da[plan.a_off[g]:plan.a_off[g] + plan.ranks[g] * in_features].view(plan.ranks[g], in_features)
               if need_as[g] else None for g in range(G)]
        dbs = [db[plan.b_off[g]:plan.b_off[g] + out_features * plan.ranks[g]].view(out_features, plan.ranks[g])
               if need_bs[g] else None for g in range(G)]
        return (dx, dw, dbias, None, None, None, *das, *dbs)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def multi_lora_linear_backend(x: torch.Tensor, lora_as: Sequence[torch.Tensor]) -> str:
    """Which implementation `multi_lora_linear` uses: "triton" (CUDA tensors, every rank <= 256,
    fp32/fp16/bf16) or "reference" (plain torch per group)."""
    if not x.is_cuda or _TRITON_IMPORT_ERROR is not None or x.dtype not in _KERNEL_DTYPES \
            or max(a.shape[0] for a in lora_as) > MAX_TRITON_RANK:
        return "reference"
    return "triton"


def multi_lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Scalings,
    offsets: Offsets,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """The Triton path of `multi_lora_linear`, whatever the device: CUDA tensors, or CPU tensors
    when TRITON_INTERPRET=1 (how CI tests the kernels). `seed` fixes the dropout mask (replay it
    with `dropout_mask(x.shape, dropout_p, seed)`)."""
    _ll._require_triton()
    offs, scal = check_multi_lora_args(x, weight, lora_as, lora_bs, scalings, offsets, bias,
                                       name="multi_lora_linear_triton")
    p = check_dropout_p(dropout_p, "multi_lora_linear_triton")
    if x.device.type != "cuda" and not (_ll._INTERPRETED and _ll._interpreting()):
        raise ValueError(
            f"multi_lora_linear_triton: x is on {x.device}, the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them in the interpreter); use multi_lora_linear for CPU tensors")
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"multi_lora_linear_triton: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    for g, a in enumerate(lora_as):
        if a.shape[0] > MAX_TRITON_RANK:
            raise ValueError(f"multi_lora_linear_triton: lora_as[{g}] has rank {a.shape[0]}, the kernels take "
                             f"at most {MAX_TRITON_RANK}; use multi_lora_linear, which falls back to the reference")
    return _run_triton(x, weight, lora_as, lora_bs, scal, offs, bias, p if training else 0.0, seed)


def _run_triton(x, weight, lora_as, lora_bs, scal, offs, bias, p=0.0, seed=None):
    if x.numel() == 0:
        return _reference(x, weight, lora_as, lora_bs, scal, offs, bias)
    out_features, in_features = weight.shape
    plan = _Plan(offs, [a.shape[0] for a in lora_as], scal, in_features, out_features, x.device)
    if seed is None:
        seed = _ll.draw_seed() if p > 0.0 else 0
    args = (x, weight, bias, plan, float(p), int(seed), *lora_as, *lora_bs)
    if x.is_cuda and x.get_device() != _ll._current_device():
        with torch.cuda.device(x.device):
            return MultiLoRALinearFunction.apply(*args)
    return MultiLoRALinearFunction.apply(*args)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Scalings,
    offsets: Offsets,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """y = x @ weight.T + bias + scalings[g] * (dropout(x_g) @ lora_as[g].T) @ lora_bs[g].T for the
    rows x_g = x[offsets[g]:offsets[g+1]] of each adapter g (x flattened to [M, in]); dropout on
    the adapters' branch only, while `training`.

    CUDA tensors run the Triton kernels (one launch for all adapters forward, see the module
    docstring), with lora_linear's seeded dropout mask; CPU tensors, float64 and ranks above 256
    run `multi_lora_linear_reference`, with dropout drawn by torch.bernoulli.
    `multi_lora_linear_backend` tells which one serves a call. `offsets` may be a list or a 1-D
    integer tensor (a CUDA tensor costs a device sync: it is read on the host)."""
    offs, scal = check_multi_lora_args(x, weight, lora_as, lora_bs, scalings, offsets, bias)
    p = check_dropout_p(dropout_p, "multi_lora_linear")
    if not training:
        p = 0.0
    backend = multi_lora_linear_backend(x, lora_as)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("multi_lora_linear: %s backend for x %s %s on %s, ranks %s", backend, tuple(x.shape),
                     x.dtype, x.device, [a.shape[0] for a in lora_as])
    if backend == "triton":
        return _run_triton(x, weight, lora_as, lora_bs, scal, offs, bias, p)
    mask = torch.empty_like(x).bernoulli_(1.0 - p) / (1.0 - p) if p > 0.0 else None
    return _reference(x, weight, lora_as, lora_bs, scal, offs, bias, mask)
