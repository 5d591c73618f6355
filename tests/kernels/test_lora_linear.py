"""Fused LoRA linear (splitlora_kernels.ops.lora_linear) against the plain-torch reference.

Without CUDA the Triton path runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on shapes of a few dozen that still span several tiles (32 in the
interpreter) and leave ragged edges. Tests marked gpu repeat the comparisons on CUDA at larger
shapes.

Oracle: the reference evaluated in float64 on the very same (already rounded) inputs, with the
same dropout mask. Tolerance: max |fused - oracle| <= tol * max |oracle| per output, with tol
2 x the dtype's machine epsilon for fp16 / bf16 (the fused path rounds its output once and its
rank-r intermediates x @ A.T and dY @ B once to the input dtype, as the unfused computation does,
each costing up to half an ulp) and 2e-5 for fp32 (only accumulation-order differences).
"""
import importlib
import math

import pytest
import torch

from splitlora_kernels.ops import (
    dropout_mask,
    lora_linear,
    lora_linear_backend,
    lora_linear_reference,
    lora_linear_triton,
)

# The submodule, not the function of the same name that splitlora_kernels.ops re-exports.
ops_mod = importlib.import_module("splitlora_kernels.ops.lora_linear")

TOL = {
    torch.float32: 2e-5,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ["triton", "triton-pre", "cublas", "torch"]
FUSED_PATHS = ["triton", "triton-pre", "cublas"]
CPU = torch.device("cpu")


def make_inputs(lead, k, n, r, dtype, device=CPU, *, bias=True, weight_transposed=False,
                x_noncontiguous=False, x_grad=True, weight_grad=False, bias_grad=True, seed=0):
    """Fresh random tensors (never zeros: lora_b is random, not PEFT's zero init) of moderate
    magnitude so that every term of y contributes visibly."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    if x_noncontiguous:
        x = rnd(*lead, 2 * k)[..., ::2]  # every other column: a strided view
        assert not x.is_contiguous()
    else:
        x = rnd(*lead, k)
    if weight_transposed:
        weight = rnd(k, n, scale=1 / math.sqrt(k)).t()  # GPT-2 Conv1D stores [in, out]
        assert not weight.is_contiguous()
    else:
        weight = rnd(n, k, scale=1 / math.sqrt(k))
    lora_a = rnd(r, k, scale=1 / math.sqrt(k))
    lora_b = rnd(n, r, scale=1 / math.sqrt(r))
    b = rnd(n) if bias else None
    x.requires_grad_(x_grad)
    weight.requires_grad_(weight_grad)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    if b is not None:
        b.requires_grad_(bias_grad)
    return x, weight, lora_a, lora_b, b


def grad_inputs(tensors):
    return [t for t in tensors if t is not None and t.requires_grad]


def oracle(tensors, scaling, grad_out, mask=None):
    """Reference forward and gradients in float64 on the same values."""
    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    x, weight, lora_a, lora_b, bias = t64
    y = lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias,
                              None if mask is None else mask.double())
    grads = torch.autograd.grad(y, grad_inputs(t64), grad_out.double())
    return y, grads


def assert_close_scaled(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert scale > 0, f"{what}: the oracle is all zeros, the comparison would prove nothing"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x max|ref| ({scale:.3e})"


def check_against_reference(tensors, scaling, *, path, dropout_p=0.0, seed=1234, device=CPU):
    x, weight, lora_a, lora_b, bias = tensors
    y = lora_linear_triton(x, weight, lora_a, lora_b, scaling, bias, dropout_p=dropout_p, seed=seed, path=path)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(y.dtype).to(device)
    grads = torch.autograd.grad(y, grad_inputs(tensors), grad_out)
    mask = dropout_mask(x.shape, dropout_p, seed, device=device) if dropout_p > 0 else None
    y_ref, grads_ref = oracle(tensors, scaling, grad_out, mask)
    assert_close_scaled(y, y_ref, x.dtype, "y")
    names = [n for n, t in zip(["dx", "dW", "dA", "dB", "dbias"], tensors) if t is not None and t.requires_grad]
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, g_ref, t in zip(names, grads, grads_ref, grad_inputs(tensors)):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close_scaled(g, g_ref, x.dtype, name)


# ---------------------------------------------------------------------------------------------
# Triton path in the interpreter (CPU tensors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grads_match_reference(path, dtype):
    tensors = make_inputs((45,), 70, 50, 3, dtype)
    check_against_reference(tensors, 2.0, path=path)


@pytest.mark.parametrize("rank", [1, 3, 16, 64, 100, 256])
def test_ranks(rank):
    # 100 pads to 128 (masked lanes), 256 is the largest rank the kernels take.
    tensors = make_inputs((37,), 40, 36, rank, torch.float32)
    check_against_reference(tensors, 0.5, path="triton")


@pytest.mark.parametrize("m,k,n", [(1, 17, 5), (33, 31, 65), (70, 96, 33), (64, 64, 64)])
def test_odd_shapes(m, k, n):
    tensors = make_inputs((m,), k, n, 5, torch.float16)
    check_against_reference(tensors, 1.5, path="triton")


@pytest.mark.parametrize("path", PATHS)
def test_leading_dims_noncontiguous_x_and_transposed_weight(path):
    tensors = make_inputs((2, 3, 7), 40, 24, 4, torch.float32, x_noncontiguous=True, weight_transposed=True)
    check_against_reference(tensors, 2.0, path=path)


def test_one_dimensional_x():
    tensors = make_inputs((), 20, 12, 2, torch.float32)
    check_against_reference(tensors, 1.0, path="triton")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grad_for_full_fine_tuning(path, dtype):
    tensors = make_inputs((41,), 48, 40, 4, dtype, weight_grad=True, weight_transposed=True)
    check_against_reference(tensors, 2.0, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_input_without_grad_and_frozen_bias(path):
    # First adapted layer after a frozen embedding: no dX, but dA still needs dY @ B.
    tensors = make_inputs((39,), 36, 44, 6, torch.float32, x_grad=False, bias_grad=False)
    check_against_reference(tensors, 2.0, path=path)
    tensors = make_inputs((39,), 36, 44, 6, torch.float32, x_grad=False, bias_grad=False)
    check_against_reference(tensors, 2.0, path=path, dropout_p=0.2)


@pytest.fixture
def large_problem_kernels(monkeypatch):
    # Small shapes take the one-launch variants; force what large problems run: the column pass
    # split over tokens into fp32 partials (splits of 16 rows here) summed by the finishing
    # kernel, and the row pass as two launches (L, then the epilogue over a 2-D grid).
    monkeypatch.setattr(ops_mod, "_COLPASS_ONE_SPLIT_MAX", 0)
    monkeypatch.setattr(ops_mod, "_SPLIT_ROWS", 16)
    monkeypatch.setattr(ops_mod, "_MERGED_ROWPASS_MAX", 0)


@pytest.mark.parametrize("path", FUSED_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_problem_kernels(large_problem_kernels, path, dtype):
    tensors = make_inputs((45,), 70, 50, 3, dtype)
    check_against_reference(tensors, 2.0, path=path, dropout_p=0.2, seed=5)
    # Each task alone: only dA and dbias (frozen lora_b), only dB (frozen lora_a, no bias).
    x, weight, lora_a, lora_b, bias = make_inputs((40,), 36, 52, 5, dtype)
    lora_b.requires_grad_(False)
    check_against_reference((x, weight, lora_a, lora_b, bias), 2.0, path=path)
    x, weight, lora_a, lora_b, _ = make_inputs((40,), 36, 52, 5, dtype, bias=False, x_grad=False)
    lora_a.requires_grad_(False)
    check_against_reference((x, weight, lora_a, lora_b, None), 2.0, path=path)


def test_torch_path_with_dropout_uses_the_seeded_mask():
    # "torch" has no kernel of its own for dropout: p > 0 runs the fused kernels, so the mask
    # still comes from the seed and replays through the reference.
    tensors = make_inputs((30,), 40, 24, 4, torch.float32)
    check_against_reference(tensors, 2.0, path="torch", dropout_p=0.25, seed=9)


def test_frozen_adapter_gives_only_dx():
    x, weight, lora_a, lora_b, bias = make_inputs((30,), 40, 20, 4, torch.float32, bias=False)
    lora_a.requires_grad_(False)
    lora_b.requires_grad_(False)
    check_against_reference((x, weight, lora_a, lora_b, bias), 2.0, path="triton")


# ---- dropout ----


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_mask_replays_through_reference(path, dtype):
    # Forward and every gradient match the reference fed the mask regenerated from the seed:
    # the backward kernels therefore drew the same mask as the forward.
    tensors = make_inputs((2, 29), 70, 40, 8, dtype, weight_grad=True)
    check_against_reference(tensors, 2.0, path=path, dropout_p=0.3, seed=2024)


def test_dropout_keep_rate_and_scale():
    p = 0.25
    mask = dropout_mask((64, 300), p, seed=7, device=CPU)
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p))))
    keep = (mask > 0).double().mean().item()
    # 19200 Bernoulli draws: standard deviation 0.0031, so 0.015 is ~5 sigma.
    assert abs(keep - (1 - p)) < 0.015, keep
    # Rows must not repeat one another (the offset includes the row).
    assert not torch.equal(mask[0], mask[1])


def test_dropout_seed_controls_the_mask():
    x, weight, lora_a, lora_b, bias = make_inputs((20,), 40, 16, 4, torch.float32)
    run = lambda seed: lora_linear_triton(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5, seed=seed)
    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))
    assert not torch.equal(dropout_mask(x.shape, 0.5, 11, CPU), dropout_mask(x.shape, 0.5, 12, CPU))
    # Without a seed one is drawn from torch's generator, so manual_seed reproduces the call.
    torch.manual_seed(5)
    first = lora_linear_triton(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(first, lora_linear_triton(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5))


def test_no_dropout_when_not_training():
    tensors = make_inputs((20,), 40, 16, 4, torch.float32)
    x, weight, lora_a, lora_b, bias = tensors
    y = lora_linear_triton(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.5, training=False)
    y_ref, _ = oracle(tensors, 2.0, torch.ones_like(y))
    assert_close_scaled(y, y_ref, torch.float32, "y")


# ---------------------------------------------------------------------------------------------
# Reference and CPU dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias,with_mask", [(True, False), (False, True)])
def test_reference_gradcheck_float64(with_bias, with_mask):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    lora_a = torch.randn(2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    lora_b = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    mask = (torch.rand(2, 3, 5, generator=gen, dtype=torch.float64) > 0.3) / 0.7 if with_mask else None
    inputs = (x, weight, lora_a, lora_b) + ((bias,) if with_bias else ())

    def fn(*args):
        return lora_linear_reference(*args[:4], 1.5, args[4] if with_bias else None, mask)

    assert torch.autograd.gradcheck(fn, inputs)


def test_cpu_dispatch_uses_reference():
    tensors = make_inputs((3, 11), 24, 20, 4, torch.float32)
    x, weight, lora_a, lora_b, bias = tensors
    assert lora_linear_backend(x, lora_a) == "reference"
    y = lora_linear(x, weight, lora_a, lora_b, 2.0, bias)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, grad_inputs(tensors), grad_out)
    y_ref, grads_ref = oracle(tensors, 2.0, grad_out)
    assert_close_scaled(y, y_ref, torch.float32, "y")
    for g, g_ref in zip(grads, grads_ref):
        assert_close_scaled(g, g_ref, torch.float32, "grad")


def test_cpu_dispatch_dropout_draws_bernoulli_mask():
    x, weight, lora_a, lora_b, bias = make_inputs((64,), 200, 8, 4, torch.float32)
    torch.manual_seed(21)
    y = lora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.4)
    torch.manual_seed(21)
    mask = torch.empty_like(x).bernoulli_(0.6) / 0.6  # the draw lora_linear makes on CPU
    y_ref = lora_linear_reference(x, weight, lora_a, lora_b, 2.0, bias, mask)
    torch.testing.assert_close(y, y_ref)
    assert abs((mask > 0).double().mean().item() - 0.6) < 0.03
    y_eval = lora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.4, training=False)
    torch.testing.assert_close(y_eval, lora_linear_reference(x, weight, lora_a, lora_b, 2.0, bias))


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _valid():
    return dict(zip(["x", "weight", "lora_a", "lora_b", "bias"],
                    make_inputs((4,), 6, 5, 2, torch.float32, x_grad=False)))


BAD_INPUTS = {
    "x_in_features": (lambda v: v.update(x=torch.randn(4, 7)), "x.shape[-1]"),
    "x_scalar": (lambda v: v.update(x=torch.tensor(1.0)), "x must have shape"),
    "weight_1d": (lambda v: v.update(weight=torch.randn(30)), "weight must have shape"),
    "lora_a_in": (lambda v: v.update(lora_a=torch.randn(2, 7)), "lora_a must have shape"),
    "rank_zero": (lambda v: v.update(lora_a=torch.randn(0, 6), lora_b=torch.randn(5, 0)), "rank"),
    "lora_b_shape": (lambda v: v.update(lora_b=torch.randn(5, 3)), "lora_b must have shape"),
    "bias_shape": (lambda v: v.update(bias=torch.randn(4)), "bias must have shape"),
    "dtype_mix": (lambda v: v.update(lora_b=v["lora_b"].detach().half()), "lora_b.dtype"),
    "int_dtype": (lambda v: v.update(**{k: t.detach().long() for k, t in v.items() if isinstance(t, torch.Tensor)}), "x.dtype"),
    "wrong_device": (lambda v: v.update(weight=torch.empty(5, 6, device="meta")), "weight must be on"),
    "dropout_negative": (lambda v: v.update(dropout_p=-0.1), "dropout_p"),
    "dropout_one": (lambda v: v.update(dropout_p=1.0), "dropout_p"),
    "dropout_nan": (lambda v: v.update(dropout_p=float("nan")), "dropout_p"),
    "scaling_nan": (lambda v: v.update(scaling=float("nan")), "scaling"),
    "scaling_str": (lambda v: v.update(scaling="2"), "scaling"),
    "not_a_tensor": (lambda v: v.update(lora_a=[[1.0] * 6] * 2), "lora_a must be a torch.Tensor"),
}


@pytest.mark.parametrize("entry", [lora_linear, lora_linear_triton], ids=["lora_linear", "lora_linear_triton"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error(entry, case):
    mutate, message = BAD_INPUTS[case]
    args = _valid()
    args.update(scaling=2.0, dropout_p=0.0)
    mutate(args)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        entry(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["scaling"], args["bias"],
              args["dropout_p"])


def test_triton_entry_rejects_what_it_cannot_run(monkeypatch):
    args = _valid()
    big_a = torch.randn(257, 6)
    big_b = torch.randn(5, 257)
    with pytest.raises(ValueError, match="rank"):
        lora_linear_triton(args["x"], args["weight"], big_a, big_b, 1.0)
    # The reference takes any rank.
    assert lora_linear(args["x"], args["weight"], big_a, big_b, 1.0).shape == (4, 5)
    with pytest.raises(ValueError, match="path"):
        lora_linear_triton(args["x"], args["weight"], args["lora_a"], args["lora_b"], 1.0, path="cutlass")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        lora_linear_triton(args["x"], args["weight"], args["lora_a"], args["lora_b"], 1.0)


# ---------------------------------------------------------------------------------------------
# GPU: the same comparisons with compiled kernels on larger shapes
# ---------------------------------------------------------------------------------------------

CUDA = torch.device("cuda")


@pytest.fixture
def fixed_tiles(monkeypatch):
    # One tile config per kernel variant: autotuning every shape here would spend minutes
    # timing configs; test_gpu_autotuned_key_case covers the autotuned path.
    monkeypatch.setenv("SPLITLORA_TRITON_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_and_grads(fixed_tiles, path, dtype):
    tensors = make_inputs((3, 333), 384, 520, 16, dtype, CUDA, weight_transposed=True)
    check_against_reference(tensors, 2.0, path=path, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_dropout_and_weight_grad(fixed_tiles, path, dtype):
    tensors = make_inputs((517,), 256, 200, 8, dtype, CUDA, weight_grad=True, x_noncontiguous=True)
    check_against_reference(tensors, 2.0, path=path, dropout_p=0.1, seed=77, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 64, 256])
def test_gpu_ranks(fixed_tiles, rank):
    tensors = make_inputs((300,), 192, 160, rank, torch.bfloat16, CUDA)
    check_against_reference(tensors, 1.0, path="triton", device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_gpu_autotuned_key_case(path):
    tensors = make_inputs((2048,), 1024, 1024, 16, torch.bfloat16, CUDA)
    check_against_reference(tensors, 2.0, path=path, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("path", FUSED_PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_large_problem_kernels(fixed_tiles, monkeypatch, path, dtype):
    monkeypatch.setattr(ops_mod, "_COLPASS_ONE_SPLIT_MAX", 0)
    monkeypatch.setattr(ops_mod, "_MERGED_ROWPASS_MAX", 0)
    tensors = make_inputs((1100,), 256, 320, 16, dtype, CUDA, weight_transposed=True)
    check_against_reference(tensors, 2.0, path=path, dropout_p=0.1, seed=3, device=CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_gpu_direct_launch_matches_first_call(fixed_tiles, path):
    # The first call of a kernel variant goes through triton's JITFunction.run; later ones launch
    # the cached compiled kernel directly. Both must compute the same bits, and a pointer with a
    # different alignment (x offset by one element) must get its own variant, not a stale one.
    def run(x, weight, lora_a, lora_b, bias):
        y = lora_linear_triton(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=0.1, seed=7, path=path)
        return (y, *torch.autograd.grad(y, [x, lora_a, lora_b], torch.ones_like(y)))

    tensors = make_inputs((257,), 192, 160, 8, torch.bfloat16, CUDA)
    first = run(*tensors)
    assert ops_mod._FAST, "no kernel was cached for direct launches"
    for _ in range(2):
        for a, b in zip(first, run(*tensors)):
            assert torch.equal(a, b)
    x, weight, lora_a, lora_b, bias = tensors
    shifted = torch.empty(x.numel() + 1, device=CUDA, dtype=x.dtype)[1:].view_as(x)
    shifted.copy_(x)
    shifted.requires_grad_(True)
    assert shifted.data_ptr() % 16 != 0
    # cuBLAS may pick another algorithm for the unaligned x: equal up to bf16 rounding.
    for a, b in zip(first, run(shifted, weight, lora_a, lora_b, bias)):
        assert_close_scaled(a, b.double(), torch.bfloat16, "unaligned x")


@pytest.mark.gpu
def test_gpu_dispatch_and_keep_rate(fixed_tiles):
    x, weight, lora_a, lora_b, bias = make_inputs((128,), 64, 32, 4, torch.float16, CUDA)
    assert lora_linear_backend(x, lora_a) in PATHS
    y = lora_linear(x, weight, lora_a, lora_b, 2.0, bias)
    y_ref, _ = oracle((x, weight, lora_a, lora_b, bias), 2.0, torch.ones_like(y))
    assert_close_scaled(y, y_ref, torch.float16, "y")
    mask = dropout_mask((512, 1024), 0.1, seed=3, device=CUDA)
    assert abs((mask > 0).double().mean().item() - 0.9) < 0.005
    assert ops_mod.DEFAULT_CUDA_PATH in PATHS
