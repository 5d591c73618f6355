"""splitlora.architectures: the registry, the newer families (qwen3, gemma2, gemma3_text, phi3,
olmo2) split exactly, check_split catches a wrong entry, all-linear targets, adapter dtype."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import splitlora
from splitlora.adapters import LoraSpec, add_lora, check_targets_exist
from splitlora.architectures import (
    Architecture,
    check_split,
    get_architecture,
    register_architecture,
    supported_model_types,
)
from splitlora.architectures import registry
from splitlora.architectures.gemma2 import Gemma2Architecture
from splitlora.architectures.gemma3 import Gemma3TextArchitecture
from splitlora.architectures.llama import LayerTypesArchitecture
from splitlora.models import load_bottom_layers, load_causal_lm
from splitlora.split import split_model, split_model_u_shape
from splitlora_kernels.layers import FusedLoRALinear, lora_modules
from trainer_testutil import tiny_config

transformers = pytest.importorskip("transformers")

VOCAB = 128
LAYERS = 4
T = 8
WINDOW = 3  # shorter than T: sliding-window layers really see less than full ones
SMALL = dict(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# `load_causal_lm(config=...)` dicts (without vocab_size, which the trainer fills from its tokenizer).
NEW_FAMILIES = {
    # layer_types from use_sliding_window + max_window_layers: full, full, sliding, sliding.
    "qwen3": dict(SMALL, head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "gemma2": dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=MIXED,
                   final_logit_softcapping=3.0, attn_logit_softcapping=20.0),
    "gemma3_text": dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=MIXED,
                        final_logit_softcapping=3.0),
    "phi3": dict(SMALL, sliding_window=WINDOW),
    "olmo2": dict(SMALL),
}


def config_of(model_type, **extra):
    return dict(NEW_FAMILIES[model_type], model_type=model_type, vocab_size=VOCAB, **extra)


@pytest.fixture(scope="module")
def models():
    return {t: load_causal_lm(config=config_of(t), seed=0)[0] for t in NEW_FAMILIES}


@pytest.fixture
def restore_registry():
    saved = dict(registry._ARCHITECTURES)
    yield
    registry._ARCHITECTURES.clear()
    registry._ARCHITECTURES.update(saved)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (3, T), generator=g)
    attention_mask = torch.ones(3, T, dtype=torch.long)  # right padding, rows of different lengths
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    return input_ids, attention_mask


def test_registry_lists_the_new_families():
    types = supported_model_types()
    assert types[:4] == ("gpt2", "llama", "qwen2", "mistral")
    assert set(NEW_FAMILIES) <= set(types)
    assert all(isinstance(get_architecture(t), Architecture) for t in types)
    assert splitlora.register_architecture is register_architecture


@pytest.mark.parametrize("model_type", list(NEW_FAMILIES))
def test_split_equals_whole_model_for_every_cut(models, model_type):
    model = models[model_type]
    assert type(model).__name__.endswith("ForCausalLM")
    kinds = getattr(model.config, "layer_types", None)
    if model_type in ("qwen3", "gemma2", "gemma3_text"):  # the configs mix both attention kinds
        assert set(kinds) == {"sliding_attention", "full_attention"}
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        for cut in range(1, LAYERS):
            client, server = split_model(model, cut)
            torch.testing.assert_close(server(client(input_ids, attention_mask), attention_mask), expected,
                                       atol=1e-5, rtol=0)
        for cut, end in itertools.combinations(range(1, LAYERS), 2):
            client, server, tail = split_model_u_shape(model, cut, end)
            logits = tail(server(client(input_ids, attention_mask), attention_mask), attention_mask)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert check_split(model, 2) <= 1e-4 and check_split(model, 1, 3) <= 1e-4


def test_gemma_specifics_are_in_effect(models):
    """The features the architectures reproduce really change the output of these small models,
    so the equality above covers them."""
    gemma2 = models["gemma2"]
    input_ids, attention_mask = batch()
    with torch.no_grad():
        logits = gemma2(input_ids, attention_mask=attention_mask).logits
        assert float(logits.abs().max()) <= gemma2.config.final_logit_softcapping  # soft-capped
        plain = F.embedding(input_ids, gemma2.model.embed_tokens.weight)
        scaled = gemma2.model.embed_tokens(input_ids)
    torch.testing.assert_close(scaled, plain * gemma2.config.hidden_size**0.5)
    rotary = models["gemma3_text"].model.rotary_emb
    assert not torch.equal(rotary.sliding_attention_inv_freq, rotary.full_attention_inv_freq)  # local vs global RoPE


@pytest.mark.parametrize("model_type", list(NEW_FAMILIES))
def test_bottom_layers_alone_give_the_same_client_segment(tmp_path, models, model_type):
    model = models[model_type]
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = batch(seed=2)
    for cut in (1, 2):
        skeleton, _ = load_bottom_layers(cut, path=tmp_path)
        client, server = split_model(skeleton, cut)
        assert all(p.is_meta for p in server.parameters())
        with torch.no_grad():
            torch.testing.assert_close(client(input_ids, attention_mask),
                                       split_model(model, cut)[0](input_ids, attention_mask), atol=0, rtol=0)
        if model_type == "gemma3_text":
            # Below the first full-attention layer the bottom model builds only the local RoPE table;
            # the skeleton still holds both, as the whole model does.
            for kind in ("sliding", "full"):
                name = f"{kind}_attention_inv_freq"
                assert torch.equal(getattr(skeleton.model.rotary_emb, name), getattr(model.model.rotary_emb, name))


def _run_steps(cfg, steps):
    from splitlora.strategies import make_strategy
    from splitlora.trainer import build

    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    losses = [strategy.train_step(step).loss for step in range(steps)]
    return built, strategy, losses


@pytest.mark.parametrize("model_type", list(NEW_FAMILIES))
def test_one_client_splitlora_equals_centralized(tmp_path, model_type):
    model_config = {k: v for k, v in config_of(model_type).items() if k != "vocab_size"}
    model_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # the tokenizer's
    common = [f"model.config={json.dumps(model_config)}",  # JSON is YAML
              "model.cut_layer=2", "train.clients=1", "codec.bits=32",
              "train.aggregate_every=100", "train.max_grad_norm=null", "train.lr=0.01", "data.synthetic_examples=40",
              "lora.client.target_modules=[all-linear]", "lora.server.target_modules=[all-linear]"]
    built, sfl, sfl_losses = _run_steps(tiny_config(tmp_path, "strategy=splitlora", *common), 2)
    assert built.setup.base_model.config.model_type == model_type
    # all-linear: every linear layer of the client's two decoder layers has an adapter.
    client = built.setup.client
    linear = {n for n, m in client.named_modules() if isinstance(m, (torch.nn.Linear, FusedLoRALinear))}
    assert linear and set(lora_modules(client)) == linear
    if model_type == "phi3":  # its fused projections are plain linear layers, adapted whole
        assert {"layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj"} <= linear
    _, cen, cen_losses = _run_steps(tiny_config(tmp_path, "strategy=centralized", *common), 2)
    a, b = sfl.export_state()[1], cen.export_state()[1]
    assert set(a) == set(b) and len(a) > 0
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert sfl_losses == pytest.approx(cen_losses, rel=1e-5)


# ---- the safety net ------------------------------------------------------------------------


class _NoEmbeddingScale(Gemma2Architecture):
    def embed(self, segment, input_ids, position_ids):
        return F.embedding(input_ids, segment.embed_tokens.weight)  # forgets sqrt(hidden_size)


class _AllFullAttention(LayerTypesArchitecture):
    def layer_kind(self, config, index):
        return "full_attention"  # ignores layer_types


class _NoSoftcap(Gemma2Architecture):
    def head_logits(self, segment, hidden):
        return segment.lm_head(hidden)


class _GlobalRopeEverywhere(Gemma3TextArchitecture):
    def position_embeddings(self, segment, hidden, position_ids, kinds):
        return {kind: segment.rotary_emb(hidden, position_ids, "full_attention") for kind in kinds}


@pytest.mark.parametrize("model_type, wrong, match", [
    ("gemma2", _NoEmbeddingScale(), r"decoder layer 0 is the first whose output differs.*the embeddings"),
    # qwen3's layers 0 and 1 are full-attention anyway: the first to differ is layer 2.
    ("qwen3", _AllFullAttention(), r"decoder layer 2 is the first whose output differs.*layers 0\.\.1 equal"),
    ("gemma3_text", _GlobalRopeEverywhere(), r"decoder layer 0 is the first whose output differs"),
    ("gemma2", _NoSoftcap(), r"every decoder layer's output matches but the logits differ"),
], ids=["no-embedding-scale", "wrong-layer-kind", "wrong-rotary", "no-softcap"])
def test_check_split_names_the_first_differing_layer(models, restore_registry, model_type, wrong, match):
    model = models[model_type]
    check_split(model, 3)  # the registered entry passes
    register_architecture(model_type, wrong, overwrite=True)
    for server_end in (None, 3):
        with pytest.raises(ValueError, match=rf"'{model_type}' model.*{match}.*overwrite=True"):
            check_split(model, 1, server_end)


def test_check_split_leaves_the_model_as_it_was(models):
    model = models["gemma3_text"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.model.layers[1].eval()
    rng = torch.get_rng_state()
    try:
        check_split(model, 2)
        assert torch.equal(torch.get_rng_state(), rng)
        assert model.training and model.model.layers[0].training and not model.model.layers[1].training
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        model.eval()


def test_check_split_in_half_precision_and_refusals(models):
    model = load_causal_lm(config=config_of("gemma2"), seed=0, dtype=torch.bfloat16)[0]
    assert check_split(model, 2) <= 3e-2
    with pytest.raises(ValueError, match="tokens must be an integer >= 2"):
        check_split(models["olmo2"], 2, tokens=1)
    with pytest.raises(ValueError, match=r"cut_layer must be in \[1, 3\]"):
        check_split(models["olmo2"], 4)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(models["olmo2"].config)
    with pytest.raises(ValueError, match="meta device"):
        check_split(meta, 2)


# ---- registering a family from outside ------------------------------------------------------


class TinyConfig(transformers.LlamaConfig):
    model_type = "tiny_custom"


class TinyArchitecture(Architecture):
    """Written from scratch, as a user would, for a Llama-shaped model."""

    backbone, embeddings, layers, final_norm, rotary = "model", ("embed_tokens",), "layers", "norm", "rotary_emb"

    def embed(self, segment, input_ids, position_ids):
        return segment.embed_tokens(input_ids)

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        return layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)


def test_register_a_family_from_outside(restore_registry):
    torch.manual_seed(0)
    config = TinyConfig(**{k: v for k, v in SMALL.items()}, vocab_size=VOCAB)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.model_type == "tiny_custom"
    with pytest.raises(ValueError, match="'tiny_custom'.*supported model types.*register_architecture"):
        split_model(model, 2)
    register_architecture("tiny_custom", TinyArchitecture())
    assert supported_model_types()[-1] == "tiny_custom"
    from splitlora.split import SUPPORTED_MODEL_TYPES  # reflects the registry when read
    assert "tiny_custom" in SUPPORTED_MODEL_TYPES

    input_ids, attention_mask = batch(seed=3)
    client, server = split_model(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(server(client(input_ids, attention_mask), attention_mask),
                                   model(input_ids, attention_mask=attention_mask).logits, atol=1e-5, rtol=0)
    assert check_split(model, 1, 2) <= 1e-4

    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_architecture("tiny_custom", TinyArchitecture())
    with pytest.raises(ValueError, match="got the class TinyArchitecture"):
        register_architecture("tiny_custom", TinyArchitecture, overwrite=True)
    with pytest.raises(ValueError, match="must be an instance of splitlora.architectures.Architecture"):
        register_architecture("other", object())
    with pytest.raises(ValueError, match="not a complete Architecture: backbone"):
        register_architecture("other", Architecture())
    with pytest.raises(ValueError, match="model_type must be a non-empty string"):
        register_architecture("", TinyArchitecture())
    assert "other" not in supported_model_types()


# ---- all-linear and the adapters' dtype -----------------------------------------------------


@pytest.mark.parametrize("model_type, expected", [
    ("gpt2", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
])
def test_all_linear_adapts_every_linear_layer_but_the_head(model_type, expected):
    config = ({"model_type": "gpt2", "n_layer": 3, "n_embd": 32, "n_head": 2, "vocab_size": VOCAB}
              if model_type == "gpt2" else dict(SMALL, model_type="llama", num_hidden_layers=3, vocab_size=VOCAB))
    model = load_causal_lm(config=config)[0]
    whole_linear = {n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    assert "lm_head" in whole_linear
    segments = split_model_u_shape(model, 1, 2)
    check_targets_exist(segments, ["all-linear"], "lora.client.target_modules")
    adapted = set()
    for segment in segments:
        add_lora(segment, ["all-linear"], LoraSpec(2, 4.0))
        adapted |= {segment.full_model_name(n) for n in lora_modules(segment)}
        assert all(not p.requires_grad for n, p in segment.named_parameters() if "lora_" not in n)
    assert adapted == whole_linear - {"lm_head"}
    backbone = "transformer.h" if model_type == "gpt2" else "model.layers"
    assert adapted == {f"{backbone}.{i}.{leaf}" for i in range(3) for leaf in expected}
    # Named beside it, the head is adapted too.
    tail = split_model_u_shape(model, 1, 2)[2]
    add_lora(tail, ["all-linear", "lm_head"], LoraSpec(2, 4.0))
    assert "lm_head" in lora_modules(tail)


def test_float32_adapters_on_a_bfloat16_model_train():
    model = load_causal_lm(config=dict(SMALL, model_type="llama", vocab_size=VOCAB), dtype=torch.bfloat16)[0]
    client, server = split_model(model, 2)
    assert LoraSpec(4, 8.0).dtype == "float32"  # the default, as lora.adapter_dtype's
    for segment in (client, server):
        add_lora(segment, ["q_proj", "v_proj"], LoraSpec(4, 8.0))
    layer = lora_modules(client)["layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    adapters = [p for s in (client, server) for p in s.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    optimizer = torch.optim.AdamW(adapters, lr=1e-2)
    input_ids, attention_mask = batch(seed=4)
    hidden = client(input_ids, attention_mask)
    assert hidden.dtype == torch.bfloat16
    logits = server(hidden, attention_mask)
    F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)
    b_before = layer.lora_B.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.lora_B, b_before)
    assert all(s.dtype == torch.float32 for state in optimizer.state.values() for s in state.values()
               if torch.is_tensor(s) and s.dim() > 0)
    # The explicit choice is honoured as well.
    bf16 = add_lora(split_model(model, 2)[0], ["q_proj"], LoraSpec(4, 8.0, dtype="bfloat16"))
    assert all(m.lora_A.dtype == torch.bfloat16 for m in lora_modules(bf16).values())


def test_trainer_passes_the_adapter_dtype(tmp_path):
    from splitlora.strategies import make_strategy
    from splitlora.trainer import build

    common = ["model.dtype=bfloat16", "train.clients=1", "data.synthetic_examples=40"]
    setup = build(tiny_config(tmp_path, "strategy=centralized", *common), log=lambda *_: None).setup
    for segment in (setup.client, setup.server):
        assert lora_modules(segment) and all(m.lora_A.dtype == m.lora_B.dtype == torch.float32
                                             and m.weight.dtype == torch.bfloat16
                                             for m in lora_modules(segment).values())
    # Centralized LoRA's whole model keeps the adapters' dtype as well.
    whole = make_strategy(setup).model
    assert lora_modules(whole) and all(m.lora_A.dtype == torch.float32 for m in lora_modules(whole).values())
    setup = build(tiny_config(tmp_path, *common, "lora.adapter_dtype=bfloat16", name="bf16"),
                  log=lambda *_: None).setup
    assert all(m.lora_A.dtype == torch.bfloat16 for m in lora_modules(setup.client).values())


class _GPT2WithoutPositions(Architecture):
    backbone, embeddings, layers, final_norm = "transformer", ("wte", "wpe", "drop"), "h", "ln_f"

    def embed(self, segment, input_ids, position_ids):
        return segment.drop(segment.wte(input_ids))  # forgets the position embeddings

    def run_layer(self, layer, hidden, mask, position_ids, position_embeddings):
        return layer(hidden, attention_mask=mask, use_cache=False, position_ids=position_ids)


def test_the_trainer_checks_the_split(tmp_path, restore_registry):
    from splitlora.trainer import build

    register_architecture("gpt2", _GPT2WithoutPositions(), overwrite=True)
    with pytest.raises(ValueError, match="'gpt2' model.*decoder layer 0 is the first whose output differs"):
        build(tiny_config(tmp_path, "data.synthetic_examples=40"), log=lambda *_: None)
