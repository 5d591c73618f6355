"""splitlora.config: defaults, shipped configs, overrides, every kind of error, dump/load round trip."""
import dataclasses
from pathlib import Path

import pytest

from splitlora.config import (
    DEFAULT_MODEL_CONFIG,
    STRATEGIES,
    ConfigError,
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    validate,
    validate_model_layers,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def error_of(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------- defaults and files

def test_defaults_are_the_demo_and_valid():
    cfg = load_config()
    assert cfg == RunConfig()
    assert validate(RunConfig()) == cfg
    assert cfg.strategy == "splitlora" and cfg.strategy in STRATEGIES
    assert cfg.model.config == DEFAULT_MODEL_CONFIG and cfg.model.name is None and cfg.model.path is None
    assert cfg.model.config is not DEFAULT_MODEL_CONFIG  # a copy: mutating a run's config is safe
    assert cfg.lora.client.target_modules == ["c_attn"] and cfg.lora.server.r == 8
    assert cfg.train.max_grad_norm == 1.0 and cfg.codec.bits == 8 and cfg.eval.batch_size == 16


def test_demo_yaml_writes_out_the_defaults():
    assert load_config(CONFIGS / "demo.yaml") == RunConfig()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    validate_model_layers(cfg, 8)


def test_shipped_configs_are_there():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "gpt2-medium-e2e.yaml", "llama-e2e.yaml"}


def test_paper_setting():
    cfg = load_config(CONFIGS / "gpt2-medium-e2e.yaml")
    assert cfg.model.config["n_layer"] == 24 and cfg.model.config["n_embd"] == 1024
    assert (cfg.train.clients, cfg.model.cut_layer, cfg.train.aggregate_every) == (3, 3, 100)
    assert cfg.lora.client.r == cfg.lora.server.r == 4
    assert cfg.lora.client.target_modules == ["c_attn"]
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.source == "e2e" and cfg.data.train_path == "../shared/data/e2e/valid.txt"
    assert validate_model_layers(cfg, 24) == 24


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()


def test_partial_file_keeps_other_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("train:\n  steps: 7\nlora:\n  server:\n    r: 2\n")
    cfg = load_config(path)
    assert cfg.train.steps == 7 and cfg.train.clients == 4
    assert cfg.lora.server.r == 2 and cfg.lora.client.r == 8


def test_file_errors(tmp_path):
    assert "cannot read" in error_of(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert "not valid YAML" in error_of(path=bad)
    bad.write_text("- a\n- b\n")
    assert "mapping" in error_of(path=bad)


# ---------------------------------------------------------------------------- overrides

def test_override_values_are_parsed_as_yaml():
    cfg = load_config(overrides=[
        "train.steps=50", "train.lr=2e-4", "codec.bits=4", "network.latency_ms=0",
        "lora.client.target_modules=[c_attn,c_proj]", "train.max_grad_norm=null",
        "train.u_shape=true", "strategy=sl", "data.num_eval=", "output_dir=runs/x y",
    ])
    assert cfg.train.steps == 50 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.codec.bits == 4
    assert cfg.network.latency_ms == 0.0 and isinstance(cfg.network.latency_ms, float)
    assert cfg.lora.client.target_modules == ["c_attn", "c_proj"]
    assert cfg.lora.server.target_modules == ["c_attn", "lm_head"]  # untouched: the default
    assert cfg.train.max_grad_norm is None and cfg.data.num_eval is None
    assert cfg.train.u_shape is True and cfg.strategy == "sl"
    assert cfg.output_dir == "runs/x y"


def test_overrides_apply_on_top_of_a_file_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  clients: 2\n")
    cfg = load_config(path, ["train.steps=9", "train.steps=11"])
    assert cfg.train.steps == 11 and cfg.train.clients == 2


def test_override_into_the_model_config_dict():
    cfg = load_config(overrides=["model.config.n_layer=8", "model.config.new_key={a: 1}"])
    assert cfg.model.config == {**DEFAULT_MODEL_CONFIG, "n_layer": 8, "new_key": {"a": 1}}
    # Without a config in effect the dict starts from the demo one.
    cfg = load_config(overrides=["model.config=null", "model.config.n_embd=64"])
    assert cfg.model.config == {**DEFAULT_MODEL_CONFIG, "n_embd": 64}


def test_whole_section_override():
    cfg = load_config(overrides=["lora.server={r: 2, target_modules: [c_proj]}"])
    assert cfg.lora.server.r == 2 and cfg.lora.server.target_modules == ["c_proj"]
    assert cfg.lora.server.alpha == 16.0


def test_malformed_overrides():
    assert "key=value" in error_of(["train.steps"])
    assert "key=value" in error_of(["=3"])
    assert "train..steps" in error_of(["train..steps=3"])
    assert "train.steps" in error_of(["train.steps=[1"])
    message = error_of(["train=5", "train.steps=3"])
    assert "train.steps" in message and "not a mapping" in message


# ---------------------------------------------------------------------------- model source

def test_name_or_path_displaces_the_default_model_config():
    cfg = load_config(overrides=["model.name=smollm2-135m"])
    assert cfg.model.name == "smollm2-135m" and cfg.model.config is None
    cfg = load_config(CONFIGS / "demo.yaml", ["model.path=some/folder", "model.gguf_file=m.gguf"])
    assert cfg.model.path == "some/folder" and cfg.model.config is None
    assert ModelConfig(path="x").config is None
    assert ModelConfig(config=None).config == DEFAULT_MODEL_CONFIG


def test_two_model_sources_are_an_error():
    message = error_of(["model.name=a", "model.path=b"])
    assert "model.name" in message and "model.path" in message and "exactly one" in message
    message = error_of(["model.name=a", "model.config.n_layer=3"])
    assert "model.config" in message


def test_model_config_needs_a_model_type():
    assert "model.config.model_type" in error_of(["model.config={n_layer: 3}"])


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("override, key, suggestion", [
    ("train.stpes=3", "train.stpes", "train.steps"),
    ("codec.bitz=4", "codec.bitz", "codec.bits"),
    ("lr=1", "lr", "train.lr"),
    ("train.bits=4", "train.bits", "codec.bits"),
    ("modle.cut_layer=1", "modle", "model"),
    ("lora.clinet.r=2", "lora.clinet", "lora.client"),
])
def test_unknown_key_suggests_the_closest(override, key, suggestion):
    message = error_of([override])
    assert f"{key}: unknown key" in message
    assert f"did you mean {suggestion}" in message


def test_unknown_key_in_a_file_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("codec:\n  bitss: 4\n")
    message = error_of(path=path)
    assert "codec.bitss" in message and "codec.bits" in message and "group_size" in message


@pytest.mark.parametrize("override, expected", [
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5"),
    ("train.steps=true", "train.steps: expected an integer, got True"),
    ("train.steps=null", "train.steps: expected an integer, got null"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.lr='1e-3'", "train.lr: expected a number"),
    ("train.u_shape=1", "train.u_shape: expected a boolean"),
    ("codec.stochastic=0", "codec.stochastic: expected a boolean"),
    ("strategy=3", "strategy: expected a string"),
    ("lora.client.target_modules=c_attn", "lora.client.target_modules: expected a list of strings"),
    ("lora.client.target_modules=[1, 2]", "lora.client.target_modules: expected a list of strings"),
    ("model.config=[1]", "model.config: expected a mapping"),
    ("data.num_train=many", "data.num_train: expected an integer or null"),
    ("train.max_grad_norm=[1]", "train.max_grad_norm: expected a number or null"),
    ("train=3", "train: expected a mapping"),
])
def test_wrong_type(override, expected):
    assert expected in error_of([override])


def test_ints_are_accepted_for_floats():
    cfg = load_config(overrides=["train.lr=1", "lora.client.alpha=32"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.lora.client.alpha, float)


@pytest.mark.parametrize("override, key", [
    ("lora.client.r=0", "lora.client.r"),
    ("lora.server.dropout=1.0", "lora.server.dropout"),
    ("lora.server.alpha=0", "lora.server.alpha"),
    ("lora.client.target_modules=[]", "lora.client.target_modules"),
    ("train.steps=0", "train.steps"),
    ("train.clients=0", "train.clients"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.aggregate_every=0", "train.aggregate_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("data.max_length=4", "data.max_length"),
    ("data.num_train=0", "data.num_train"),
    ("data.dirichlet_alpha=0", "data.dirichlet_alpha"),
    ("model.cut_layer=0", "model.cut_layer"),
    ("network.bandwidth_mbps=0", "network.bandwidth_mbps"),
    ("network.latency_ms=-1", "network.latency_ms"),
    ("eval.num_beams=0", "eval.num_beams"),
    ("output_dir=''", "output_dir"),
    ("seed=-1", "seed"),
])
def test_out_of_range(override, key):
    assert error_of([override]).startswith(f"{key}: must")


@pytest.mark.parametrize("override, key, allowed", [
    ("strategy=fedavg", "strategy", "splitlora, sl, fedlora, centralized"),
    ("device=tpu", "device", "cpu, cuda, auto"),
    ("transport=grpc", "transport", "local, dist"),
    ("model.dtype=float64", "model.dtype", "float32, bfloat16, float16"),
    ("data.source=wiki", "data.source", "synthetic, e2e, jsonl, json, csv, parquet, hf_disk"),
    ("data.partition=shards", "data.partition", "iid, dirichlet"),
    ("train.optimizer=adam", "train.optimizer", "adamw, sgd"),
    ("train.lr_schedule=step", "train.lr_schedule", "constant, linear, cosine"),
    ("codec.bits=3", "codec.bits", "32, 16, 8, 4, 2"),
])
def test_not_in_the_allowed_set(override, key, allowed):
    message = error_of([override])
    assert message.startswith(f"{key}: ") and allowed in message


def test_transport_dist_is_accepted():
    assert load_config(overrides=["transport=dist"]).transport == "dist"


@pytest.mark.parametrize("size", [0, 8, 48, 8192])
def test_group_size_power_of_two_in_range(size):
    message = error_of([f"codec.group_size={size}"])
    assert "codec.group_size" in message and "power of two" in message and "4096" in message


@pytest.mark.parametrize("size", [16, 128, 4096])
def test_group_size_accepted(size):
    assert load_config(overrides=[f"codec.group_size={size}"]).codec.group_size == size


@pytest.mark.parametrize("overrides, key", [
    (["model.path=null", "model.gguf_file=m.gguf"], "model.gguf_file"),
    (["data.source=e2e"], "data.train_path"),
    (["train.u_shape=true", "strategy=fedlora"], "train.u_shape"),
    (["train.u_shape=true", "strategy=centralized"], "train.u_shape"),
    (["model.server_end=3"], "model.server_end"),  # without u_shape
    (["train.u_shape=true", "model.cut_layer=3", "model.server_end=3"], "model.server_end"),
])
def test_cross_field(overrides, key):
    assert f"{key}:" in error_of(overrides)


def test_cross_field_valid_combinations():
    cfg = load_config(overrides=["data.source=e2e", "data.train_path=train.txt",
                                 "train.u_shape=true", "strategy=sl", "model.server_end=3"])
    assert cfg.data.train_path == "train.txt" and cfg.model.server_end == 3
    cfg = load_config(overrides=["model.path=folder", "model.gguf_file=m.gguf"])
    assert cfg.model.gguf_file == "m.gguf"


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.steps=0", "codec.bits=5", "train.stpes=1"])
    # Keys and types are checked first; values only once the structure is right.
    assert [line.split(":")[0] for line in info.value.errors] == ["train.stpes"]
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.steps=0", "codec.bits=5", "lora.client.r=0"])
    keys = [line.split(":")[0] for line in info.value.errors]
    assert keys == ["lora.client.r", "train.steps", "codec.bits"]
    assert isinstance(info.value, ValueError)


def test_validate_checks_configs_built_in_code():
    cfg = RunConfig()
    cfg.train.steps = "ten"
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        validate(cfg)
    cfg = RunConfig()
    cfg.model.name = "x"  # set after construction: the default config is still set
    with pytest.raises(ConfigError, match="exactly one"):
        validate(cfg)


# ---------------------------------------------------------------------------- layers

def test_validate_model_layers():
    cfg = load_config()
    assert validate_model_layers(cfg, 4) == 4
    assert validate_model_layers(load_config(overrides=["model.cut_layer=3"]), 4) == 4
    for bad in (4, 5):
        with pytest.raises(ConfigError, match=r"model\.cut_layer: must be in \[1, 3\]"):
            validate_model_layers(load_config(overrides=[f"model.cut_layer={bad}"]), 4)
    with pytest.raises(ConfigError, match="model.cut_layer"):
        validate_model_layers(cfg, 1)


def test_validate_model_layers_u_shape():
    u = ["train.u_shape=true"]
    assert validate_model_layers(load_config(overrides=u), 4) == 3
    assert validate_model_layers(load_config(overrides=u + ["model.server_end=5"]), 8) == 5
    with pytest.raises(ConfigError, match=r"model\.cut_layer: .*\[1, 2\]"):
        validate_model_layers(load_config(overrides=u + ["model.cut_layer=3"]), 4)
    with pytest.raises(ConfigError, match=r"model\.server_end: must be in \[3, 3\]"):
        validate_model_layers(load_config(overrides=u + ["model.server_end=4"]), 4)


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("overrides", [
    [],
    ["model.name=smollm2-135m", "train.lr=3e-5", "train.max_grad_norm=null", "codec.bits=2",
     "lora.client.target_modules=[q_proj,v_proj]", "network.server_tflops=1e3"],
    ["model.config.n_layer=6", "train.u_shape=true", "model.server_end=4", "data.num_eval=null"],
], ids=["defaults", "named", "u_shape"])
def test_dump_load_round_trip(tmp_path, overrides):
    cfg = load_config(overrides=overrides)
    path = dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_round_trip(tmp_path, path):
    cfg = load_config(path)
    assert load_config(dump_config(cfg, tmp_path / "c.yaml")) == cfg


def test_config_to_dict_is_a_deep_copy():
    cfg = RunConfig()
    d = config_to_dict(cfg)
    d["model"]["config"]["n_layer"] = 99
    d["lora"]["client"]["target_modules"].append("c_proj")
    assert cfg.model.config["n_layer"] == 4 and cfg.lora.client.target_modules == ["c_attn"]
    assert list(d) == [f.name for f in dataclasses.fields(RunConfig)]
