"""model.quantize: one side of the split on a frozen 4-bit base (bitsandbytes NF4/FP4, as QLoRA).

The reference for a 4-bit run is the same run in float32 on a model whose quantized layers hold
their dequantized weights (the values the 4-bit layer computes with): training must give the same
losses and adapters at float32 tolerance (1e-5; only summation order differs). Runs on bitsandbytes'
CPU backend; the file skips when bitsandbytes cannot run here.
"""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from splitlora.adapters import adapter_state
from splitlora.config import ConfigError
from splitlora.strategies import make_strategy
from splitlora.trainer import _generation_model, build, train

from trainer_testutil import tiny_config


def _bnb_or_skip():
    try:
        import bitsandbytes as bnb
        from splitlora.quantize import to_linear4bit

        to_linear4bit(nn.Linear(8, 4), "nf4", "cpu")(torch.randn(2, 8))
    except Exception as err:
        pytest.skip(f"bitsandbytes cannot run a 4-bit layer on this CPU: {err!r}", allow_module_level=True)
    return bnb


bnb = _bnb_or_skip()
from splitlora.quantize import (quantizable_embedding_names, quantizable_names, quantization_state_bytes,  # noqa: E402
                                to_embedding4bit, to_linear4bit)
from splitlora_kernels.layers import FusedLoRALinear, dequantize_4bit_weight  # noqa: E402

F32 = dict(atol=1e-5, rtol=1e-5)
SILENT = dict(log=lambda *_: None)


def _is_4bit(module):
    """A 4-bit linear layer: with an adapter (the fused layer over it) or without."""
    return (isinstance(module, FusedLoRALinear) and module.is_4bit) or isinstance(module, bnb.nn.Linear4bit)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_to_linear4bit_holds_bitsandbytes_own_quantization(quant_type, kind):
    """The 4-bit layer's weight is exactly what bitsandbytes' quantize_4bit makes of the original
    weight (in [out, in], GPT-2's Conv1D transposed), and its product is F.linear with it."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = nn.Linear(64, 32) if kind == "linear" else Conv1D(32, 64)
    weight = layer.weight.detach() if kind == "linear" else layer.weight.detach().t()
    codes, state = bnb.functional.quantize_4bit(weight.contiguous(), quant_type=quant_type, compress_statistics=True)
    expected = bnb.functional.dequantize_4bit(codes, state)
    q = to_linear4bit(layer, quant_type, "cpu")
    got = dequantize_4bit_weight(q.weight, torch.float32)
    assert torch.equal(got, expected)
    assert not torch.equal(got, weight)  # it did quantize
    x = torch.randn(5, 64, requires_grad=True)  # training-mode layout (see tests/kernels/test_4bit.py)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, expected, layer.bias), **F32)


def test_lm_head_and_tied_weights_stay_full_precision(tmp_path):
    cfg = tiny_config(tmp_path, "model.quantize=nf4", "model.quantize_side=both")
    built = build(cfg, **SILENT)
    s = built.setup
    for name in quantizable_names(s.server):
        assert "lm_head" not in name
    server_modules = dict(s.server.named_modules())
    assert not any(_is_4bit(m) for n, m in server_modules.items() if n.endswith("lm_head"))
    assert any(isinstance(m, nn.Embedding) for m in s.client.modules())


@pytest.mark.parametrize("side, client_4bit, server_4bit", [
    ("client", True, False), ("server", False, True), ("both", True, True)])
def test_quantize_side_picks_the_segments(tmp_path, side, client_4bit, server_4bit):
    cfg = tiny_config(tmp_path, "model.quantize=nf4", f"model.quantize_side={side}")
    s = build(cfg, **SILENT).setup
    client = [m for m in s.client.modules() if isinstance(m, FusedLoRALinear)]
    server = [m for n, m in s.server.named_modules() if isinstance(m, FusedLoRALinear) and n != "lm_head"]
    assert client and server
    assert all(m.is_4bit == client_4bit for m in client)
    # The server's adapted layers follow the side; its LM head (adapted here too) never is 4-bit.
    assert all(m.is_4bit == server_4bit for m in server)
    assert not s.server.lm_head.is_4bit
    expected = [n for n, m in s.client.named_modules() if _is_4bit(m)] if client_4bit else []
    assert sorted(s.quantized_modules) == sorted(
        ([s.client.full_model_name(n) for n in expected])
        + ([s.server.full_model_name(n) for n, m in s.server.named_modules() if _is_4bit(m)] if server_4bit else []))


def test_client_weights_shrink_by_the_packed_size(tmp_path):
    """side_memory counts a 4-bit layer as its packed codes plus its block scales: the client's
    weights drop by (4 bytes - 0.5 byte) per quantized weight element less the scales."""
    plain = make_strategy(build(tiny_config(tmp_path, name="plain"), **SILENT).setup)
    quant_built = build(tiny_config(tmp_path, "model.quantize=nf4", name="q"), **SILENT)
    quant = make_strategy(quant_built.setup)
    layers = [m for m in quant.parts[0].modules() if _is_4bit(m)]
    elements = sum(m.in_features * m.out_features for m in layers)
    scales = quantization_state_bytes(quant.parts[0].modules())
    assert scales > 0
    before = plain._client_memory(0)["weights_bytes"]
    after = quant._client_memory(0)["weights_bytes"]
    assert before - after == elements * 4 - elements // 2 - scales


def _dequantized_copy(folder, out, quant_type, client_layers, embeddings):
    """The saved model with each client-side quantizable linear weight (decoder layers
    `client_layers`; and with `embeddings` the token and position embeddings) replaced by the
    values the 4-bit layer computes with: the float32 reference of a model.quantize run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    names = [n for n in quantizable_names(model)
             if n.startswith("transformer.h.") and int(n.split(".")[2]) in client_layers]
    assert names
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            deq = dequantize_4bit_weight(to_linear4bit(layer, quant_type, "cpu").weight, torch.float32)
            layer.weight.copy_(deq.t() if type(layer).__name__ == "Conv1D" else deq)
        if embeddings:
            assert quantizable_embedding_names(model) == ["transformer.wte", "transformer.wpe"]
            for name in ("transformer.wte", "transformer.wpe"):
                q = to_embedding4bit(model.get_submodule(name), quant_type, "cpu")
                model.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(q.weight.data,
                                                                                       q.weight.quant_state))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("strategy, u_shape, embeddings", [
    ("splitlora", False, False), ("sl", False, False), ("splitlora", True, False), ("splitlora", False, True)])
def test_training_on_4bit_equals_float32_on_the_dequantized_weights(tmp_path, strategy, u_shape, embeddings):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    # Untied: the reference changes the embedding table in place, which a tied LM head would follow
    # (the run's server keeps its head in float32).
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=96, vocab_size=200,
                        activation_function="gelu_pytorch_tanh", tie_word_embeddings=not embeddings)
    folder = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    cut, server_end = 2, 3
    # The U-shape's client also holds the tail (layers from server_end on).
    client_layers = [0, 1, 3] if u_shape else [0, 1]
    reference_folder = _dequantized_copy(folder, tmp_path / "deq", "nf4", client_layers, embeddings)
    tokenizer = tmp_path / "words.json"
    from splitlora.data import WordTokenizer, load_dataset

    train_set, evals = load_dataset("synthetic", num_train=120, num_eval=16, seed=0)
    WordTokenizer.from_examples(train_set + evals).save(tokenizer)
    common = ["model.config=null", f"data.tokenizer={tokenizer}", f"strategy={strategy}",
              f"model.cut_layer={cut}", f"train.u_shape={str(u_shape).lower()}"]
    if u_shape:
        common.append(f"model.server_end={server_end}")
    quant_cfg = tiny_config(tmp_path, *common, f"model.path={folder}", "model.quantize=nf4",
                            f"model.quantize_embeddings={str(embeddings).lower()}", name="q")
    quant = train(quant_cfg, progress=False, **SILENT)
    ref = train(tiny_config(tmp_path, *common, f"model.path={reference_folder}", name="ref"), progress=False, **SILENT)
    steps = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["type"] == "step"] for name in ("q", "ref")}
    assert len(steps["q"]) == 6
    torch.testing.assert_close(torch.tensor(steps["q"]), torch.tensor(steps["ref"]), **F32)
    torch.testing.assert_close(torch.tensor(quant["eval_loss"]), torch.tensor(ref["eval_loss"]), **F32)
    adapters = {name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("q", "ref")}
    assert adapters["q"].keys() == adapters["ref"].keys()
    for key in adapters["q"]:
        torch.testing.assert_close(adapters["q"][key], adapters["ref"][key], **F32)

@pytest.mark.parametrize("embeddings", [False, True])
def test_generation_model_is_quantized_like_the_segments(tmp_path, embeddings):
    """The whole model the evaluation generates with computes what the trained 4-bit segments
    compute (not the full-precision base the export points to). The demo GPT-2 ties its LM head
    to the token embedding: with the embedding in 4 bits, the head stays in float32, as the server's."""
    cfg = tiny_config(tmp_path, "model.quantize=nf4", "model.quantize_side=both",
                      f"model.quantize_embeddings={str(embeddings).lower()}")
    built = build(cfg, **SILENT)
    assert ("transformer.wte" in built.setup.quantized_modules) == embeddings
    strategy = make_strategy(built.setup)
    for step in range(3):
        strategy.train_step(step)
    strategy.end_round(2)
    strategy.train(False)
    whole = _generation_model(strategy, built)
    assert sum(_is_4bit(m) or isinstance(m, bnb.nn.Embedding4bit) for m in whole.modules()) == len(
        built.setup.quantized_modules)
    assert not isinstance(whole.lm_head.weight, bnb.nn.Params4bit)
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        split_logits = strategy.logits_fn()(ids, mask)
        whole_logits = whole(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(whole_logits, split_logits, **F32)
    # The adapters trained (the comparison is not of an untouched model).
    assert any(v.abs().sum() > 0 for k, v in adapter_state(strategy.server).items() if "lora_B" in k)


@pytest.mark.parametrize("override, message", [
    ("model.quantize=int3", "model.quantize: must be one of nf4, fp4"),
    ("model.quantize_side=top", "model.quantize_side: must be one of client, server, both"),
    ("model.quantize_embeddings=true", "model.quantize_embeddings: needs model.quantize"),
])
def test_bad_values_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)


def test_embeddings_of_the_server_side_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="the input embedding is the client's"):
        tiny_config(tmp_path, "model.quantize=nf4", "model.quantize_side=server", "model.quantize_embeddings=true")


def test_tied_and_scaled_embeddings_are_left_alone():
    """A table shared with a layer of the same module (a tied head) or an Embedding subclass (whose
    forward may scale, as Gemma's) is not quantized."""
    class Scaled(nn.Embedding):
        pass

    tied = nn.ModuleDict({"emb": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False),
                          "scaled": Scaled(10, 8), "pos": nn.Embedding(4, 8)})
    tied["head"].weight = tied["emb"].weight
    assert quantizable_embedding_names(tied) == ["pos"]


@pytest.mark.parametrize("strategy", ["fedlora", "centralized", "hsplitlora", "fedcybgd"])
def test_other_strategies_are_refused_by_name(tmp_path, strategy):
    with pytest.raises(ConfigError, match=f"splitlora or sl .*'{strategy}' is not supported"):
        tiny_config(tmp_path, "model.quantize=nf4", f"strategy={strategy}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("cols", [64, 96, 40])
def test_embedding_quantized_in_chunks_equals_at_once(monkeypatch, quant_type, cols):
    """The piecewise quantization of a table (which bounds bitsandbytes' temporaries) gives exactly
    the codes and scales of quantizing it whole, for widths that fill blocks of 64 and that do not;
    the 4-bit embedding looks rows up as the dequantized table."""
    import splitlora.quantize as quantize_mod

    monkeypatch.setattr(quantize_mod, "CHUNK_ELEMENTS", 1000)  # several pieces
    table = torch.randn(101, cols)
    codes, state = quantize_mod.quantize_4bit_in_chunks(table, quant_type, "cpu")
    whole_codes, whole_state = bnb.functional.quantize_4bit(table, blocksize=64, compress_statistics=False,
                                                            quant_type=quant_type)
    assert torch.equal(codes, whole_codes) and torch.equal(state.absmax, whole_state.absmax)
    embedding = to_embedding4bit(nn.Embedding(101, cols, _weight=table), quant_type, "cpu")
    ids = torch.randint(0, 101, (3, 7))
    expected = bnb.functional.dequantize_4bit(whole_codes, whole_state)[ids]
    torch.testing.assert_close(embedding(ids), expected, atol=0, rtol=0)
