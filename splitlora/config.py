"""Run configuration: nested dataclasses, YAML loading, ``key=value`` overrides, validation.

A config file is YAML whose sections mirror the dataclasses below (``model``, ``data``, ``lora``,
``train``, ``codec``, ``network``, ``eval``, ``fedcybgd``, ``hsplitlora``); every key is optional and
falls back to the default shown here, so ``load_config()`` with no file is the demo run (also
written out, with comments, in ``configs/demo.yaml``). Overrides use dotted keys and YAML values::

    load_config("configs/demo.yaml", ["train.steps=50", "lora.client.target_modules=[c_attn,c_proj]",
                                      "model.config.n_layer=6", "train.max_grad_norm=null"])

Rules worth knowing:

- Relative paths (``output_dir``, ``data.*_path``, ``data.tokenizer``, ``model.path``) are kept
  as written and read relative to the current working directory of the process, not to the
  config file's folder: the shipped configs assume the project root.
- Model source: exactly one of ``model.name``, ``model.path``, ``model.config``. ``model.config``
  defaults to the demo model (``DEFAULT_MODEL_CONFIG``, a 4-layer GPT-2 shape) and gives way to a
  name or path: while it still equals that default, setting ``model.name`` or ``model.path`` unsets
  it, so ``configs/demo.yaml model.path=my-model`` works without ``model.config=null``. Leaving all
  three unset (null) also means the demo model. The resolved value is what ``dump_config`` writes.
  It gives way to another model type too: when no file sets ``model.config`` and an override sets
  ``model.config.model_type`` to another type than the demo's gpt2, the config starts empty for
  that type, with only the ``model.config.*`` keys the overrides give (GPT-2's n_layer, n_embd...
  would mean nothing to it). Keys a file gives stay: a key that is not one of the model type's
  config class is an error naming it when the model is built (``models.load_causal_lm``, which
  imports transformers; this module does not), as is a model too large for the memory available.
- ``model.config["vocab_size"] = None`` means "the tokenizer's vocabulary size".
- Floats written without a dot (``2e-4``) are floats, as in YAML 1.2 (PyYAML alone would read a
  string). Integers are accepted for float fields; booleans must be ``true``/``false``.
- All problems found are reported together in one ``ConfigError``, each line naming the dotted key.

``validate_model_layers(cfg, num_layers)`` checks the cut against the built model, whose number
of decoder layers this module cannot know.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = [
    "STRATEGIES", "SPLIT_STRATEGIES", "DEVICES", "TRANSPORTS", "DTYPES", "DATA_SOURCES", "DATA_FORMATS",
    "DATA_ON_LONG", "PARTITIONS",
    "OPTIMIZERS", "CODEC_BITS", "MIN_GROUP_SIZE", "MAX_GROUP_SIZE", "DEFAULT_MODEL_CONFIG",
    "ConfigError", "RunConfig", "ModelConfig", "DataConfig", "LoraSideConfig", "LoraConfig",
    "TrainConfig", "CodecConfig", "NetworkConfig", "EvalConfig", "FedCyBGDConfig",
    "FEDCYBGD_ORDERS", "FEDCYBGD_BLOCKS", "FEDCYBGD_DOWNLOADS", "FEDCYBGD_DOWNLOAD_BITS",
    "HSplitLoRAConfig", "HSPLITLORA_AGGREGATIONS", "HSPLITLORA_IMPORTANCE", "HSPLITLORA_DEVICE_KEYS",
    "HSPLITLORA_CONFIGURATIONS", "HSPLITLORA_SERVER_ADAPTERS", "HSPLITLORA_RESTARTS",
    "load_config", "config_from_dict", "config_to_dict", "dump_config", "apply_overrides",
    "validate", "validate_model_layers",
]

STRATEGIES = ("splitlora", "sl", "fedlora", "centralized", "fedcybgd", "hsplitlora")
# Strategies that cut the model between a client and a server (the ones u_shape applies to).
SPLIT_STRATEGIES = ("splitlora", "sl")
DEVICES = ("cpu", "cuda", "auto")
TRANSPORTS = ("local", "dist")
DTYPES = ("float32", "bfloat16", "float16")
# The embedded task, E2E files, and the user's own files read through HF datasets (data/formats.py).
DATA_SOURCES = ("synthetic", "e2e", "jsonl", "json", "csv", "parquet", "hf_disk")
# How a row of a user's file becomes a training sequence (data/records.py); null: detected from the columns.
DATA_FORMATS = ("prompt_completion", "chat", "text")
# A record longer than data.max_length: skip it (counted, one warning) or keep its prompt and cut its completion.
DATA_ON_LONG = ("skip", "truncate")
PARTITIONS = ("iid", "dirichlet")
PAD_TO = ("batch", "dataset")
OPTIMIZERS = ("adamw", "sgd")
# After the warmup: constant, or decaying to 0 at the last step (linearly, or along a half cosine).
LR_SCHEDULES = ("constant", "linear", "cosine")
# strategy fedcybgd: order of the block cycle, what a block is, how updated blocks come down.
FEDCYBGD_ORDERS = ("ascending", "descending", "random")
FEDCYBGD_BLOCKS = ("layers", "all")
FEDCYBGD_DOWNLOADS = ("full", "subset", "quantized")
FEDCYBGD_DOWNLOAD_BITS = (16, 8, 4, 2)
# strategy hsplitlora: how unequal client ranks are aggregated, and what a device class may say.
HSPLITLORA_AGGREGATIONS = ("stacked", "zero_pad")
HSPLITLORA_IMPORTANCE = ("sensitivity", "gradient")
HSPLITLORA_DEVICE_KEYS = ("count", "tflops", "memory_gib", "bandwidth_mbps", "latency_ms")
HSPLITLORA_CONFIGURATIONS = ("per_client", "weakest")
HSPLITLORA_SERVER_ADAPTERS = ("shared", "per_client")
HSPLITLORA_RESTARTS = ("fresh", "warm")
# 32 = no compression (fp32 on the wire); the others are the codec's bit widths.
CODEC_BITS = (32, 16, 8, 4, 2)
# Same limits as the codec (splitlora.codec_reference); repeated so this module imports no torch.
MIN_GROUP_SIZE = 16
MAX_GROUP_SIZE = 4096

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 4,
    "n_embd": 64,
    "n_head": 4,
    "n_positions": 128,
    "vocab_size": None,  # filled from the tokenizer
    # GPT-2's own activation (tanh-approximated GELU) as one fused torch op instead of gelu_new's
    # five elementwise ones: the same function, a faster demo on a CPU.
    "activation_function": "gelu_pytorch_tanh",
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


class ConfigError(ValueError):
    """An invalid config. ``errors`` holds one line per problem, each starting with the dotted key."""

    def __init__(self, errors: str | Sequence[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors) if len(self.errors) == 1
                         else "invalid config:\n  " + "\n  ".join(self.errors))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    config: dict | None = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL_CONFIG))
    dtype: str = "float32"
    cut_layer: int = 2
    server_end: int | None = None
    # A frozen 4-bit base (bitsandbytes nf4 or fp4, as QLoRA) for the linear layers of one side
    # (quantize_side: client, the weak party this is for; server; or both); null: none.
    quantize: str | None = None
    quantize_side: str = "client"
    # The client's input embedding in 4 bits too (QLoRA keeps it in model.dtype; in a small model
    # with a large vocabulary, e.g. Llama-3.2-1B's 128k tokens, it is most of the client's weights).
    quantize_embeddings: bool = False

    def __post_init__(self):
        # The demo model is the default source and gives way to a name or a path (module docstring).
        if self.name is None and self.path is None and self.config is None:
            self.config = copy.deepcopy(DEFAULT_MODEL_CONFIG)
        elif (self.name is not None or self.path is not None) and self.config == DEFAULT_MODEL_CONFIG:
            self.config = None


@dataclass
class DataConfig:
    # synthetic, e2e, or a file format: jsonl, json, csv, parquet, hf_disk (a Dataset.save_to_disk folder).
    source: str = "synthetic"
    train_path: str | None = None
    # Held-out data: its own file, else a data.eval_fraction of the training data (never anything else).
    eval_path: str | None = None
    eval_fraction: float = 0.1
    tokenizer: str | None = None
    # prompt_completion, chat or text; null: detected from the columns (and printed).
    format: str | None = None
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    text_key: str = "text"
    # A chat template (a Jinja string, or the path of a file holding one) for tokenizers without one.
    chat_template: str | None = None
    max_length: int = 96
    # A record longer than max_length: skip (counted, one warning at the end of loading) or truncate
    # its completion (its prompt kept whole).
    on_long: str = "truncate"
    num_train: int | None = None
    num_eval: int | None = 200
    synthetic_examples: int = 4000
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    # Natural partitions (real data is split by owner): a column whose values name the clients, or
    # one file per client (then train_path is not used). Either replaces data.partition.
    client_key: str | None = None
    client_paths: list[str] | None = None
    # Several short examples per sequence, attention kept within each example.
    packing: bool = False
    # Training batches padded to their own longest sequence ("batch"), or every batch to the
    # longest of the training set ("dataset": fixed shapes, more bytes at the cut and more compute).
    pad_to: str = "batch"


@dataclass
class LoraSideConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    rslora: bool = False


@dataclass
class LoraConfig:
    # The adapters' weights (and so their optimizer state) in this dtype whatever model.dtype is:
    # float32 on a bfloat16/float16 base, as PEFT does.
    adapter_dtype: str = "float32"
    client: LoraSideConfig = field(default_factory=LoraSideConfig)
    # The demo's server also adapts the LM head: on a randomly initialised model that is what lets
    # a few hundred LoRA steps learn the task (pretrained models do not need it).
    server: LoraSideConfig = field(default_factory=lambda: LoraSideConfig(target_modules=["c_attn", "lm_head"]))


@dataclass
class TrainConfig:
    clients: int = 4
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    aggregate_every: int = 10
    u_shape: bool = False
    eval_every: int = 100
    checkpoint_every: int = 1
    log_every: int = 10


@dataclass
class CodecConfig:
    bits: int = 8
    group_size: int = 64
    stochastic: bool = False
    error_feedback: bool = False
    compress_gradients: bool = True
    overlap: bool = True


@dataclass
class NetworkConfig:
    client_tflops: float = 1.0
    server_tflops: float = 35.6
    bandwidth_mbps: float = 100.0
    latency_ms: float = 10.0
    timeout_s: float = 60.0


@dataclass
class EvalConfig:
    generate: bool = True
    max_new_tokens: int = 40
    num_beams: int = 1
    max_sources: int = 20
    batch_size: int = 16


@dataclass
class FedCyBGDConfig:
    """strategy fedcybgd (full-parameter cycle block descent); ignored by the other strategies."""

    # The cycle over blocks: ascending, descending, or a fresh random permutation each cycle.
    order: str = "ascending"
    # Blocks each client trains per round (consecutive in the cycle).
    blocks_per_client: int = 1
    # layers: one block per decoder layer; all: also the embeddings and the final norm + LM head.
    blocks: str = "layers"
    # full: every updated block; subset: a random download_fraction of them (the rest later);
    # quantized: weight matrices quantized by the codec to download_bits (in groups of download_group_size).
    download: str = "full"
    download_fraction: float = 0.5
    download_bits: int = 8
    download_group_size: int = 64


@dataclass
class HSplitLoRAConfig:
    """strategy hsplitlora (heterogeneous clients: per-client cut and LoRA ranks); ignored by the others."""

    # Classes of client devices, given to the clients in order: {class name: {count, tflops,
    # memory_gib, bandwidth_mbps, latency_ms}}. count defaults to 1; tflops, bandwidth_mbps and
    # latency_ms to network.client_tflops / bandwidth_mbps / latency_ms; memory_gib to no limit.
    # The counts must add up to train.clients. Empty: every client is network.* with no memory limit.
    devices: dict = field(default_factory=dict)
    # The cut layers a client may be given (the deepest one its budget allows: deeper for stronger
    # clients); null: model.cut_layer. Both equal: one cut for every client.
    min_cut_layer: int | None = None
    max_cut_layer: int | None = None
    # Bounds of the LoRA rank of every adapted weight of a client.
    min_rank: int = 1
    max_rank: int = 16
    # A deadline for one client step (its compute to the cut and back, activations up and gradients
    # down); a client's ranks, then its cut, are lowered until its estimate fits. null: no deadline.
    step_time_s: float | None = None
    # Importance of an adapted weight: an exponential moving average (importance_beta) over steps of
    # sensitivity: AdaLoRA's |A * dA| + |B * dB| (zero while B = 0, i.e. at the first step of every
    # round: needs rounds of several steps), or gradient: |dA|^2 + |dB|^2 (Fisher information of the
    # adapter); per rank. Aggregated over the clients every importance_every rounds.
    importance: str = "sensitivity"
    importance_beta: float = 0.85
    importance_every: int = 1
    # Reconfigure the ranks when the importance ranking moved by more than this normalized Kendall
    # tau distance (share of module pairs whose order changed, 0..1) since the last configuration.
    reconfigure_threshold: float = 0.1
    # stacked: noise-free (the weighted mean of the clients' updates, folded into the base weights);
    # zero_pad: HetLoRA's zero-padded averaging of A and B (the baseline).
    aggregation: str = "stacked"
    # How the adapters restart after a stacked fold. fresh: B = 0 and a fresh A (FLoRA's restart:
    # every round begins with the adapters' first steps again). warm: from the best rank-k
    # approximation of the round's mean update (k: the smallest rank restarting on that weight),
    # the rest of the update folded into the base: the same model, with adapters that carry on.
    restart: str = "fresh"
    # per_client: each client's cut and ranks from its own budget; weakest: every client gets the
    # most constrained client's configuration (the baseline that ignores heterogeneity).
    configuration: str = "per_client"
    # shared: one server adapter per adapted weight, trained on every client's activations;
    # per_client: the server keeps one adapter per client at that client's scale of lora.server.r
    # (SplitFed-style server models), all run in one batched multi-adapter launch and aggregated
    # like the clients' (stacked only).
    server_adapters: str = "shared"
    # Rank of the exported client adapters (the folded update, by SVD); null: exact (its numerical rank).
    export_rank: int | None = None


@dataclass
class PrivacyConfig:
    """Differential privacy of the clients' data (README, "Privacy"; checks in splitlora.privacy.settings).
    Two keys turn it on: clip and noise_multiplier (or epsilon, which sets the noise)."""

    clip: float | None = None  # L2 bound of one example's activations at the cut; null: off
    noise_multiplier: float | None = None  # noise std / clip
    epsilon: float | None = None  # target epsilon for the whole run: sets noise_multiplier
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp or prv (Opacus)
    protect_gradients: bool = False  # u_shape: clip + noise the gradient the client sends up too
    adapter_clip: float | None = None  # L2 bound of a client's adapter update per round; null: off
    adapter_noise_multiplier: float | None = None
    seed: int | None = None  # null: the OS CSPRNG seeds the noise (set only for tests)


@dataclass
class FederationConfig:
    """`splitlora server` and `splitlora client`: separate programs over gRPC with mutual TLS
    (README, "Federation"; checks in splitlora.federation.settings). Ignored by `splitlora train`."""

    listen: str = "127.0.0.1:50051"  # the server's HOST:PORT (--listen overrides); loopback by default
    # Rounds start with this many clients connected, and the run ends when fewer remain for
    # wait_s (clients that drop out may rejoin at a later round's start); null: train.clients.
    min_clients: int | None = None
    # The first round waits for this many (null: min_clients): e.g. start with every client, then
    # go on with fewer. The others join at a later round's start.
    start_clients: int | None = None
    # Which clients train in a round (a seeded sample of those available; also under
    # transport=local): a count, a fraction in (0, 1] of them, or null: all.
    clients_per_round: int | float | None = None
    step_timeout_s: float = 60.0  # the longest the server waits for a client's packet (and a client for the server's)
    wait_s: float = 300.0  # the longest the server waits for min_clients to connect
    max_packet_bytes: int = 4 * 2**30  # a packet announced larger than this is refused before allocation
    chunk_bytes: int = 2**20  # the payload of one gRPC message (a packet crosses as several)
    keepalive_s: float = 20.0  # gRPC keepalive ping interval: a silently vanished peer is noticed


@dataclass
class RunConfig:
    strategy: str = "splitlora"
    seed: int = 0
    # `splitlora demo` writes its two runs to runs/demo/int8 and runs/demo/fp32; a train run here.
    output_dir: str = "runs/train"
    # An output_dir that already holds a run is refused, unless resume (continue it from its last
    # checkpoint) or overwrite (delete its files, then start again) is set.
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    transport: str = "local"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fedcybgd: FedCyBGDConfig = field(default_factory=FedCyBGDConfig)
    hsplitlora: HSplitLoRAConfig = field(default_factory=HSplitLoRAConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


# --------------------------------------------------------------------------------------------
# YAML: a SafeLoader that reads 1e-3 as a float (YAML 1.2), as users expect
# --------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    pass


# Mappings in block style, short lists on one line: [c_attn, c_proj].
_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------
# dict -> dataclasses, with type errors naming the dotted key
# --------------------------------------------------------------------------------------------

def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key))
    return keys


def _unknown_key_message(cls: type, prefix: str, name: Any) -> str:
    key = _join(prefix, str(name))
    valid = [f.name for f in dataclasses.fields(cls)]
    leaves = _all_keys(RunConfig)
    # The right key in the wrong section first (lr -> train.lr, train.bits -> codec.bits), then a
    # misspelling in this section, then a misspelling of a key of another section.
    suggestions = [k for k in leaves if k.rsplit(".", 1)[-1] == str(name) and k != key]
    if not suggestions:
        suggestions = [_join(prefix, c) for c in difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)]
    if not suggestions:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in leaves}
        suggestions = [by_leaf[c] for c in difflib.get_close_matches(str(name), list(by_leaf), n=1, cutoff=0.75)]
    hint = f"did you mean {' or '.join(suggestions)}?" if suggestions else ""
    where = f"under {prefix}" if prefix else "at the top level"
    return f"{key}: unknown key; {hint + ' ' if hint else ''}valid keys {where}: {', '.join(valid)}"


def _describe(value: Any) -> str:
    return "null" if value is None else repr(value)


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_expected(a) for a in args) + " or null"
    if hint is bool:
        return "a boolean (true or false)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is list or hint is list:
        return "a list of strings, e.g. [c_attn, c_proj]"
    if origin is dict or hint is dict:
        return "a mapping"
    return str(hint)


_MISSING = object()


def _convert(value: Any, hint: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # The first type that takes the value (int before float: 2 is a count, 0.5 a fraction).
        result = _MISSING
        for inner in (a for a in args if a is not type(None)):
            result = _convert(value, inner, key, [])
            if result is not _MISSING:
                break
        if result is _MISSING:
            errors.append(f"{key}: expected {_expected(hint)}, got {_describe(value)}")
        return result
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, errors)
    ok = True
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if ok:
            value = list(value)
    elif hint is dict or origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if ok:
            value = copy.deepcopy(value)
    else:  # pragma: no cover - a schema type this function does not know
        raise TypeError(f"{key}: unsupported schema type {hint!r}")
    if not ok:
        errors.append(f"{key}: expected {_expected(hint)}, got {_describe(value)}")
        return _MISSING
    return value


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping of keys to values, got {_describe(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            errors.append(_unknown_key_message(cls, prefix, name))
            continue
        converted = _convert(value, hints[name], _join(prefix, name), errors)
        if converted is not _MISSING:
            kwargs[name] = converted
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Validation of values and cross-field rules
# --------------------------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate(cfg: RunConfig) -> RunConfig:
    """Check types, ranges, allowed values and cross-field rules; raise ConfigError listing every problem.

    Works on a RunConfig built or changed in code too: its types are checked first, as for a file.
    """
    errors: list[str] = []
    _build(RunConfig, config_to_dict(cfg), "", errors)
    if errors:
        raise ConfigError(errors)

    def one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
        if value not in allowed:
            errors.append(f"{key}: {_describe(value)} is not allowed; choose one of "
                          f"{', '.join(str(a) for a in allowed)}")

    def at_least(key: str, value: Any, low: float, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            errors.append(f"{key}: must be >= {low}{' (or null)' if optional else ''}, got {_describe(value)}")

    def positive(key: str, value: Any, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            errors.append(f"{key}: must be > 0{' (or null)' if optional else ''}, got {_describe(value)}")

    def non_empty(key: str, value: Any, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value.strip():
            errors.append(f"{key}: must be a non-empty string{' (or null)' if optional else ''}, "
                          f"got {_describe(value)}")

    one_of("strategy", cfg.strategy, STRATEGIES)
    at_least("seed", cfg.seed, 0)
    non_empty("output_dir", cfg.output_dir)
    if cfg.resume is True and cfg.overwrite is True:
        errors.append("overwrite: resume=true continues the run in output_dir, overwrite=true deletes it; "
                      "set one of them")
    one_of("device", cfg.device, DEVICES)
    one_of("transport", cfg.transport, TRANSPORTS)

    m = cfg.model
    for key in ("name", "path", "gguf_file"):
        non_empty(f"model.{key}", getattr(m, key), optional=True)
    sources = [k for k in ("name", "path", "config") if getattr(m, k) is not None]
    if len(sources) > 1:
        errors.append(f"model: set exactly one of model.name, model.path, model.config; got "
                      f"{' and '.join('model.' + s for s in sources)} (set the others to null)")
    if m.config is not None and not (isinstance(m.config.get("model_type"), str) and m.config["model_type"]):
        errors.append("model.config.model_type: required when the model is built from model.config "
                      "(a transformers model type such as gpt2 or llama)")
    if m.gguf_file is not None and m.path is None:
        errors.append("model.gguf_file: needs model.path (the folder holding the GGUF file)")
    one_of("model.dtype", m.dtype, DTYPES)
    at_least("model.cut_layer", m.cut_layer, 1)
    if m.server_end is not None:
        if not cfg.train.u_shape:
            errors.append("model.server_end: only used with train.u_shape: true; set it to null "
                          "or set train.u_shape: true")
        elif isinstance(m.cut_layer, int) and m.server_end <= m.cut_layer:
            errors.append(f"model.server_end: must be > model.cut_layer ({m.cut_layer}) so the server "
                          f"holds at least one layer, got {m.server_end}")
    from .quantize import check_quantize_config

    check_quantize_config(m.quantize, m.quantize_side, m.quantize_embeddings, cfg.strategy, errors)

    d = cfg.data
    one_of("data.source", d.source, DATA_SOURCES)
    non_empty("data.train_path", d.train_path, optional=True)
    non_empty("data.eval_path", d.eval_path, optional=True)
    non_empty("data.tokenizer", d.tokenizer, optional=True)
    non_empty("data.chat_template", d.chat_template, optional=True)
    non_empty("data.client_key", d.client_key, optional=True)
    for key in ("prompt_key", "completion_key", "messages_key", "text_key"):
        non_empty(f"data.{key}", getattr(d, key))
    if d.format is not None:
        one_of("data.format", d.format, DATA_FORMATS)
    one_of("data.on_long", d.on_long, DATA_ON_LONG)
    if not (math.isfinite(d.eval_fraction) and 0.0 < d.eval_fraction < 1.0):
        errors.append(f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction!r}")
    if d.source == "e2e" and d.train_path is None:
        errors.append("data.train_path: required when data.source is e2e (a file of "
                      "'meaning representation||text' lines)")
    if d.source in ("synthetic", "e2e"):
        for key in ("client_key", "client_paths"):
            if getattr(d, key) is not None:
                errors.append(f"data.{key}: natural partitions need a file source (jsonl, json, csv, "
                              f"parquet, hf_disk), data.source is {d.source!r}")
    elif d.source not in DATA_SOURCES:
        pass  # reported above
    elif d.client_paths is not None:
        if not d.client_paths or not all(p.strip() for p in d.client_paths):
            errors.append(f"data.client_paths: must be a non-empty list of files, one per client, "
                          f"got {d.client_paths!r}")
        elif len(d.client_paths) != cfg.train.clients:
            errors.append(f"data.client_paths: {len(d.client_paths)} files (one per client) but "
                          f"train.clients is {cfg.train.clients}; make them equal")
        if d.client_key is not None:
            errors.append("data.client_key: set either data.client_key or data.client_paths, not both")
        if d.train_path is not None:
            errors.append("data.train_path: not used with data.client_paths (one file per client); "
                          "set it to null")
    elif d.train_path is None:
        errors.append(f"data.train_path: required when data.source is {d.source} (the file"
                      f"{' or folder' if d.source == 'hf_disk' else ''} to train on), or set "
                      f"data.client_paths (one file per client)")
    at_least("data.max_length", d.max_length, 8)
    at_least("data.num_train", d.num_train, 1, optional=True)
    at_least("data.num_eval", d.num_eval, 1, optional=True)
    at_least("data.synthetic_examples", d.synthetic_examples, 1)
    one_of("data.partition", d.partition, PARTITIONS)
    one_of("data.pad_to", d.pad_to, PAD_TO)
    positive("data.dirichlet_alpha", d.dirichlet_alpha)

    one_of("lora.adapter_dtype", cfg.lora.adapter_dtype, DTYPES)
    for side in ("client", "server"):
        s: LoraSideConfig = getattr(cfg.lora, side)
        p = f"lora.{side}"
        at_least(f"{p}.r", s.r, 1)
        positive(f"{p}.alpha", s.alpha)
        if not (math.isfinite(s.dropout) and 0.0 <= s.dropout < 1.0):
            errors.append(f"{p}.dropout: must be in [0, 1), got {s.dropout!r}")
        if not s.target_modules or not all(t.strip() for t in s.target_modules):
            errors.append(f"{p}.target_modules: must be a non-empty list of module names, "
                          f"e.g. [c_attn], got {s.target_modules!r}")

    t = cfg.train
    for key in ("clients", "steps", "batch_size", "aggregate_every", "log_every"):
        at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("warmup_steps", "eval_every", "checkpoint_every"):
        at_least(f"train.{key}", getattr(t, key), 0)
    positive("train.lr", t.lr)
    at_least("train.weight_decay", t.weight_decay, 0)
    positive("train.max_grad_norm", t.max_grad_norm, optional=True)
    one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.u_shape and cfg.strategy not in SPLIT_STRATEGIES:
        errors.append(f"train.u_shape: only for the split strategies ({', '.join(SPLIT_STRATEGIES)}); "
                      f"strategy is {cfg.strategy!r}")

    c = cfg.codec
    one_of("codec.bits", c.bits, CODEC_BITS)
    if not (_is_power_of_two(c.group_size) and MIN_GROUP_SIZE <= c.group_size <= MAX_GROUP_SIZE):
        errors.append(f"codec.group_size: must be a power of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE} "
                      f"(16, 32, 64, ...), got {c.group_size}")

    n = cfg.network
    for key in ("client_tflops", "server_tflops", "bandwidth_mbps", "timeout_s"):
        positive(f"network.{key}", getattr(n, key))
    at_least("network.latency_ms", n.latency_ms, 0)

    e = cfg.eval
    for key in ("max_new_tokens", "num_beams", "max_sources", "batch_size"):
        at_least(f"eval.{key}", getattr(e, key), 1)

    fc = cfg.fedcybgd
    one_of("fedcybgd.order", fc.order, FEDCYBGD_ORDERS)
    at_least("fedcybgd.blocks_per_client", fc.blocks_per_client, 1)
    one_of("fedcybgd.blocks", fc.blocks, FEDCYBGD_BLOCKS)
    one_of("fedcybgd.download", fc.download, FEDCYBGD_DOWNLOADS)
    if not (math.isfinite(fc.download_fraction) and 0.0 < fc.download_fraction <= 1.0):
        errors.append(f"fedcybgd.download_fraction: must be in (0, 1], got {fc.download_fraction!r}")
    one_of("fedcybgd.download_bits", fc.download_bits, FEDCYBGD_DOWNLOAD_BITS)
    if not (_is_power_of_two(fc.download_group_size) and MIN_GROUP_SIZE <= fc.download_group_size <= MAX_GROUP_SIZE):
        errors.append(f"fedcybgd.download_group_size: must be a power of two from {MIN_GROUP_SIZE} to "
                      f"{MAX_GROUP_SIZE} (16, 32, 64, ...), got {fc.download_group_size}")

    _validate_hsplitlora(cfg, errors)
    from .federation.settings import check_federation_config

    check_federation_config(cfg.federation, errors, clients=cfg.train.clients, strategy=cfg.strategy)
    from .privacy.settings import check_privacy_config

    check_privacy_config(cfg, errors)

    if errors:
        raise ConfigError(errors)
    return cfg


def _validate_hsplitlora(cfg: RunConfig, errors: list[str]) -> None:
    h = cfg.hsplitlora
    p = "hsplitlora"

    def number(key: str, value: Any, low: float, strict: bool, integer: bool = False) -> None:
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > low if strict else value >= low)
        if not ok:
            kind = "an integer" if integer else "a number"
            errors.append(f"{key}: must be {kind} {'>' if strict else '>='} {low}, got {_describe(value)}")

    for key in ("min_cut_layer", "max_cut_layer"):
        if getattr(h, key) is not None:
            number(f"{p}.{key}", getattr(h, key), 1, False, integer=True)
    low = cfg.model.cut_layer if h.min_cut_layer is None else h.min_cut_layer
    high = cfg.model.cut_layer if h.max_cut_layer is None else h.max_cut_layer
    if isinstance(low, int) and isinstance(high, int) and high < low:
        errors.append(f"{p}.max_cut_layer: must be >= {p}.min_cut_layer ({low}; null means model.cut_layer), "
                      f"got {high}")
    elif cfg.strategy == "hsplitlora" and high != low and h.aggregation == "zero_pad":
        errors.append(f"{p}.aggregation: zero_pad needs one cut for every client "
                      f"({p}.min_cut_layer = {p}.max_cut_layer); use stacked")
    number(f"{p}.min_rank", h.min_rank, 1, False, integer=True)
    number(f"{p}.max_rank", h.max_rank, 1, False, integer=True)
    if isinstance(h.min_rank, int) and isinstance(h.max_rank, int) and h.max_rank < h.min_rank:
        errors.append(f"{p}.max_rank: must be >= {p}.min_rank ({h.min_rank}), got {h.max_rank}")
    if h.step_time_s is not None:
        number(f"{p}.step_time_s", h.step_time_s, 0, True)
    if h.importance not in HSPLITLORA_IMPORTANCE:
        errors.append(f"{p}.importance: {_describe(h.importance)} is not allowed; choose one of "
                      f"{', '.join(HSPLITLORA_IMPORTANCE)}")
    if not (math.isfinite(h.importance_beta) and 0.0 <= h.importance_beta < 1.0):
        errors.append(f"{p}.importance_beta: must be in [0, 1), got {h.importance_beta!r}")
    number(f"{p}.importance_every", h.importance_every, 1, False, integer=True)
    if not (math.isfinite(h.reconfigure_threshold) and 0.0 <= h.reconfigure_threshold <= 1.0):
        errors.append(f"{p}.reconfigure_threshold: must be in [0, 1] (a share of module pairs), "
                      f"got {h.reconfigure_threshold!r}")
    if h.aggregation not in HSPLITLORA_AGGREGATIONS:
        errors.append(f"{p}.aggregation: {_describe(h.aggregation)} is not allowed; choose one of "
                      f"{', '.join(HSPLITLORA_AGGREGATIONS)}")
    if h.restart not in HSPLITLORA_RESTARTS:
        errors.append(f"{p}.restart: {_describe(h.restart)} is not allowed; choose one of "
                      f"{', '.join(HSPLITLORA_RESTARTS)}")
    elif cfg.strategy == "hsplitlora" and h.restart == "warm" and h.aggregation != "stacked":
        errors.append(f"{p}.restart: warm restarts the adapters after a stacked fold; {p}.aggregation="
                      f"{_describe(h.aggregation)} keeps them and folds nothing: use restart=fresh")
    if h.export_rank is not None:
        number(f"{p}.export_rank", h.export_rank, 1, False, integer=True)
    if h.configuration not in HSPLITLORA_CONFIGURATIONS:
        errors.append(f"{p}.configuration: {_describe(h.configuration)} is not allowed; choose one of "
                      f"{', '.join(HSPLITLORA_CONFIGURATIONS)}")
    if h.server_adapters not in HSPLITLORA_SERVER_ADAPTERS:
        errors.append(f"{p}.server_adapters: {_describe(h.server_adapters)} is not allowed; choose one of "
                      f"{', '.join(HSPLITLORA_SERVER_ADAPTERS)}")
    elif cfg.strategy == "hsplitlora" and h.server_adapters == "per_client":
        if h.aggregation != "stacked":
            errors.append(f"{p}.server_adapters: per_client needs {p}.aggregation=stacked (got "
                          f"{_describe(h.aggregation)}); use server_adapters=shared with zero_pad")

    total = 0
    for name, spec in h.devices.items():
        key = f"{p}.devices.{name}"
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            errors.append(f"{key}: expected a mapping of {', '.join(HSPLITLORA_DEVICE_KEYS)}, got {_describe(spec)}")
            continue
        for k in spec:
            if k not in HSPLITLORA_DEVICE_KEYS:
                errors.append(f"{key}.{k}: unknown key; valid keys of a device class: "
                              f"{', '.join(HSPLITLORA_DEVICE_KEYS)}")
        count = spec.get("count", 1)
        number(f"{key}.count", count, 1, False, integer=True)
        if isinstance(count, int) and not isinstance(count, bool):
            total += count
        for k in ("tflops", "bandwidth_mbps"):
            if spec.get(k) is not None:
                number(f"{key}.{k}", spec[k], 0, True)
        if spec.get("memory_gib") is not None:
            number(f"{key}.memory_gib", spec["memory_gib"], 0, True)
        if spec.get("latency_ms") is not None:
            number(f"{key}.latency_ms", spec["latency_ms"], 0, False)
    if cfg.strategy == "hsplitlora" and h.devices and total != cfg.train.clients:
        errors.append(f"{p}.devices: the counts of the device classes add up to {total} clients but "
                      f"train.clients is {cfg.train.clients}; make them equal")


def validate_model_layers(cfg: RunConfig, num_layers: int) -> int:
    """Check the cut against a model with `num_layers` decoder layers.

    Returns the end (exclusive) of the server's layer range: ``num_layers``, or with
    ``train.u_shape`` ``model.server_end`` (default ``num_layers - 1``), the client keeping the rest.
    """
    cut = cfg.model.cut_layer
    if num_layers < 2:
        raise ConfigError(f"model.cut_layer: the model has {num_layers} decoder layer(s); a split "
                          "needs at least 2")
    if not 1 <= cut <= num_layers - 1:
        raise ConfigError(f"model.cut_layer: must be in [1, {num_layers - 1}] for a model with "
                          f"{num_layers} decoder layers, got {cut}")
    if not cfg.train.u_shape:
        return num_layers
    end = cfg.model.server_end
    if end is None:
        end = num_layers - 1
        if cut >= end:
            raise ConfigError(f"model.cut_layer: with train.u_shape the client also keeps the last "
                              f"layer, so cut_layer must be in [1, {num_layers - 2}] for a model with "
                              f"{num_layers} decoder layers, got {cut}")
    elif not cut < end <= num_layers - 1:
        raise ConfigError(f"model.server_end: must be in [{cut + 1}, {num_layers - 1}] (above "
                          f"model.cut_layer, below the last of {num_layers} decoder layers), got {end}")
    return end


# --------------------------------------------------------------------------------------------
# Overrides, loading and dumping
# --------------------------------------------------------------------------------------------

def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=yaml_value`` overrides to a raw config mapping (a modified deep copy)."""
    data = copy.deepcopy(data)
    implicit_default = False  # model.config was filled in with DEFAULT_MODEL_CONFIG by an override
    explicit: set[str] = set()  # the model.config keys the overrides set
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=50")
        try:
            value = _yaml_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse the value {text!r} as YAML ({exc})") from None
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty part in the key {key!r}")
        if parts[:2] == ["model", "config"]:
            if len(parts) == 2:  # the whole mapping: what it says is all there is
                implicit_default = False
                explicit.clear()
            else:
                explicit.add(parts[2])
        node = data
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            child = node.get(part)
            if child is None:
                # Keys under model.config extend the model config in effect: the demo one by default.
                if here == "model.config" and not (node.get("name") or node.get("path")):
                    child = copy.deepcopy(DEFAULT_MODEL_CONFIG)
                    implicit_default = True
                else:
                    child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"{key}: cannot set it, {here} is {_describe(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    if implicit_default:
        # The demo's GPT-2 keys came with the default, not from the user: another model type starts
        # from its own defaults and the keys the overrides give (module docstring).
        model_config = data["model"]["config"]
        if isinstance(model_config, dict) and model_config.get("model_type") != DEFAULT_MODEL_CONFIG["model_type"]:
            data["model"]["config"] = {k: v for k, v in model_config.items() if k in explicit}
    return data


def config_from_dict(d: dict | None) -> RunConfig:
    """Build and validate a RunConfig from a (possibly partial) nested mapping."""
    errors: list[str] = []
    cfg = _build(RunConfig, d, "", errors)
    if errors:
        raise ConfigError(errors)
    return validate(cfg)


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as plain nested dicts and lists (a deep copy), in schema order."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (None: the defaults, i.e. the demo), apply overrides, validate."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            data = _yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, "
                              f"got {_describe(data)}")
    if isinstance(overrides, str):
        overrides = [overrides]
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``load_config(path)`` gives back an equal RunConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100)
    path.write_text("# resolved splitlora config; relative paths are relative to the working directory\n"
                    + text)
    return path
