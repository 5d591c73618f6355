"""PEFT interop: from_peft, save_peft_adapter (read by PEFT) and load_peft_adapter (of PEFT's files)."""
import copy
import json

import pytest
import torch

from splitlora_kernels import FusedLoRALinear, apply_fused_lora, from_peft, load_peft_adapter, save_peft_adapter
from splitlora_kernels.layers import lora_modules, lora_state_dict

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# float32 on CPU: PEFT and FusedLoRALinear run the same float32 ops (PEFT's GPT-2 Conv1D base uses
# addmm on the [in, out] weight, ours linear on its transposed view), so only summation order differs.
F32 = dict(atol=1e-5, rtol=1e-5)


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def lora_grads(model, token_ids, strip=None):
    """{module name: (grad A, grad B)} of a cross-entropy loss, keyed by the transformers module name."""
    model.zero_grad(set_to_none=True)
    model(token_ids, labels=token_ids).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        if strip:
            name = name.replace(strip, "")
        module, which = name.replace(".default.weight", "").rsplit(".", 1)
        grads.setdefault(module, {})[which] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return grads


def peft_wrap(model, arch, lora_targets, seed=0, **config):
    fan_in_fan_out = arch == "gpt2"
    config = dict(dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets[arch]), **config)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm


# --------------------------------------------------------------------------------------------
# from_peft
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_peft_same_logits_and_gradients(arch, token_ids, build_model, lora_targets):
    # rsLoRA on one architecture so the flag is carried over too; dropout is inactive in eval mode.
    use_rslora = arch == "llama"
    pm = peft_wrap(build_model(arch), arch, lora_targets, use_rslora=use_rslora, lora_dropout=0.1).eval()
    inner = pm.base_model.model
    want_logits = logits(pm, token_ids)
    want_grads = lora_grads(pm, token_ids, strip="base_model.model.")
    assert (want_logits - logits(build_model(arch), token_ids)).abs().max() > 1e-2  # adapters matter
    peft_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}

    model = from_peft(pm)
    assert model is inner and type(model).__name__ in ("GPT2LMHeadModel", "LlamaForCausalLM")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert "peft_config" not in vars(model)
    wrapped = lora_modules(model)
    assert set(wrapped) == set(want_grads)
    assert all(m.fan_in_fan_out == (arch == "gpt2") for m in wrapped.values())
    # The Parameter objects themselves were adopted.
    for name, m in wrapped.items():
        assert m.lora_A is peft_params[f"base_model.model.{name}.lora_A.default.weight"]
        assert m.lora_B is peft_params[f"base_model.model.{name}.lora_B.default.weight"]
        assert m.scaling == pytest.approx(8 / 2 if use_rslora else 8 / 4)
        assert m.use_rslora is use_rslora and m.lora_dropout == pytest.approx(0.1)

    torch.testing.assert_close(logits(model, token_ids), want_logits, **F32)
    got_grads = lora_grads(model, token_ids)
    for name, pair in want_grads.items():
        for which in ("lora_A", "lora_B"):
            torch.testing.assert_close(got_grads[name][which], pair[which], **F32, msg=lambda m: f"{name}.{which}: {m}")


def test_from_peft_transformers_integrated_adapter(token_ids, build_model):
    # transformers' own PEFT integration (model.add_adapter) injects lora.Linear without a PeftModel.
    model = build_model("llama")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    want = logits(model, token_ids)
    assert model._hf_peft_config_loaded
    out = from_peft(model)
    assert out is model and len(lora_modules(out)) == 4
    assert not out._hf_peft_config_loaded and "peft_config" not in vars(out)
    torch.testing.assert_close(logits(out, token_ids), want, **F32)


def test_from_peft_bfloat16_base_with_float32_adapters(token_ids, build_model, lora_targets):
    # PEFT keeps adapters in float32 beside a bf16 base and computes that path in float32; ours casts
    # the adapters to bf16 in forward, so logits agree to bf16 rounding through two layers.
    pm = peft_wrap(build_model("llama", dtype=torch.bfloat16), "llama", lora_targets)
    want = logits(pm, token_ids)
    model = from_peft(pm)
    assert all(m.lora_A.dtype == torch.float32 for m in lora_modules(model).values())
    got = logits(model, token_ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    model(token_ids, labels=token_ids).loss.backward()
    assert all(m.lora_B.grad.dtype == torch.float32 for m in lora_modules(model).values())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda b, t: peft_wrap(b("llama"), "llama", t, use_dora=True), "DoRA"),
        (lambda b, t: peft_wrap(b("llama"), "llama", t, bias="all"), "bias='all'"),
        (lambda b, t: peft_wrap(b("llama"), "llama", t, modules_to_save=["lm_head"]), "modules_to_save"),
        (
            lambda b, t: get_peft_model(b("llama"), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])),
            "peft.tuners.lora.layer.Embedding; from_peft converts only peft.tuners.lora.Linear",
        ),
        (lambda b, t: _two_adapters(b("llama"), t), "holds 2 adapters"),
        (lambda b, t: _merged(b("gpt2"), t), "unmerge_adapter"),
    ],
    ids=["dora", "bias", "modules_to_save", "embedding", "two_adapters", "merged"],
)
def test_from_peft_refuses_unsupported(make, match, build_model, lora_targets):
    pm = make(build_model, lora_targets)
    with pytest.raises(ValueError, match=match):
        from_peft(pm)
    # Refused before anything was swapped.
    assert not any(isinstance(m, FusedLoRALinear) for m in pm.modules())


def _two_adapters(model, lora_targets):
    pm = peft_wrap(model, "llama", lora_targets)
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    return pm


def _merged(model, lora_targets):
    pm = peft_wrap(model, "gpt2", lora_targets)
    pm.merge_adapter()
    return pm


# --------------------------------------------------------------------------------------------
# save_peft_adapter -> PEFT
# --------------------------------------------------------------------------------------------


def saved_base(build_model, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"base_{arch}"
    build_model(arch).save_pretrained(path)
    return path, lambda: AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_peft_adapter_loads_in_peft(arch, tmp_path, token_ids, build_model, lora_targets, randomize):
    base_path, load_base = saved_base(build_model, arch, tmp_path)
    model = apply_fused_lora(load_base(), lora_targets[arch], r=4, alpha=16, dropout=0.05)
    randomize(model, seed=3)
    want = logits(model, token_ids)
    assert (want - logits(load_base(), token_ids)).abs().max() > 1e-2

    out = save_peft_adapter(model, tmp_path / "adapter", str(base_path))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.05)
    assert config["target_modules"] == sorted(lora_targets[arch])
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["use_rslora"] is False and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["base_model_name_or_path"] == str(base_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    name = next(iter(lora_modules(model)))
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], lora_modules(model)[name].lora_A)
    assert len(tensors) == 2 * len(lora_modules(model))

    pm = PeftModel.from_pretrained(load_base(), out).eval()
    torch.testing.assert_close(logits(pm, token_ids), want, **F32)


def test_save_peft_adapter_heterogeneous_ranks_and_partial_targets(tmp_path, token_ids, build_model, randomize):
    # Only layer 0 wrapped (the client half of a split model), ranks and alphas per module.
    base_path, load_base = saved_base(build_model, "llama", tmp_path)
    model = load_base()
    layer0 = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] + ["model.layers.0.mlp.down_proj"]
    apply_fused_lora(
        model,
        layer0,
        r={"q_proj": 8, "k_proj": 2, "v_proj": 2, "down_proj": 2},
        alpha={"q_proj": 16, "k_proj": 4, "v_proj": 4, "down_proj": 6},
        use_rslora=True,
    )
    randomize(model, seed=4)
    want = logits(model, token_ids)

    save_peft_adapter(model, tmp_path / "adapter", str(base_path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(layer0)
    assert config["r"] == 2 and config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8}
    assert config["lora_alpha"] == 4 and config["alpha_pattern"] == {
        "model.layers.0.self_attn.q_proj": 16,
        "model.layers.0.mlp.down_proj": 6,
    }
    assert config["use_rslora"] is True

    pm = PeftModel.from_pretrained(load_base(), tmp_path / "adapter").eval()
    peft_layers = {n for n, m in pm.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert peft_layers == set(layer0)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 8
    torch.testing.assert_close(logits(pm, token_ids), want, **F32)


def test_save_peft_adapter_suffix_rank_pattern(tmp_path, build_model):
    model = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_proj", "c_fc"], r={"c_attn": 8, "c_proj": 4, "c_fc": 4}, alpha=8)
    save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"c_attn": 8}


def test_save_peft_adapter_errors(tmp_path, build_model):
    with pytest.raises(ValueError, match="holds no FusedLoRALinear"):
        save_peft_adapter(build_model("gpt2"), tmp_path)
    model = apply_fused_lora(build_model("llama"), ["q_proj"], r=4, alpha=8, dropout=0.1)
    model.model.layers[1].self_attn.q_proj.lora_dropout = 0.2
    with pytest.raises(ValueError, match="different dropout rates"):
        save_peft_adapter(model, tmp_path)


# --------------------------------------------------------------------------------------------
# PEFT's save_pretrained -> load_peft_adapter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_load_peft_adapter_from_peft_save(arch, tmp_path, token_ids, build_model, lora_targets):
    _, load_base = saved_base(build_model, arch, tmp_path)
    extra = dict(use_rslora=True)  # GPT-2 carries rsLoRA scaling, Llama per-module patterns.
    if arch == "llama":
        extra = dict(rank_pattern={"q_proj": 8}, alpha_pattern={"model.layers.1.mlp.down_proj": 3})
    pm = peft_wrap(load_base(), arch, lora_targets, seed=5, **extra).eval()
    want = logits(pm, token_ids)
    pm.save_pretrained(tmp_path / "peft_adapter")

    # 1. A bare base model, wrapped according to the adapter.
    model = load_peft_adapter(load_base(), tmp_path / "peft_adapter")
    wrapped = lora_modules(model)
    assert len(wrapped) == 2 * (4 if arch == "gpt2" else 7)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    if arch == "llama":
        assert model.model.layers[0].self_attn.q_proj.r == 8 and model.model.layers[0].self_attn.k_proj.r == 4
        assert model.model.layers[1].mlp.down_proj.lora_alpha == 3
    torch.testing.assert_close(logits(model, token_ids), want, **F32)

    # 2. A model already wrapped with matching shapes (other alpha, no rsLoRA): values and scaling adopted.
    ranks = {"q_proj": 8, **{t: 4 for t in lora_targets[arch] if t != "q_proj"}} if arch == "llama" else 4
    prewrapped = apply_fused_lora(load_base(), lora_targets[arch], r=ranks, alpha=1)
    load_peft_adapter(prewrapped, tmp_path / "peft_adapter")
    torch.testing.assert_close(logits(prewrapped, token_ids), want, **F32)


def test_save_then_load_round_trip(tmp_path, token_ids, build_model, randomize):
    model = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_fc"], r={"c_attn": 2, "c_fc": 6}, alpha=5)
    randomize(model, seed=6)
    save_peft_adapter(model, tmp_path)
    loaded = load_peft_adapter(build_model("gpt2"), tmp_path)
    assert {n: m.r for n, m in lora_modules(loaded).items()} == {n: m.r for n, m in lora_modules(model).items()}
    got, want = lora_state_dict(loaded), lora_state_dict(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))


@pytest.fixture
def gpt2_adapter(tmp_path, build_model):
    model = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_proj"], r=4, alpha=8)
    return save_peft_adapter(model, tmp_path / "adapter")


def test_load_peft_adapter_missing_files(tmp_path, gpt2_adapter, build_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_peft_adapter(build_model("gpt2"), tmp_path / "nowhere")
    (gpt2_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected adapter_model.safetensors"):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)
    (gpt2_adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json' is missing"):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)


def test_load_peft_adapter_mismatches(gpt2_adapter, build_model):
    other_rank = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_proj"], r=2, alpha=8)
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn': the adapter's lora_A has shape \\(4, 64\\) but the model's has \\(2, 64\\)"):
        load_peft_adapter(other_rank, gpt2_adapter)
    other_targets = apply_fused_lora(build_model("gpt2"), ["c_attn", "c_fc"], r=4, alpha=8)
    with pytest.raises(ValueError, match="in the model but not the adapter \\['transformer.h.0.mlp.c_fc'"):
        load_peft_adapter(other_targets, gpt2_adapter)
    with pytest.raises(ValueError, match="does not have"):
        load_peft_adapter(build_model("llama"), gpt2_adapter)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(r=8), "config gives rank 8 but lora_A has shape \\(4, 64\\)"),
        (dict(use_dora=True), "DoRA"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_load_peft_adapter_bad_config(gpt2_adapter, build_model, changes, match):
    _edit_config(gpt2_adapter, **changes)
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)


def test_load_peft_adapter_bad_tensors(gpt2_adapter, build_model):
    path = gpt2_adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    extra = dict(tensors)
    extra["base_model.model.transformer.wte.lora_embedding_A"] = torch.zeros(4, 128)
    save_file(extra, str(path))
    with pytest.raises(ValueError, match="not plain LoRA weights \\['base_model.model.transformer.wte.lora_embedding_A'\\]"):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)
    lone = {k: v for k, v in tensors.items() if not k.endswith("h.1.attn.c_proj.lora_B.weight")}
    save_file(lone, str(path))
    with pytest.raises(ValueError, match="lacks lora_A or lora_B for modules \\['transformer.h.1.attn.c_proj'\\]"):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)
    bad = dict(tensors)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    bad[key] = torch.zeros(100, 4)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match="maps 64 -> 192 features but .* expect 64 -> 100"):
        load_peft_adapter(build_model("gpt2"), gpt2_adapter)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_peft_cuda_bfloat16(arch, token_ids, build_model, lora_targets):
    # Triton kernels (bf16 adapters cast from PEFT's float32 ones) against PEFT on cuBLAS, both in
    # bf16: logits agree to bf16 rounding. LoRA gradients are moved by bf16 rounding through two
    # layers by a few percent on either side (PEFT's own reach 3-5% on some modules), so each side
    # is measured against a float32 oracle (PEFT in float32 on the same rounded weights): ours
    # must be about as close to it as PEFT's bf16 gradients are.
    pm = peft_wrap(build_model(arch, dtype=torch.bfloat16).cuda(), arch, lora_targets).eval()
    ids = token_ids.cuda()
    want = logits(pm, ids)
    oracle = lora_grads(copy.deepcopy(pm).float(), ids, strip="base_model.model.")
    peft_grads = lora_grads(pm, ids, strip="base_model.model.")
    model = from_peft(pm)
    torch.testing.assert_close(logits(model, ids).float(), want.float(), atol=5e-2, rtol=5e-2)
    got_grads = lora_grads(model, ids)
    for name, pair in oracle.items():
        for which in ("lora_A", "lora_B"):
            ref = pair[which].float()
            err_ours = ((got_grads[name][which].float() - ref).norm() / ref.norm()).item()
            err_peft = ((peft_grads[name][which].float() - ref).norm() / ref.norm()).item()
            assert err_ours <= 2 * err_peft + 1e-2, f"{name}.{which}: {err_ours:.3g} from float32, PEFT {err_peft:.3g}"
