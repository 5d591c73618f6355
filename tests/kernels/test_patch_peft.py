"""patch_peft / unpatch: a PeftModel stays a PeftModel while its LoRA linears run the fused op.

Every comparison is float32 on CPU, where `lora_linear` runs the plain-torch reference (no Triton
interpreter in the hot path): PEFT computes base(x) + B(A(x)) * s with the same float32 ops, so only
summation order may differ; the stated tolerance is F32 (1e-5). A spy on the op (`fused_calls`)
checks that the fused path really ran, or really did not when PEFT's path must be taken.
"""
import copy
import logging

import pytest
import torch

import splitlora_kernels
from splitlora_kernels import PatchReport, patch_peft, unpatch
from splitlora_kernels import patch as patch_mod

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

F32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that grows by one entry per call of the fused op made by a patched layer."""
    calls = []
    real = patch_mod.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_mod, "lora_linear", spy)
    return calls


@pytest.fixture
def make_peft(build_model, lora_targets):
    """make_peft(arch, seed=0, adapter_seed=1, **LoraConfig fields) -> a PeftModel with random
    non-zero adapters; equal arguments give identical models."""

    def make(arch, seed=0, adapter_seed=1, adapter_name="default", **config):
        base = build_model(arch, seed=seed)
        cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets[arch],
                   fan_in_fan_out=(arch == "gpt2"))
        cfg.update(config)
        pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **cfg), adapter_name=adapter_name)
        randomize_adapter(pm, adapter_name, adapter_seed)
        return pm

    return make


def randomize_adapter(model, adapter_name, seed, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ("lora_A" in name or "lora_B" in name) and f".{adapter_name}." in name + ".":
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, ids):
    torch.manual_seed(123)  # GPT-2's own (attention/residual) dropout draws in training mode
    with torch.no_grad():
        return model(ids).logits


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    return grads


def n_lora_linears(model):
    return sum(type(m) is lora_layer.Linear for m in model.modules())


# --------------------------------------------------------------------------------------------
# Outputs and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patched_matches_peft_outputs_and_every_lora_gradient(arch, make_peft, token_ids, fused_calls, caplog):
    ref, pm = make_peft(arch), make_peft(arch)
    ref.train()
    pm.train()  # lora_dropout=0: training mode must equal PEFT exactly as well
    want_logits, want_grads = logits(ref, token_ids), lora_grads(ref, token_ids)

    with caplog.at_level(logging.INFO, logger="splitlora_kernels.patch"):
        report = patch_peft(pm)
    assert isinstance(report, PatchReport)
    assert len(report.patched) == n_lora_linears(pm) > 0 and report.skipped == {}
    assert any("LoRA layers fused" in r.getMessage() for r in caplog.records)
    assert isinstance(pm, PeftModel)  # the wrapper is untouched

    got = logits(pm, token_ids)
    assert len(fused_calls) == len(report.patched)  # every LoRA linear ran the fused op once
    torch.testing.assert_close(got, want_logits, **F32)
    got_grads = lora_grads(pm, token_ids)
    assert set(got_grads) == set(want_grads) and len(got_grads) == 2 * len(report.patched)
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name  # B random and non-zero: both A and B get a gradient
        torch.testing.assert_close(got_grads[name], g, **F32, msg=name)


def test_patched_base_weight_requires_no_grad_and_adapters_train(make_peft, token_ids):
    """One optimizer step on the patched model moves PEFT's own adapter parameters exactly as an
    unpatched step does."""
    ref, pm = make_peft("llama"), make_peft("llama")
    patch_peft(pm)
    for model in (ref, pm):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        torch.testing.assert_close(p, ref_params[name], **F32, msg=name)
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def test_dropout_training_mode_reproducible_and_differs_from_eval(make_peft, token_ids, fused_calls):
    pm = make_peft("llama", lora_dropout=0.3)
    patch_peft(pm)
    pm.eval()
    eval_logits = logits(pm, token_ids)
    torch.testing.assert_close(eval_logits, logits(make_peft("llama", lora_dropout=0.3).eval(), token_ids), **F32)
    assert set(fused_calls) == {0.3}
    pm.train()

    def seeded(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return pm(token_ids).logits

    a, b, c = seeded(7), seeded(7), seeded(8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same mask
    assert (a - eval_logits).abs().max() > 1e-3  # dropout is applied in training mode
    assert (a - c).abs().max() > 1e-3  # and drawn from torch's RNG


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_is_inverted_dropout_with_peft_p(make_peft, p):
    """Recover the mask one patched layer applied to x: lora_A selects the first r input features,
    so (y - base(x)) / s = (mask * x)[:, :r] @ B.T; every mask value must be 0 or 1/(1-p), and the
    dropped fraction must be p (PEFT's dropout probability, changed after patching to prove it is
    read at call time)."""
    pm = make_peft("llama", lora_dropout=0.1, r=8, lora_alpha=16)
    patch_peft(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_dropout["default"].p = p
    r = 8
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(r, 64))
        layer.lora_B["default"].weight.copy_(torch.randn(64, r, generator=torch.Generator().manual_seed(3)))
    pm.train()
    x = torch.rand(2048, 64, generator=torch.Generator().manual_seed(4)) + 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        y = layer(x)
        low = (y - layer.base_layer(x)) / layer.scaling["default"]
        xa = torch.linalg.lstsq(layer.lora_B["default"].weight, low.T).solution.T  # [tokens, r]
    mask = xa / x[:, :r]
    kept = (mask - 1 / (1 - p)).abs() < 1e-3
    dropped = mask.abs() < 1e-3
    assert bool((kept | dropped).all()), "mask values other than 0 and 1/(1-p)"
    assert abs(dropped.float().mean().item() - p) < 0.03
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), type(layer).forward(layer, x), **F32)  # eval: no dropout


# --------------------------------------------------------------------------------------------
# What PEFT offers keeps working
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_pretrained_after_training_loads_in_plain_peft(arch, make_peft, build_model, token_ids, tmp_path):
    pm = make_peft(arch)
    patch_peft(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        pm(token_ids, labels=token_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(pm, token_ids)
    assert (trained - logits(make_peft(arch), token_ids)).abs().max() > 1e-4  # training changed it
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)  # plain PEFT, never patched
    assert not any(patch_mod.is_patched(m) for m in loaded.modules())
    torch.testing.assert_close(logits(loaded, token_ids), trained, **F32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_and_unload_and_merge_adapter(arch, make_peft, token_ids, fused_calls):
    pm = make_peft(arch)
    report = patch_peft(pm)
    patched = logits(pm, token_ids)

    pm.merge_adapter()  # merged layers: PEFT's path (the base weight already holds B @ A)
    fused_calls.clear()
    torch.testing.assert_close(logits(pm, token_ids), patched, **F32)
    assert fused_calls == []
    pm.unmerge_adapter()
    torch.testing.assert_close(logits(pm, token_ids), patched, **F32)
    assert len(fused_calls) == len(report.patched)

    merged = pm.merge_and_unload()
    assert n_lora_linears(merged) == 0
    torch.testing.assert_close(logits(merged, token_ids), patched, **F32)


def test_disable_adapter_gives_base_logits(make_peft, build_model, token_ids, fused_calls):
    pm = make_peft("gpt2")
    patch_peft(pm)
    base = logits(build_model("gpt2"), token_ids)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, token_ids), base, **F32)
    assert fused_calls == []
    adapted = logits(pm, token_ids)
    assert fused_calls and (adapted - base).abs().max() > 1e-3


def test_set_adapter_between_two_adapters(make_peft, token_ids, fused_calls, lora_targets):
    def two_adapters():
        pm = make_peft("llama", adapter_name="a", adapter_seed=1)
        pm.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        randomize_adapter(pm, "b", seed=2)
        return pm

    ref, pm = two_adapters(), two_adapters()
    want = {}
    for name in ("a", "b"):
        ref.set_adapter(name)
        want[name] = logits(ref, token_ids)
    assert (want["a"] - want["b"]).abs().max() > 1e-3
    report = patch_peft(pm)
    assert len(report.patched) == n_lora_linears(pm)
    for name in ("b", "a", "b"):
        pm.set_adapter(name)
        fused_calls.clear()
        torch.testing.assert_close(logits(pm, token_ids), want[name], **F32)
        assert len(fused_calls) == (4 if name == "b" else len(report.patched))  # b: q,v of 2 layers
    # Layers with no adapter "b" (k_proj, ...) ran PEFT's path when "b" was active: their result is
    # the base layer, which the comparison above covers.

    # Both adapters active at once: not representable by one fused call, PEFT's path.
    pm.base_model.set_adapter(["a", "b"])
    ref.base_model.set_adapter(["a", "b"])
    fused_calls.clear()
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)
    assert len(fused_calls) == len(report.patched) - 4  # only layers where just "a" exists


def test_mixed_batch_adapter_names_falls_back(make_peft, token_ids, fused_calls):
    ref, pm = make_peft("llama").eval(), make_peft("llama").eval()  # PEFT: inference only
    patch_peft(pm)
    names = ["default", "__base__"]
    with torch.no_grad():
        want = ref(token_ids, adapter_names=names).logits
        got = pm(token_ids, adapter_names=names).logits
    assert fused_calls == []
    torch.testing.assert_close(got, want, **F32)


# --------------------------------------------------------------------------------------------
# Layers the fused op does not represent
# --------------------------------------------------------------------------------------------


def test_dora_model_not_patched_and_still_peft(make_peft, token_ids, fused_calls):
    ref, pm = make_peft("llama", use_dora=True), make_peft("llama", use_dora=True)
    report = patch_peft(pm)
    assert report.patched == []
    assert len(report.skipped) == n_lora_linears(pm) > 0
    assert all("DoRA" in reason for reason in report.skipped.values())
    assert "DoRA" in report.summary()
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)
    assert fused_calls == []


def test_dora_adapter_beside_plain_adapter_falls_back_at_call_time(make_peft, token_ids, fused_calls):
    def model():
        pm = make_peft("llama", target_modules=["q_proj", "v_proj"])
        pm.add_adapter("dora", LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                          target_modules=["q_proj", "v_proj"]))
        randomize_adapter(pm, "dora", seed=5)
        return pm

    ref, pm = model(), model()
    report = patch_peft(pm)
    assert len(report.patched) == 4  # "default" is plain LoRA on every layer
    pm.set_adapter("dora")
    ref.set_adapter("dora")
    fused_calls.clear()
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)
    assert fused_calls == []
    pm.set_adapter("default")
    ref.set_adapter("default")
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)
    assert len(fused_calls) == 4


def test_embedding_lora_reported_and_linears_patched(make_peft, token_ids, fused_calls):
    targets = ["embed_tokens", "q_proj"]
    ref, pm = make_peft("llama", target_modules=targets), make_peft("llama", target_modules=targets)
    report = patch_peft(pm)
    assert len(report.patched) == 2 and all(n.endswith("q_proj") for n in report.patched)
    (name, reason), = report.skipped.items()
    assert name.endswith("embed_tokens") and "Embedding" in reason
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)
    assert len(fused_calls) == 2


def test_lora_bias_not_patched(make_peft, token_ids, fused_calls):
    ref = make_peft("llama", lora_bias=True, target_modules=["q_proj"])
    pm = make_peft("llama", lora_bias=True, target_modules=["q_proj"])
    report = patch_peft(pm)
    assert report.patched == [] and all("lora_bias" in r for r in report.skipped.values())
    torch.testing.assert_close(logits(pm, token_ids), logits(ref, token_ids), **F32)


# --------------------------------------------------------------------------------------------
# unpatch, idempotence, copies
# --------------------------------------------------------------------------------------------


def test_unpatch_restores_original_forward_and_patch_is_idempotent(make_peft, token_ids, fused_calls):
    pm = make_peft("gpt2")
    layers = [m for m in pm.modules() if type(m) is lora_layer.Linear]
    assert all(m.forward.__func__ is lora_layer.Linear.forward for m in layers)
    first = patch_peft(pm)
    installed = [m.forward for m in layers]
    assert all(patch_mod.is_patched(m) for m in layers)
    assert all(m.forward.__func__ is not lora_layer.Linear.forward for m in layers)
    second = patch_peft(pm)
    assert second.patched == first.patched
    assert all(m.forward is f for m, f in zip(layers, installed))  # not wrapped twice

    patched = logits(pm, token_ids)
    assert unpatch(pm) == first.patched
    assert all("forward" not in m.__dict__ for m in layers)
    assert all(m.forward.__func__ is lora_layer.Linear.forward for m in layers)  # identity
    fused_calls.clear()
    torch.testing.assert_close(logits(pm, token_ids), patched, **F32)
    assert fused_calls == []
    assert unpatch(pm) == []


def test_deepcopy_of_patched_model_is_patched_on_its_own_layers(make_peft, token_ids, fused_calls):
    pm = make_peft("llama")
    report = patch_peft(pm)
    clone = copy.deepcopy(pm)
    for m in clone.modules():
        if patch_mod.is_patched(m):
            assert m.forward.__self__ is m
    fused_calls.clear()
    torch.testing.assert_close(logits(clone, token_ids), logits(pm, token_ids), **F32)
    assert len(fused_calls) == 2 * len(report.patched)


def test_exports_and_bad_argument():
    assert splitlora_kernels.patch_peft is patch_peft and splitlora_kernels.unpatch is unpatch
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_peft("not a model")


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


def _train_dataset(n=4, length=12):
    # One batch of 4, seen at every step: the loss must go down.
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 128, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def _run_hf_trainer(model, out_dir):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_train_dataset())
    trainer.train()
    return trainer, [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("arch", ["gpt2"])
def test_hf_trainer_same_losses_and_adapter_loads_in_peft(arch, make_peft, build_model, token_ids, tmp_path,
                                                          fused_calls):
    _, want = _run_hf_trainer(make_peft(arch), tmp_path / "ref")
    pm = make_peft(arch)
    patch_peft(pm)
    trainer, got = _run_hf_trainer(pm, tmp_path / "patched")
    assert trainer.model is pm and fused_calls  # Trainer trained the patched PeftModel itself
    assert len(got) == len(want) == 4
    # float32 on CPU, same ops in another order: per-step loss and grad norm to 1e-5 relative.
    for (loss, gnorm), (loss_ref, gnorm_ref) in zip(got, want):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert gnorm == pytest.approx(gnorm_ref, rel=1e-5)
    assert want[-1][0] < want[0][0]  # it trained

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, token_ids), logits(pm.eval(), token_ids), **F32)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    vocab["<pad>"] = 0  # shares id 0 with bos/eos, as in the tiny models' configs
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="t0", unk_token="t1")


def _run_sft(model, out_dir):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    gen = torch.Generator().manual_seed(98)
    data = Dataset.from_dict({"input_ids": torch.randint(2, 128, (16, 12), generator=gen).tolist()})
    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, packing=False,
        bf16=False,  # TRL's default is bf16 autocast (also on CPU); this compares float32
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tiny_tokenizer())
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_with_patched_peft_model(make_peft, build_model, token_ids, tmp_path, fused_calls):
    """The way to use the patch with TRL: build the PeftModel, patch it, pass it to SFTTrainer
    without peft_config (with peft_config SFTTrainer would wrap a plain model in PEFT itself, after
    any patch could be applied)."""
    _, want = _run_sft(make_peft("llama"), tmp_path / "ref")
    pm = make_peft("llama")
    patch_peft(pm)
    trainer, got = _run_sft(pm, tmp_path / "patched")
    assert trainer.model is pm and fused_calls
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-5)
    assert (logits(pm.eval(), token_ids) - logits(make_peft("llama"), token_ids)).abs().max() > 1e-3  # it trained
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, token_ids), logits(pm.eval(), token_ids), **F32)


# --------------------------------------------------------------------------------------------
# Lower precision: bf16 base with PEFT's float32 adapters, and float32 under CPU autocast
# --------------------------------------------------------------------------------------------


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("mode", ["bf16-base", "autocast"])
def test_low_precision_close_to_peft(mode, make_peft, build_model, lora_targets, token_ids, fused_calls):
    """bf16 arithmetic in another order: PEFT adds a float32 low-rank term (bf16 base) or rounds at
    other points, so only closeness is asserted (stated bounds: logits within 0.05 absolute with
    cosine > 0.9995; every LoRA gradient cosine > 0.995, float32 like the adapters)."""

    def model():
        if mode == "autocast":
            return make_peft("llama")
        base = build_model("llama", dtype=torch.bfloat16)
        pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                             target_modules=lora_targets["llama"]))
        randomize_adapter(pm, "default", 1)
        return pm

    ref, pm = model(), model()
    report = patch_peft(pm)
    results = []
    for m in (ref, pm):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "autocast")):
            out = m(token_ids, labels=token_ids)
        out.loss.backward()
        results.append((out.logits.float().detach(),
                        {n: p.grad for n, p in m.named_parameters() if "lora_" in n}))
    assert len(fused_calls) == len(report.patched)
    (want, want_g), (got, got_g) = results
    assert (got - want).abs().max() < 0.05 and _cosine(got, want) > 0.9995
    for name, g in want_g.items():
        assert got_g[name].dtype == torch.float32 == g.dtype, name
        assert _cosine(got_g[name], g) > 0.995, name
