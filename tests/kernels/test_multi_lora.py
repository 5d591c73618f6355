"""Batched multi-adapter LoRA linear (splitlora_kernels.ops.multi_lora) against its reference.

Without CUDA the Triton path runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on shapes of a few dozen rows that still span several row blocks (16 rows in
the interpreter), with groups that start and end inside blocks. Tests marked gpu repeat the
comparisons with compiled kernels on CUDA at larger shapes.

Oracle: multi_lora_linear_reference (lora_linear_reference per group, concatenated) evaluated in
float64 on the very same (already rounded) inputs. Tolerance, as for lora_linear: max |fused -
oracle| <= tol * max |oracle| per output, tol 2 x machine epsilon for fp16 / bf16 (the output
and the rank-r intermediates x @ A_g.T and dY @ B_g are each rounded once to the input dtype)
and 2e-5 for fp32. Gradients of an adapter whose group is empty must be exactly zero.
"""
import importlib
import math

import pytest
import torch

from splitlora_kernels.ops import (
    lora_linear_reference,
    lora_linear_triton,
    multi_lora_linear,
    multi_lora_linear_backend,
    multi_lora_linear_reference,
    multi_lora_linear_triton,
    offsets_from_sizes,
)

ml = importlib.import_module("splitlora_kernels.ops.multi_lora")
ll = importlib.import_module("splitlora_kernels.ops.lora_linear")

TOL = {
    torch.float32: 2e-5,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# Ranks {1, 4, 16, 33} (33 pads to 64 in registers) and an empty group between others.
SIZES = [13, 0, 21, 7, 9]
RANKS = [1, 4, 16, 33, 4]
SCALINGS = [2.0, 0.5, 1.0, 1.5, 0.25]


def make_inputs(sizes, ranks, k, n, dtype, device=CPU, *, lead=None, bias=True, x_grad=True, bias_grad=True,
                weight_grad=False, weight_transposed=False, x_noncontiguous=False, seed=0):
    """(x, weight, lora_as, lora_bs, bias, offsets) with random values of moderate magnitude
    (lora_bs random, not PEFT's zero init, so every term of y contributes)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    offsets = offsets_from_sizes(sizes)
    shape = tuple(lead) if lead is not None else (offsets[-1],)
    assert math.prod(shape) == offsets[-1]
    if x_noncontiguous:
        x = rnd(*shape, 2 * k)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = rnd(*shape, k)
    weight = rnd(k, n, scale=1 / math.sqrt(k)).t() if weight_transposed else rnd(n, k, scale=1 / math.sqrt(k))
    lora_as = [rnd(r, k, scale=1 / math.sqrt(k)).requires_grad_() for r in ranks]
    lora_bs = [rnd(n, r, scale=1 / math.sqrt(r)).requires_grad_() for r in ranks]
    b = rnd(n).requires_grad_(bias_grad) if bias else None
    x.requires_grad_(x_grad)
    weight.requires_grad_(weight_grad)
    return x, weight, lora_as, lora_bs, b, offsets


def flat(x, weight, lora_as, lora_bs, bias):
    return [x, weight, *lora_as, *lora_bs, bias]


def grad_inputs(tensors):
    return [t for t in tensors if t is not None and t.requires_grad]


def assert_close_scaled(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert scale > 0, f"{what}: the oracle is all zeros, the comparison would prove nothing"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x max|ref| ({scale:.3e})"


def check_against_reference(inputs, scalings, device=CPU, *, dropout_p=0.0, seed=None):
    """With dropout_p > 0 the reference replays the kernels' mask (`dropout_mask` of `seed`)."""
    x, weight, lora_as, lora_bs, bias, offsets = inputs
    G = len(lora_as)
    y = multi_lora_linear_triton(x, weight, lora_as, lora_bs, scalings, offsets, bias, dropout_p=dropout_p, seed=seed)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(y.dtype).to(device)
    tensors = flat(x, weight, lora_as, lora_bs, bias)
    grads = torch.autograd.grad(y, grad_inputs(tensors), grad_out)

    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    x64, w64, a64, b64, bias64 = t64[0], t64[1], t64[2:2 + G], t64[2 + G:2 + 2 * G], t64[-1]
    mask = ll.dropout_mask(x.shape, dropout_p, seed, device=device).double() if dropout_p > 0 else None
    y_ref = multi_lora_linear_reference(x64, w64, a64, b64, scalings, offsets, bias64, dropout_mask=mask)
    grads_ref = torch.autograd.grad(y_ref, grad_inputs(t64), grad_out.double())

    assert_close_scaled(y, y_ref, x.dtype, "y")
    names = ["dx", "dW"] + [f"dA[{g}]" for g in range(G)] + [f"dB[{g}]" for g in range(G)] + ["dbias"]
    empty = {g for g in range(G) if offsets[g] == offsets[g + 1]}
    names = [name for name, t in zip(names, tensors) if t is not None and t.requires_grad]
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, g_ref, t in zip(names, grads, grads_ref, grad_inputs(tensors)):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        if name[:2] in ("dA", "dB") and int(name[3:-1]) in empty:
            assert torch.count_nonzero(g) == 0, f"{name}: an empty group's gradient must be zero"
        else:
            assert_close_scaled(g, g_ref, x.dtype, name)


# ---------------------------------------------------------------------------------------------
# Triton path in the interpreter (CPU tensors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grads_match_reference(dtype):
    check_against_reference(make_inputs(SIZES, RANKS, 40, 36, dtype), SCALINGS)


@pytest.fixture
def large_problem_kernels(monkeypatch):
    # Small shapes reduce each group in one work item; force what large problems run: groups cut
    # into chunks (4 rows here, so a group spans several items) with fp32 partials summed per
    # group by the finishing kernel.
    monkeypatch.setattr(ml, "_COLPASS_ONE_ITEM_MAX", 0)
    monkeypatch.setattr(ml, "_SPLIT_ROWS", 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_problem_kernels(large_problem_kernels, dtype):
    inputs = make_inputs(SIZES, RANKS, 40, 36, dtype)
    plan = ml._Plan(inputs[-1], RANKS, SCALINGS, 40, 36, CPU)
    assert plan.partial and plan.n_items > len(RANKS)
    check_against_reference(inputs, SCALINGS)
    # Only dA and dbias (frozen lora_bs); only dB, no bias, no dX.
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([9, 14], [3, 17], 24, 20, dtype, seed=1)
    for b in lora_bs:
        b.requires_grad_(False)
    check_against_reference((x, weight, lora_as, lora_bs, bias, offsets), [1.0, 2.0])
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([9, 14], [3, 17], 24, 20, dtype, bias=False,
                                                             x_grad=False, seed=2)
    for a in lora_as:
        a.requires_grad_(False)
    check_against_reference((x, weight, lora_as, lora_bs, bias, offsets), [1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_replayed_mask(dtype):
    # The forward row pass, the dX epilogue and dA's column pass must all use the one mask of the
    # whole flattened x (groups start mid-block, so a per-group mask would show).
    check_against_reference(make_inputs(SIZES, RANKS, 40, 36, dtype), SCALINGS, dropout_p=0.3, seed=1234)


def test_dropout_in_the_large_problem_kernels(large_problem_kernels):
    # Column-pass work items start mid-group (4-row chunks): dA's mask must still be x's own rows.
    check_against_reference(make_inputs(SIZES, RANKS, 40, 36, torch.float32), SCALINGS, dropout_p=0.25, seed=7)


def test_dropout_draws_a_mask_and_none_in_eval():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([30, 34], [4, 8], 32, 24, torch.float32)
    base = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [1.0, 2.0], offsets, bias)
    dropped = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [1.0, 2.0], offsets, bias, dropout_p=0.5,
                                       seed=3)
    again = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [1.0, 2.0], offsets, bias, dropout_p=0.5,
                                     seed=3)
    evaluated = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [1.0, 2.0], offsets, bias, dropout_p=0.5,
                                         training=False, seed=3)
    assert torch.equal(dropped, again)  # the seed fixes the mask
    assert torch.equal(evaluated, base)  # no dropout outside training
    assert (dropped - base).abs().max() > 1e-3  # and a real one inside
    keep = (ll.dropout_mask(x.shape, 0.5, 3, device=CPU) > 0).float().mean().item()
    assert 0.4 < keep < 0.6


def test_cpu_path_dropout():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([6, 10], [2, 3], 16, 12, torch.float32, x_grad=False)
    ref = multi_lora_linear_reference(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias)
    assert torch.equal(multi_lora_linear(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias, dropout_p=0.5,
                                         training=False), ref)
    torch.manual_seed(0)
    y = multi_lora_linear(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias, dropout_p=0.5)
    torch.manual_seed(0)
    mask = torch.empty_like(x).bernoulli_(0.5) / 0.5
    expected = multi_lora_linear_reference(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias, dropout_mask=mask)
    assert torch.equal(y, expected)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        multi_lora_linear(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_mask must have x's shape"):
        multi_lora_linear_reference(x, weight, lora_as, lora_bs, [1.0, 1.0], offsets, bias, dropout_mask=mask[:3])


def test_many_small_groups_straddle_row_blocks():
    # 70 groups (more than the kernel's 64-wide scan of the offsets) of 0..3 rows: most row blocks
    # hold several groups, some of them empty.
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(0, 4, (70,), generator=gen).tolist()
    ranks = torch.randint(1, 9, (70,), generator=gen).tolist()
    scalings = (torch.rand(70, generator=gen) + 0.5).tolist()
    check_against_reference(make_inputs(sizes, ranks, 20, 12, torch.float32), scalings)


def test_leading_dims_noncontiguous_x_transposed_weight_and_weight_grad():
    inputs = make_inputs([10, 4, 0, 14], [2, 33, 1, 8], 24, 20, torch.float32, lead=(2, 14),
                         x_noncontiguous=True, weight_transposed=True, weight_grad=True)
    check_against_reference(inputs, 1.5)


def test_frozen_input_bias_and_some_adapters():
    # First adapted layer after a frozen embedding (no dX), a frozen bias, and adapters of which
    # only some train: the others get no gradient, the rest still match.
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([11, 6, 15], [4, 1, 16], 24, 20, torch.float16,
                                                             x_grad=False, bias_grad=False)
    lora_as[1].requires_grad_(False)
    lora_bs[2].requires_grad_(False)
    check_against_reference((x, weight, lora_as, lora_bs, bias, offsets), [2.0, 1.0, 0.5])


def test_frozen_adapters_give_only_dx():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([12, 9], [4, 33], 24, 20, torch.float32, bias=False)
    for t in lora_as + lora_bs:
        t.requires_grad_(False)
    check_against_reference((x, weight, lora_as, lora_bs, bias, offsets), [1.0, 2.0])


def test_single_group_equals_lora_linear():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([37], [5], 40, 36, torch.float32)
    y = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [2.0], offsets, bias)
    y1 = lora_linear_triton(x, weight, lora_as[0], lora_bs[0], 2.0, bias)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad(y, [x, lora_as[0], lora_bs[0], bias], go)
    g1 = torch.autograd.grad(y1, [x, lora_as[0], lora_bs[0], bias], go)
    # Same arithmetic; only the order of fp32 accumulations differs (other tile sizes), so
    # agreement to 1e-6 of the largest magnitude.
    for a, b, name in zip((y, *g), (y1, *g1), ["y", "dx", "dA", "dB", "dbias"]):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-6 * scale, f"{name}: {err:.2e} > 1e-6 x {scale:.2e}"


def test_all_rows_in_one_group_of_many():
    # Every other group empty: the full batch belongs to the last adapter.
    inputs = make_inputs([0, 0, 19], [4, 16, 3], 24, 20, torch.float32)
    check_against_reference(inputs, [1.0, 1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Reference, dispatch and argument forms
# ---------------------------------------------------------------------------------------------


def test_reference_is_lora_linear_reference_per_group():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs(SIZES, RANKS, 20, 12, torch.float32, lead=(2, 25))
    y = multi_lora_linear_reference(x, weight, lora_as, lora_bs, SCALINGS, offsets, bias)
    x2d = x.reshape(-1, 20)
    parts = [lora_linear_reference(x2d[offsets[g]:offsets[g + 1]], weight, a, b, SCALINGS[g], bias)
             for g, (a, b) in enumerate(zip(lora_as, lora_bs))]
    assert torch.equal(y, torch.cat(parts).reshape(2, 25, 12))


def test_reference_gradcheck_float64():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([3, 0, 2], [2, 1, 3], 5, 4, torch.float64)
    weight.requires_grad_(True)

    def fn(x, weight, bias, *ab):
        return multi_lora_linear_reference(x, weight, list(ab[:3]), list(ab[3:]), [1.5, 2.0, 0.5], offsets, bias)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, *lora_as, *lora_bs))


def test_cpu_dispatch_uses_reference():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs(SIZES, RANKS, 20, 12, torch.float32)
    assert multi_lora_linear_backend(x, lora_as) == "reference"
    y = multi_lora_linear(x, weight, lora_as, lora_bs, SCALINGS, offsets, bias)
    assert torch.equal(y, multi_lora_linear_reference(x, weight, lora_as, lora_bs, SCALINGS, offsets, bias))
    # The reference takes ranks above the kernels' 256 and float64.
    big = make_inputs([3, 2], [300, 2], 8, 6, torch.float64)
    assert multi_lora_linear(*big[:4], 1.0, big[5], big[4]).shape == (5, 6)


def test_scalings_and_offsets_forms():
    # One number for all adapters, a tensor of G numbers, offsets as a tensor: same result.
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([9, 0, 12], [3, 1, 6], 24, 20, torch.float32)
    y = multi_lora_linear_triton(x, weight, lora_as, lora_bs, 2.0, torch.tensor(offsets), bias)
    y_list = multi_lora_linear_triton(x, weight, lora_as, lora_bs, [2.0] * 3, offsets, bias)
    y_tensor = multi_lora_linear_triton(x, weight, lora_as, lora_bs, torch.full((3,), 2.0), tuple(offsets), bias)
    assert torch.equal(y, y_list) and torch.equal(y, y_tensor)
    ref = multi_lora_linear_reference(x, weight, lora_as, lora_bs, 2.0, offsets, bias)
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5)


def test_no_rows():
    x, weight, lora_as, lora_bs, bias, _ = make_inputs([0, 0], [2, 3], 8, 6, torch.float32, lead=(0,))
    y = multi_lora_linear_triton(x, weight, lora_as, lora_bs, 1.0, [0, 0, 0], bias)
    assert y.shape == (0, 6)


def test_offsets_from_sizes():
    assert offsets_from_sizes([3, 0, 5]) == [0, 3, 3, 8]
    assert offsets_from_sizes([]) == [0]
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        offsets_from_sizes([2, -1])


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _valid():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([3, 2, 1], [2, 1, 4], 6, 5, torch.float32,
                                                             x_grad=False)
    return dict(x=x, weight=weight, lora_as=lora_as, lora_bs=lora_bs, bias=bias, offsets=offsets,
                scalings=[1.0, 2.0, 0.5])


def _replace(seq, i, value):
    seq = list(seq)
    seq[i] = value
    return seq


BAD_INPUTS = {
    "offsets_not_monotone": (lambda v: v.update(offsets=[0, 4, 3, 6]), r"non-decreasing.*offsets\[1\]=4"),
    "offsets_start": (lambda v: v.update(offsets=[1, 3, 5, 6]), r"start at 0.*offsets\[0\]=1"),
    "offsets_short_of_m": (lambda v: v.update(offsets=[0, 3, 5, 5]), r"M=6.*offsets\[-1\]=5"),
    "offsets_past_m": (lambda v: v.update(offsets=[0, 3, 5, 7]), r"M=6.*offsets\[-1\]=7"),
    "offsets_length": (lambda v: v.update(offsets=[0, 3, 6]), r"offsets must hold G\+1=4"),
    "offsets_float": (lambda v: v.update(offsets=[0, 3.0, 5, 6]), r"offsets\[1\] must be an integer"),
    "offsets_float_tensor": (lambda v: v.update(offsets=torch.tensor([0.0, 3, 5, 6])), "integer tensor"),
    "offsets_type": (lambda v: v.update(offsets="0,3,5,6"), "offsets must be a list"),
    "rank_mismatch": (lambda v: v.update(lora_bs=_replace(v["lora_bs"], 1, torch.randn(5, 3))),
                      r"lora_bs\[1\] must have shape \[out_features=5, rank=1\]"),
    "lora_a_in_features": (lambda v: v.update(lora_as=_replace(v["lora_as"], 2, torch.randn(4, 7))),
                           r"lora_as\[2\] must have shape \[rank, in_features=6\]"),
    "rank_zero": (lambda v: v.update(lora_as=_replace(v["lora_as"], 0, torch.randn(0, 6)),
                                     lora_bs=_replace(v["lora_bs"], 0, torch.randn(5, 0))), r"lora_as\[0\] has rank 0"),
    "count_mismatch": (lambda v: v.update(lora_bs=v["lora_bs"][:2]), "one tensor per adapter"),
    "no_adapters": (lambda v: v.update(lora_as=[], lora_bs=[], scalings=[], offsets=[0, 6]), "at least one adapter"),
    "lora_as_tensor": (lambda v: v.update(lora_as=torch.randn(3, 2, 6)), "lora_as must be a list"),
    "not_a_tensor": (lambda v: v.update(lora_as=_replace(v["lora_as"], 1, [[1.0] * 6])),
                     r"lora_as\[1\] must be a torch.Tensor"),
    "dtype_mix": (lambda v: v.update(lora_bs=_replace(v["lora_bs"], 2, v["lora_bs"][2].detach().half())),
                  r"lora_bs\[2\].dtype must equal x.dtype"),
    "weight_dtype": (lambda v: v.update(weight=v["weight"].double()), r"weight.dtype must equal x.dtype"),
    "int_dtype": (lambda v: v.update(x=v["x"].long()), "x.dtype must be"),
    "device_mix": (lambda v: v.update(lora_as=_replace(v["lora_as"], 0, torch.empty(2, 6, device="meta"))),
                   r"lora_as\[0\] must be on x's device"),
    "x_in_features": (lambda v: v.update(x=torch.randn(6, 7)), r"x.shape\[-1\]"),
    "bias_shape": (lambda v: v.update(bias=torch.randn(4)), "bias must have shape"),
    "scalings_length": (lambda v: v.update(scalings=[1.0, 2.0]), "one number per adapter"),
    "scalings_nan": (lambda v: v.update(scalings=[1.0, float("nan"), 1.0]), r"scalings\[1\] must be a finite"),
    "scalings_str": (lambda v: v.update(scalings="2"), "scalings must be a number"),
}


@pytest.mark.parametrize("entry", [multi_lora_linear, multi_lora_linear_triton, multi_lora_linear_reference],
                         ids=["multi_lora_linear", "multi_lora_linear_triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error(entry, case):
    mutate, message = BAD_INPUTS[case]
    args = _valid()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        entry(args["x"], args["weight"], args["lora_as"], args["lora_bs"], args["scalings"], args["offsets"],
              args["bias"])


def test_triton_entry_rejects_what_it_cannot_run(monkeypatch):
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([3, 2], [2, 257], 6, 5, torch.float32)
    with pytest.raises(ValueError, match=r"lora_as\[1\] has rank 257"):
        multi_lora_linear_triton(x, weight, lora_as, lora_bs, 1.0, offsets, bias)
    x64 = make_inputs([3, 2], [2, 3], 6, 5, torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        multi_lora_linear_triton(*x64[:4], 1.0, x64[5], x64[4])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok = make_inputs([3, 2], [2, 3], 6, 5, torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        multi_lora_linear_triton(*ok[:4], 1.0, ok[5], ok[4])


# ---------------------------------------------------------------------------------------------
# GPU: the same comparisons with compiled kernels on larger shapes
# ---------------------------------------------------------------------------------------------

GPU_SIZES = [300, 0, 517, 64, 1]
GPU_RANKS = [1, 4, 16, 33, 256]
GPU_SCALINGS = [2.0, 0.5, 1.0, 1.5, 0.125]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_and_grads(dtype):
    inputs = make_inputs(GPU_SIZES, GPU_RANKS, 384, 520, dtype, CUDA, weight_transposed=True)
    check_against_reference(inputs, GPU_SCALINGS, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_large_problem_kernels(large_problem_kernels, monkeypatch, dtype):
    monkeypatch.setattr(ml, "_SPLIT_ROWS", 64)
    inputs = make_inputs(GPU_SIZES, GPU_RANKS, 256, 320, dtype, CUDA, weight_grad=True, x_noncontiguous=True)
    check_against_reference(inputs, GPU_SCALINGS, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_dropout(large_problem_kernels, monkeypatch, dtype):
    monkeypatch.setattr(ml, "_SPLIT_ROWS", 64)
    inputs = make_inputs(GPU_SIZES, GPU_RANKS, 256, 320, dtype, CUDA)
    check_against_reference(inputs, GPU_SCALINGS, CUDA, dropout_p=0.3, seed=11)


@pytest.mark.gpu
def test_gpu_many_small_groups():
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(0, 40, (150,), generator=gen).tolist()
    ranks = torch.randint(1, 65, (150,), generator=gen).tolist()
    check_against_reference(make_inputs(sizes, ranks, 128, 96, torch.bfloat16, CUDA), 2.0, device=CUDA)


@pytest.mark.gpu
def test_gpu_dispatch_and_single_group():
    x, weight, lora_as, lora_bs, bias, offsets = make_inputs([257], [8], 192, 160, torch.float32, CUDA)
    assert multi_lora_linear_backend(x, lora_as) == "triton"
    y = multi_lora_linear(x, weight, lora_as, lora_bs, 2.0, offsets, bias)
    y1 = lora_linear_triton(x, weight, lora_as[0], lora_bs[0], 2.0, bias, path="cublas")
    torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
