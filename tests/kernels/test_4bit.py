"""A frozen 4-bit (bitsandbytes NF4/FP4 Linear4bit) base under the fused LoRA op, as in QLoRA.

Reference: PEFT's `peft.tuners.lora.bnb.Linear4bit` over the same quantized weight with the same
adapters. Everything runs in float32 on CPU (compute dtype float32), where bitsandbytes' own
product equals F.linear with the dequantized weight and `lora_linear` runs the plain-torch
reference: only summation order may differ, so the stated tolerance is F32 (1e-5).

Models run in training mode (no dropout is configured): a CPU Linear4bit in eval mode without grad
repacks its weight into bitsandbytes' AVX512-BF16 inference layout (bf16 scales, a different
product), which `test_cpu_packed_layout_is_unpacked` covers separately.
"""
import copy
import tempfile
import warnings

import pytest
import torch
from torch import nn

from splitlora_kernels import FusedLoRALinear, apply_fused_lora, patch_peft, unpatch
from splitlora_kernels import layers as layers_mod
from splitlora_kernels import patch as patch_mod


def _bnb_or_skip():
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        pytest.skip(f"bitsandbytes cannot be imported: {err!r}", allow_module_level=True)
    try:
        lin = bnb.nn.Linear4bit(8, 4, compute_dtype=torch.float32, quant_type="nf4")
        lin.load_state_dict(nn.Linear(8, 4).state_dict())
        lin = lin.to("cpu")
        lin(torch.randn(2, 8, requires_grad=True))
    except Exception as err:
        pytest.skip(f"bitsandbytes' CPU backend fails on a tiny Linear4bit forward: {err!r}",
                    allow_module_level=True)
    return bnb


bnb = _bnb_or_skip()  # module level: skips the whole file when bitsandbytes is unusable
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402

F32 = dict(atol=1e-5, rtol=1e-5)
QUANT_TYPES = ["nf4", "fp4"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapters(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def fused_calls(monkeypatch):
    """Grows by one entry per call of the fused op (from patch_peft's forward or FusedLoRALinear)."""
    calls = []
    for mod in (patch_mod, layers_mod):
        real = mod.lora_linear

        def spy(*args, _real=real, **kwargs):
            calls.append(args[1].shape)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, "lora_linear", spy)
    return calls


def quantized_llama(build_model, quant_type):
    """The conftest tiny Llama, saved and reloaded with a 4-bit BitsAndBytesConfig on CPU
    (deterministic: equal calls give equal quantized weights)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_model("llama", seed=0).save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32)
    return model.train()


def quantized_linear(quant_type, in_features=48, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    q = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32, quant_type=quant_type)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")  # bitsandbytes quantizes on .to()


class MLP(nn.Module):
    is_loaded_in_4bit = True  # what PEFT checks to wrap Linear4bit bases in lora.bnb.Linear4bit

    def __init__(self, quant_type):
        super().__init__()
        self.fc1 = quantized_linear(quant_type, 48, 64, seed=0)
        self.act = nn.GELU()
        self.fc2 = quantized_linear(quant_type, 64, 40, bias=False, seed=1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def grads_of(model, x, loss_fn):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = loss_fn(model, x)
    out.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, x.grad.detach().clone()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_patch_peft_4bit_llama_matches_peft(quant_type, fused_calls, token_ids, build_model):
    pm = get_peft_model(quantized_llama(build_model, quant_type),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    randomize_adapters(pm)
    layers = [n for n, m in pm.named_modules() if type(m) is lora_bnb.Linear4bit]
    assert len(layers) == 2 * len(LLAMA_TARGETS)

    def run(model, ids):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model.zero_grad(set_to_none=True)
        return out.logits.detach(), grads

    ref_logits, ref_grads = run(pm, token_ids)
    assert not fused_calls
    report = patch_peft(pm)
    assert sorted(report.patched) == sorted(layers) and report.skipped == {}
    logits, grads = run(pm, token_ids)
    assert len(fused_calls) == len(layers)
    assert all(tuple(shape) == tuple(m.base_layer.weight.quant_state.shape)
               for shape, m in zip(fused_calls, (pm.get_submodule(n) for n in layers)))
    torch.testing.assert_close(logits, ref_logits, **F32)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * len(layers)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **F32, msg=name)
    # the quantized base stays frozen and gets no gradient
    assert all(m.base_layer.weight.grad is None for m in (pm.get_submodule(n) for n in layers))
    assert sorted(unpatch(pm)) == sorted(layers)
    fused_calls.clear()
    logits_back, _ = run(pm, token_ids)
    assert not fused_calls
    torch.testing.assert_close(logits_back, ref_logits, atol=0, rtol=0)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_apply_fused_lora_4bit_matches_peft(quant_type, fused_calls):
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(7))
    pm = get_peft_model(MLP(quant_type), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(pm)
    assert type(pm.base_model.model.fc1) is lora_bnb.Linear4bit
    ref_out, ref_grads, ref_dx = grads_of(pm, x, lambda m, x: m(x))

    model = apply_fused_lora(MLP(quant_type), ["fc1", "fc2"], r=4, alpha=8)
    assert isinstance(model.fc1, FusedLoRALinear) and model.fc1.is_4bit
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            peft_layer = pm.base_model.model.get_submodule(name)
            torch.testing.assert_close(model.get_submodule(name).weight.data, peft_layer.base_layer.weight.data,
                                       atol=0, rtol=0)  # the same quantized weight
            model.get_submodule(name).lora_A.copy_(peft_layer.lora_A["default"].weight)
            model.get_submodule(name).lora_B.copy_(peft_layer.lora_B["default"].weight)
    out, grads, dx = grads_of(model, x, lambda m, x: m(x))
    assert len(fused_calls) == 2
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(dx, ref_dx, **F32)
    assert set(grads) == {f"{n}.lora_{ab}" for n in ("fc1", "fc2") for ab in "AB"}  # nothing else is trained
    for name in ("fc1", "fc2"):
        for ab in "AB":
            torch.testing.assert_close(grads[f"{name}.lora_{ab}"],
                                       ref_grads[f"base_model.model.{name}.lora_{ab}.default.weight"], **F32)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_from_peft_converts_qlora_layers(quant_type, fused_calls):
    """from_peft on a QLoRA PeftModel: each lora.bnb.Linear4bit becomes a 4-bit FusedLoRALinear that
    adopts the same quantized weight and PEFT's adapter Parameters, and computes what PEFT did."""
    from splitlora_kernels import from_peft

    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(7))
    pm = get_peft_model(MLP(quant_type), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(pm)
    quantized = {n: pm.base_model.model.get_submodule(n).base_layer.weight for n in ("fc1", "fc2")}
    ref_out, ref_grads, ref_dx = grads_of(pm, x, lambda m, x: m(x))
    model = from_peft(pm)
    for name in ("fc1", "fc2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, FusedLoRALinear) and layer.is_4bit and layer.weight is quantized[name]
    out, grads, dx = grads_of(model, x, lambda m, x: m(x))
    assert len(fused_calls) == 2
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(dx, ref_dx, **F32)
    for name in ("fc1", "fc2"):
        for ab in "AB":
            torch.testing.assert_close(grads[f"{name}.lora_{ab}"],
                                       ref_grads[f"base_model.model.{name}.lora_{ab}.default.weight"], **F32)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_from_linear_4bit_matches_peft_layer(quant_type, fused_calls):
    base = quantized_linear(quant_type)
    peft_layer = lora_bnb.Linear4bit(base, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    randomize_adapters(peft_layer)
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias  # adopted, not copied
    assert (layer.in_features, layer.out_features) == (48, 40) and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(3))
    ref_out, ref_grads, ref_dx = grads_of(peft_layer, x, lambda m, x: m(x))
    out, grads, dx = grads_of(layer, x, lambda m, x: m(x))
    assert len(fused_calls) == 1
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(dx, ref_dx, **F32)
    assert set(grads) == {"lora_A", "lora_B"}
    torch.testing.assert_close(grads["lora_A"], ref_grads["lora_A.default.weight"], **F32)
    torch.testing.assert_close(grads["lora_B"], ref_grads["lora_B.default.weight"], **F32)


def test_4bit_layer_holds_no_dense_weight():
    base = quantized_linear("nf4", 256, 128)
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=8)
    layer(torch.randn(3, 256))  # forward stores nothing either
    dense_numel = 256 * 128
    tensors = dict(layer.named_parameters())
    tensors.update(dict(layer.named_buffers()))
    assert set(tensors) == {"weight", "bias", "lora_A", "lora_B"}
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.numel() == dense_numel // 2  # two 4-bit codes per byte
    assert all(t.numel() < dense_numel // 2 for n, t in tensors.items() if n != "weight")
    assert not any(isinstance(v, torch.Tensor) and v.numel() >= dense_numel for v in vars(layer).values())
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total_bytes < dense_numel  # under a quarter of the float32 weight (dense_numel * 4 bytes)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_merge_on_4bit_raises():
    layer = FusedLoRALinear.from_linear(quantized_linear("nf4"), r=4, alpha=8)
    with pytest.raises(ValueError, match=r"4-bit.*[Dd]equantize"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_cpu_packed_layout_is_unpacked():
    """After bitsandbytes repacked the CPU weight for bf16 inference (eval + no grad), the fused layer
    unpacks it with bitsandbytes' inverse; the scales were rounded to bf16 by the packing, so the
    result equals the unpacked one to about bf16 precision only."""
    base = quantized_linear("nf4", 64, 64)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    layer = FusedLoRALinear.from_linear(copy.deepcopy(base), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
        before = layer(x)
        base_packed = copy.deepcopy(base).eval()
        base_packed(x)
    if not getattr(base_packed.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack the weight")
    packed_layer = FusedLoRALinear.from_linear(base_packed, r=4, alpha=8)
    with torch.no_grad():
        packed_layer.lora_A.copy_(layer.lora_A)
        packed_layer.lora_B.copy_(layer.lora_B)
        after = packed_layer(x)
    assert not base_packed.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-2)


def test_4bit_state_dict_round_trip():
    """The wrapped layer saves its base like bitsandbytes' Linear4bit (codes + quant_state components)
    and loads such a state dict back, quant_state included."""
    base = quantized_linear("fp4", seed=2)
    base_keys = set(base.state_dict())
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    sd = layer.state_dict()
    assert set(sd) == base_keys | {"lora_A", "lora_B"} and len(base_keys) > 2  # weight.absmax, weight.quant_map, ...
    x = torch.randn(3, 48)
    expected = layer(x).detach()

    other = FusedLoRALinear.from_linear(quantized_linear("nf4", seed=9), r=4, alpha=8)
    assert not torch.allclose(other(x), expected)
    other.load_state_dict(sd, strict=True)
    assert other.weight.quant_state.quant_type == "fp4"
    torch.testing.assert_close(other(x), expected, atol=0, rtol=0)


def test_patch_peft_fuses_plain_lora_linear_over_4bit(fused_calls):
    """Without the model's is_loaded_in_4bit flag PEFT wraps a Linear4bit in a plain lora.Linear; its
    forward is still base(x) + LoRA, and patch_peft fuses it the same way."""
    from peft.tuners.lora import layer as lora_layer

    model = MLP("nf4")
    model.is_loaded_in_4bit = False
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(pm)
    assert type(pm.base_model.model.fc1) is lora_layer.Linear
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(11))
    ref_out, ref_grads, ref_dx = grads_of(pm, x, lambda m, x: m(x))
    report = patch_peft(pm)
    assert len(report.patched) == 2 and report.skipped == {}
    out, grads, dx = grads_of(pm, x, lambda m, x: m(x))
    assert len(fused_calls) == 2
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(dx, ref_dx, **F32)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **F32, msg=name)


def test_patch_peft_4bit_input_dtype_mismatch_takes_peft_path(fused_calls):
    """A float64 input to a float32-compute Linear4bit: PEFT's forward decides (the fused path is not taken)."""
    pm = get_peft_model(MLP("nf4"), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    randomize_adapters(pm)
    patch_peft(pm)
    layer = pm.base_model.model.fc1
    x = torch.randn(2, 48, dtype=torch.float64)
    unpatched = type(layer).forward(layer, x)
    assert not fused_calls
    torch.testing.assert_close(layer(x), unpatched, atol=0, rtol=0)
    assert not fused_calls


def test_patch_peft_4bit_under_autocast_takes_peft_path(fused_calls):
    pm = get_peft_model(MLP("nf4"), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    randomize_adapters(pm)
    patch_peft(pm)
    x = torch.randn(2, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pm(x)
    assert not fused_calls


def test_fused_4bit_does_not_import_bitsandbytes_for_dense_models():
    import subprocess
    import sys

    code = ("import sys, torch, splitlora_kernels as k; m = torch.nn.Sequential(torch.nn.Linear(4, 4)); "
            "k.apply_fused_lora(m, ['0'], r=2, alpha=2); m(torch.randn(1, 4)); "
            "assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_quantized_weight_is_refused_outside_the_4bit_path():
    """A Params4bit handed to the dense setup (as [n, 1] uint8 codes it is 2-D) is refused, not misread."""
    base = quantized_linear("nf4")
    layer = FusedLoRALinear.__new__(FusedLoRALinear)
    nn.Module.__init__(layer)
    with pytest.raises(ValueError, match="floating-point"):
        layer._setup(base.weight, base.bias, False, 4, 8, 0.0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fused_4bit_on_cuda_matches_the_dequantized_reference(quant_type):
    """On a GPU (bfloat16 compute, the Triton path of the fused op): outputs and adapter gradients
    equal F.linear with the dequantized weight plus the low-rank path in float32, at bf16's
    tolerance (2e-2); and PEFT's own QLoRA layer over the same weight and adapters agrees."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 192)
    q = bnb.nn.Linear4bit(256, 192, compute_dtype=torch.bfloat16, quant_type=quant_type)
    q.load_state_dict(dense.state_dict())
    q = q.to("cuda")
    layer = FusedLoRALinear.from_linear(q, r=8, alpha=16, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.1)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)
    out, grads, _ = grads_of(layer, x, lambda m, x: m(x))

    weight = layers_mod.dequantize_4bit_weight(q.weight, torch.float32)
    a, b = (layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
    xf = x.float()
    ref = torch.nn.functional.linear(xf, weight, q.bias.float()) + (xf @ a.t() @ b.t()) * layer.scaling
    ref.square().mean().backward()
    bf16 = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref.detach(), **bf16)
    torch.testing.assert_close(grads["lora_A"].float(), a.grad, **bf16)
    torch.testing.assert_close(grads["lora_B"].float(), b.grad, **bf16)

    peft_layer = lora_bnb.Linear4bit(q, "default", config=LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    with torch.no_grad():
        torch.testing.assert_close(peft_layer(x).float(), out.float(), **bf16)
