"""FusedLoRALinear and apply_fused_lora, checked against PEFT's lora.Linear and the base models."""
import copy
import math

import pytest
import torch
from torch import nn

from splitlora_kernels import FusedLoRALinear, apply_fused_lora
from splitlora_kernels.layers import (
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners import lora as peft_lora  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

IN, OUT, R, ALPHA = 48, 40, 4, 8

# Tolerances per dtype. float32: both sides run the same sequence of float32 matmuls on CPU (PEFT's
# Conv1D base uses addmm on the [in, out] weight instead of linear on its transpose), so only
# summation-order rounding differs. bfloat16 (8-bit mantissa, eps 2**-8) and float16 (eps 2**-11):
# each side rounds after every op and a fused kernel rounds once at the end, so results may differ by
# a few ulps of values of order 1.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}


def make_base(kind, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":  # Conv1D starts with a zero bias; make the bias matter.
        with torch.no_grad():
            base.bias.normal_()
    return base.to(device=device, dtype=dtype)


def make_pair(kind, dtype=torch.float32, device="cpu", use_rslora=False, r=R, alpha=ALPHA):
    """A PEFT lora.Linear and a FusedLoRALinear over equal (separate) bases with equal, non-zero adapters."""
    base = make_base(kind, dtype, device)
    config = LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=kind == "conv1d", use_rslora=use_rslora)
    peft_layer = peft_lora.Linear(copy.deepcopy(base), "default", config=config, r=r, lora_alpha=alpha)
    ours = FusedLoRALinear.from_linear(base, r, alpha, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        a = torch.randn(r, IN, generator=gen) * 0.2
        b = torch.randn(OUT, r, generator=gen) * 0.2
        peft_layer.lora_A["default"].weight.copy_(a)
        peft_layer.lora_B["default"].weight.copy_(b)
        ours.lora_A.copy_(a)
        ours.lora_B.copy_(b)
    # PEFT keeps its adapters in float32 when created beside a float32 base but follows the base dtype
    # otherwise; give ours the same dtype so both sides see identical parameter values.
    ours.lora_A.data = ours.lora_A.data.to(peft_layer.lora_A["default"].weight.dtype)
    ours.lora_B.data = ours.lora_B.data.to(peft_layer.lora_B["default"].weight.dtype)
    return peft_layer, ours


def random_input(dtype=torch.float32, device="cpu", shape=(2, 5, IN), seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def forward_backward(layer, x, a, b):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    grad_out = random_input(y.dtype, y.device, tuple(y.shape), seed=11)
    y.backward(grad_out)
    return y.detach(), x.grad, a.grad, b.grad


def compare_with_peft(kind, dtype, device="cpu", use_rslora=False):
    peft_layer, ours = make_pair(kind, dtype, device, use_rslora=use_rslora)
    x = random_input(dtype, device)
    got = forward_backward(ours, x, ours.lora_A, ours.lora_B)
    want = forward_backward(peft_layer, x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    for what, g, w in zip(("output", "grad x", "grad lora_A", "grad lora_B"), got, want):
        assert g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{kind} {dtype} {what}: {m}")
    # The low-rank path must have mattered, or the comparison above proves little.
    base_only = peft_layer.get_base_layer()(x)
    assert (got[0] - base_only).abs().max() > 10 * TOL[dtype]["atol"]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_grads_match_peft(kind, dtype):
    compare_with_peft(kind, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", [None, "cublas", "triton"], ids=["default", "cublas", "triton"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_grads_match_peft_cuda(monkeypatch, path, kind, dtype):
    # On CUDA FusedLoRALinear runs the Triton kernels (the default path, and each fused path forced
    # through SPLITLORA_LORA_PATH, Conv1D's transposed weight included); PEFT runs cuBLAS. float32
    # matmuls may use TF32 in either, hence the bf16-like tolerance for float32 here.
    if path is not None:
        monkeypatch.setenv("SPLITLORA_LORA_PATH", path)
    monkeypatch.setenv("SPLITLORA_TRITON_AUTOTUNE", "0")  # one tile config: no minutes of autotuning
    if dtype == torch.float32:
        tol = dict(atol=2e-2, rtol=2e-2)
        peft_layer, ours = make_pair(kind, dtype, "cuda")
        x = random_input(dtype, "cuda")
        got = forward_backward(ours, x, ours.lora_A, ours.lora_B)
        want = forward_backward(peft_layer, x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol)
    else:
        compare_with_peft(kind, dtype, "cuda")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_rslora_scaling_and_output(kind):
    _, plain = make_pair(kind, use_rslora=False, r=16, alpha=8)
    assert plain.scaling == pytest.approx(8 / 16)
    _, rs = make_pair(kind, use_rslora=True, r=16, alpha=8)
    assert rs.scaling == pytest.approx(8 / math.sqrt(16))
    compare_with_peft(kind, torch.float32, use_rslora=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradcheck_float64(kind):
    # Small sizes: gradcheck perturbs every input element one at a time.
    n_in, n_out, r = 7, 5, 3
    torch.manual_seed(0)
    base = (nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)).double()
    with torch.no_grad():
        base.bias.normal_()
    layer = FusedLoRALinear.from_linear(base, r=r, alpha=6)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n_out, r, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b):
        return torch.func.functional_call(layer, {"lora_A": a, "lora_B": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, a, b))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_linear_keeps_parameters_and_starts_at_base(kind):
    base = make_base(kind)
    reference = copy.deepcopy(base)
    weight, bias = base.weight, base.bias
    layer = FusedLoRALinear.from_linear(base, R, ALPHA)
    # Same Parameter objects: no copy, state-dict names and weight tying preserved.
    assert layer.weight is weight and layer.bias is bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert tuple(layer.lora_A.shape) == (R, IN) and tuple(layer.lora_B.shape) == (OUT, R)
    assert not weight.requires_grad and not bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    # PEFT's init: A kaiming-uniform(a=sqrt(5)) -> |A| <= 1/sqrt(in); B zero.
    assert layer.lora_A.abs().max() > 0 and layer.lora_A.abs().max() <= 1 / math.sqrt(IN) + 1e-7
    assert torch.count_nonzero(layer.lora_B) == 0
    x = random_input()
    torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_constructor(fan_in_fan_out):
    layer = FusedLoRALinear(IN, OUT, r=R, lora_alpha=ALPHA, fan_in_fan_out=fan_in_fan_out, bias=False)
    assert layer.bias is None
    assert tuple(layer.weight.shape) == ((IN, OUT) if fan_in_fan_out else (OUT, IN))
    x = random_input()
    w = layer.weight.t() if fan_in_fan_out else layer.weight
    torch.testing.assert_close(layer(x), x @ w.t())
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), x @ w.t() + ALPHA / R * (x @ layer.lora_A.t()) @ layer.lora_B.t())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    peft_layer, layer = make_pair(kind)
    original = layer.weight.detach().clone()
    x = random_input()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)
    # Layout: the merged weight equals PEFT's merged weight (both [in, out] for Conv1D).
    peft_layer.merge()
    torch.testing.assert_close(layer.weight, peft_layer.get_base_layer().weight, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(layer.weight, original, atol=1e-3)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    # A merged layer runs the base only (B changed after the merge does not change the output), and
    # unmerge subtracts what was merged, not the changed B.
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_merge_bfloat16_restores_within_rounding():
    _, layer = make_pair("linear", torch.bfloat16)
    original = layer.weight.detach().clone()
    layer.merge()
    # The update is far above the tolerance below, so an unmerge that did nothing would fail.
    assert (layer.weight.float() - original.float()).abs().max() > 0.1
    layer.unmerge()
    # Two bf16 roundings of W + delta: at most ~2 ulps of |W| + |delta|.
    torch.testing.assert_close(layer.weight, original, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r \\(the LoRA rank\\)"),
        (dict(r=-2), "r \\(the LoRA rank\\)"),
        (dict(r=2.5), "r \\(the LoRA rank\\)"),
        (dict(r=True), "r \\(the LoRA rank\\)"),
        (dict(alpha=0), "lora_alpha"),
        (dict(alpha=-1.0), "lora_alpha"),
        (dict(alpha=float("nan")), "lora_alpha"),
        (dict(dropout=-0.1), "lora_dropout"),
        (dict(dropout=1.0), "lora_dropout"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    args = dict(r=R, alpha=ALPHA, dropout=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FusedLoRALinear.from_linear(nn.Linear(IN, OUT), args["r"], args["alpha"], dropout=args["dropout"])
    with pytest.raises(ValueError, match=match):
        FusedLoRALinear(IN, OUT, args["r"], args["alpha"], lora_dropout=args["dropout"])


def test_from_linear_rejects_other_modules():
    with pytest.raises(ValueError, match="nn.Linear or a transformers Conv1D; got Conv2d"):
        FusedLoRALinear.from_linear(nn.Conv2d(3, 3, 1), R, ALPHA)
    layer = FusedLoRALinear.from_linear(nn.Linear(IN, OUT), R, ALPHA)
    with pytest.raises(ValueError, match="already a FusedLoRALinear"):
        FusedLoRALinear.from_linear(layer, R, ALPHA)


def test_dropout_only_in_training():
    _, layer = make_pair("linear")
    layer.lora_dropout = 0.5
    x = random_input()
    layer.eval()
    y_eval = layer(x)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y_eval, expected, atol=1e-5, rtol=1e-5)
    layer.train()
    y_train = layer(x)
    # In training the low-rank path sees a dropped-out input, so the output moves.
    assert not torch.allclose(y_train, y_eval, atol=1e-4)
    y_train.sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_dtype_handling():
    base = make_base("linear", torch.bfloat16)
    layer = FusedLoRALinear.from_linear(base, R, ALPHA)
    assert layer.lora_A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="input of dtype torch.float32 but its base weight is torch.bfloat16"):
        layer(random_input(torch.float32))
    # Adapters kept in float32 beside a bf16 base (PEFT's default): computed in bf16, grads in float32.
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn_like(layer.lora_B, dtype=torch.float32)
    y = layer(random_input(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    # Under autocast a float32 layer computes in the autocast dtype, like nn.Linear.
    f32 = FusedLoRALinear.from_linear(make_base("linear"), R, ALPHA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f32(random_input(torch.float32)).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# apply_fused_lora on tiny transformers models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_apply_fused_lora_fresh_adapters_equal_base(arch, token_ids, build_model, lora_targets):
    model = build_model(arch)
    base = copy.deepcopy(model)
    base_keys = set(model.state_dict())
    weights_before = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        want = base(token_ids).logits

    out = apply_fused_lora(model, lora_targets[arch], r=4, alpha=8)
    assert out is model
    wrapped = lora_modules(model)
    n_layers = 2
    assert len(wrapped) == n_layers * (4 if arch == "gpt2" else 7)
    assert all(name.rsplit(".", 1)[-1] in lora_targets[arch] for name in wrapped)
    # No linear module with a targeted name was left behind.
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in lora_targets[arch]:
            assert isinstance(m, FusedLoRALinear), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in wrapped for w in ("lora_A", "lora_B")}
    # Base parameters keep their names and objects (GPT-2's lm_head stays tied to wte).
    assert set(model.state_dict()) - base_keys == {f"{n}.{w}" for n in wrapped for w in ("lora_A", "lora_B")}
    for n, p in model.named_parameters():
        if n in weights_before:
            assert p is weights_before[n], n
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight

    with torch.no_grad():
        got = model(token_ids).logits
    assert torch.equal(got, want)

    # The adapters are live: a loss gives lora_B a gradient, the frozen base gets none.
    model(token_ids, labels=token_ids).loss.backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in wrapped.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_apply_fused_lora_per_module_ranks_and_alphas(build_model):
    model = build_model("llama")
    r = {"q_proj": 4, "v_proj": 8, "model.layers.0.self_attn.q_proj": 16}
    alpha = {"q_proj": 8, "v_proj": 32}
    apply_fused_lora(model, ["q_proj", "v_proj"], r=r, alpha=alpha, dropout=0.1, use_rslora=True)
    ranks = {n: m.r for n, m in lora_modules(model).items()}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 16,
        "model.layers.0.self_attn.v_proj": 8,
        "model.layers.1.self_attn.q_proj": 4,
        "model.layers.1.self_attn.v_proj": 8,
    }
    layer0_q = model.model.layers[0].self_attn.q_proj
    assert layer0_q.lora_alpha == 8 and layer0_q.scaling == pytest.approx(8 / 4)
    assert model.model.layers[1].self_attn.v_proj.scaling == pytest.approx(32 / math.sqrt(8))
    assert all(m.lora_dropout == 0.1 and m.use_rslora for m in lora_modules(model).values())


def test_apply_fused_lora_errors(build_model):
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"\['qkv'\] match no module.*'down_proj'.*'q_proj'"):
        apply_fused_lora(model, ["q_proj", "qkv"], r=4, alpha=8)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' is a LlamaAttention"):
        apply_fused_lora(model, ["self_attn"], r=4, alpha=8)
    with pytest.raises(ValueError, match="none of its keys .* matches the targeted module 'model.layers.0.self_attn.v_proj'"):
        apply_fused_lora(model, ["q_proj", "v_proj"], r={"q_proj": 4}, alpha=8)
    with pytest.raises(ValueError, match=r"r has keys \['k_proj'\] that match none of the targeted modules"):
        apply_fused_lora(model, ["q_proj"], r={"q_proj": 4, "k_proj": 2}, alpha=8)
    with pytest.raises(ValueError, match="for module 'model.layers.0.self_attn.q_proj': r \\(the LoRA rank\\)"):
        apply_fused_lora(model, ["q_proj"], r=0, alpha=8)
    with pytest.raises(ValueError, match="non-empty list"):
        apply_fused_lora(model, [], r=4, alpha=8)
    # Every failure above left the model untouched.
    assert not lora_modules(model)
    apply_fused_lora(model, "q_proj", r=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_fused_lora(model, ["q_proj"], r=4, alpha=8)


def test_lora_state_dict_round_trip_and_merge(token_ids, build_model, randomize):
    model = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_fc"], r=4, alpha=8)
    randomize(model, seed=1)
    sd = lora_state_dict(model)
    assert set(sd) == {f"{n}.{w}" for n in lora_modules(model) for w in ("lora_A", "lora_B")}
    full = model.state_dict()
    assert all(torch.equal(sd[k], full[k]) for k in sd)

    other = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_fc"], r=4, alpha=8)
    with torch.no_grad():
        assert not torch.allclose(other(token_ids).logits, model(token_ids).logits)
    load_lora_state_dict(other, {k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        want = model(token_ids).logits
        assert torch.equal(other(token_ids).logits, want)
        merge_lora(other)
        torch.testing.assert_close(other(token_ids).logits, want, atol=1e-5, rtol=1e-5)
        unmerge_lora(other)
        torch.testing.assert_close(other(token_ids).logits, want, atol=1e-5, rtol=1e-5)

    key = next(iter(sd))
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if k != key})
    bad = dict(sd)
    bad[key] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=f"state_dict\\['{key}'\\] has shape \\(2, 2\\)"):
        load_lora_state_dict(other, bad)
    with pytest.raises(ValueError, match="holds no FusedLoRALinear"):
        load_lora_state_dict(build_model("gpt2"), sd)


@pytest.mark.gpu
def test_dropout_cuda_training_and_eval():
    # The Triton path draws its own dropout mask: check the layer wires p and the mode through.
    _, layer = make_pair("linear", torch.bfloat16, "cuda")
    layer.lora_dropout = 0.5
    x = random_input(torch.bfloat16, "cuda", shape=(64, IN))
    layer.eval()
    y_eval = layer(x)
    ref = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y_eval, ref, **TOL[torch.bfloat16])
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_train.float(), y_eval.float(), atol=0.1)
    y_train.float().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_apply_fused_lora_cuda_bfloat16(arch, token_ids, build_model, lora_targets, randomize):
    # Fresh adapters on CUDA: the Triton base GEMM vs cuBLAS, both in bf16 with fp32 accumulation.
    base = build_model(arch, dtype=torch.bfloat16).cuda()
    model = apply_fused_lora(copy.deepcopy(base), lora_targets[arch], r=8, alpha=16)
    ids = token_ids.cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), base(ids).logits.float(), atol=5e-2, rtol=5e-2)
    randomize(model, seed=2)
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, m in lora_modules(model).items():
        assert torch.isfinite(m.lora_A.grad).all() and m.lora_B.grad.abs().sum() > 0, name
