"""Interop with PEFT: convert a PEFT LoRA model to FusedLoRALinear layers, and read and write PEFT
adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

Only plain LoRA on linear layers maps onto FusedLoRALinear: one adapter, no DoRA or other LoRA
variant, no trainable biases, no modules_to_save / trainable tokens, no LoRA on embeddings or convs.
Everything else is refused with a ValueError rather than converted approximately.

`save_peft_adapter` and `load_peft_adapter` handle the files themselves (no peft import), writing
only long-standing config fields so that older PEFT releases load them too; only `from_peft` needs
the `peft` package.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from .layers import (FusedLoRALinear, _is_conv1d, _is_linear4bit, _is_linear_like, apply_fused_lora,
                     load_lora_state_dict, lora_modules)

__all__ = ["from_peft", "save_peft_adapter", "load_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the transformers model).
KEY_PREFIX = "base_model.model."

# Config fields whose truthy value selects a LoRA variant or an extra that FusedLoRALinear does not
# compute; loading such an adapter as plain LoRA would silently give different outputs.
_UNSUPPORTED_CONFIG_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias (lora_bias=True)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
}


def _import_peft():
    try:
        import peft
        from peft.tuners import lora
    except ImportError as err:  # pragma: no cover - peft is installed in the test environment
        raise ImportError("from_peft needs the `peft` package: pip install 'splitlora[peft]'.") from err
    return peft, lora


# --------------------------------------------------------------------------------------------
# PEFT model -> FusedLoRALinear
# --------------------------------------------------------------------------------------------


def _unwrap_peft_model(peft_model, peft, lora):
    """(inner transformers model, {adapter name: config} or None)."""
    if isinstance(peft_model, peft.PeftModel):
        tuner = peft_model.base_model
        if not isinstance(tuner, lora.LoraModel):
            raise ValueError(
                f"from_peft converts LoRA adapters only; this PeftModel holds a {type(tuner).__name__} "
                f"(peft_type {getattr(peft_model.peft_config.get(peft_model.active_adapter), 'peft_type', '?')})."
            )
        return tuner.model, dict(peft_model.peft_config)
    if isinstance(peft_model, lora.LoraModel):
        return peft_model.model, dict(peft_model.peft_config)
    if isinstance(peft_model, nn.Module):
        # A transformers model with adapters injected in place (model.add_adapter / load_adapter).
        configs = getattr(peft_model, "peft_config", None)
        return peft_model, dict(configs) if isinstance(configs, Mapping) else None
    raise ValueError(
        f"peft_model must be a peft.PeftModel, a peft LoraModel or an nn.Module holding PEFT LoRA layers; "
        f"got {type(peft_model).__name__}."
    )


def _is_peft_linear4bit(layer) -> bool:
    """PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit), without importing bitsandbytes."""
    return type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"


def _plan_peft_layer(name: str, layer, lora) -> dict:
    """Check one PEFT layer and return what its FusedLoRALinear needs; raises on anything unsupported."""
    if type(layer) is not lora.Linear and not _is_peft_linear4bit(layer):
        raise ValueError(
            f"module {name!r} is a {type(layer).__module__}.{type(layer).__name__}; from_peft converts only "
            "peft.tuners.lora.Linear layers (LoRA on nn.Linear or GPT-2 Conv1D) and QLoRA's "
            "peft.tuners.lora.bnb.Linear4bit, not LoRA on embeddings, convolutions, 8-bit or parallel layers."
        )
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(
            f"module {name!r} holds {len(adapters)} LoRA adapters {adapters}; from_peft converts exactly one. "
            "Delete the others first (peft_model.delete_adapter(name))."
        )
    adapter = adapters[0]
    active = list(layer.active_adapters)
    if active != [adapter]:
        raise ValueError(
            f"module {name!r} has active adapters {active} but holds only {adapter!r}; "
            f"activate exactly that one (peft_model.set_adapter({adapter!r}))."
        )
    if layer.disable_adapters:
        raise ValueError(
            f"the adapters of module {name!r} are disabled; re-enable them (peft_model.enable_adapter_layers()) "
            "or convert the base model without PEFT."
        )
    if layer.merged:
        raise ValueError(
            f"module {name!r} has its adapter merged into the base weight; call peft_model.unmerge_adapter() first "
            "so the base weight and the adapter are separate again."
        )
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"module {name!r} uses DoRA, which FusedLoRALinear does not implement.")
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(
            f"module {name!r} uses the LoRA variant {type(variant).__name__}, which FusedLoRALinear does not implement."
        )
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"module {name!r} has a LoRA bias (lora_bias=True), which FusedLoRALinear does not implement.")
    base = layer.get_base_layer()
    if not (_is_linear_like(base) or _is_linear4bit(base)):
        raise ValueError(
            f"the base layer of module {name!r} is a {type(base).__name__}; only nn.Linear, Conv1D and "
            "bitsandbytes Linear4bit bases are supported."
        )
    r = int(layer.r[adapter])
    alpha = layer.lora_alpha[adapter]
    use_rslora = bool(getattr(layer, "use_rslora", {}).get(adapter, False))
    expected_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    if not math.isclose(layer.scaling[adapter], expected_scaling, rel_tol=1e-9):
        raise ValueError(
            f"module {name!r} has scaling {layer.scaling[adapter]} but its r={r} and lora_alpha={alpha} give "
            f"{expected_scaling}; a scaling changed after creation (set_scale / scale_layer) is not supported."
        )
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        raise ValueError(f"module {name!r} uses a {type(dropout).__name__} as LoRA dropout; expected nn.Dropout.")
    return dict(
        base=base,
        r=r,
        alpha=alpha,
        use_rslora=use_rslora,
        dropout=p,
        lora_A=layer.lora_A[adapter].weight,
        lora_B=layer.lora_B[adapter].weight,
        training=layer.training,
    )


def from_peft(peft_model) -> nn.Module:
    """Replace every PEFT LoRA layer by a FusedLoRALinear computing the same function, in place.

    Accepts a `peft.PeftModel`, a `peft.tuners.lora.LoraModel`, or a transformers model with
    adapters injected in place. Returns the inner transformers model (`peft_model.base_model.model`
    for a PeftModel): the same object, now holding FusedLoRALinear modules. The PEFT wrapper around
    it must not be used afterwards (its bookkeeping refers to layers that are gone).

    Parameters are shared, not copied: each FusedLoRALinear's `weight`/`bias` are the base layer's
    Parameters and its `lora_A`/`lora_B` are PEFT's `lora_A[adapter].weight` / `lora_B[adapter].weight`
    objects (so an optimizer built on them keeps working). requires_grad flags are left as PEFT set them.
    Adapters that PEFT keeps in float32 beside a half-precision base stay float32; FusedLoRALinear
    casts them to the base dtype in forward (PEFT computes that path in float32 instead, so half-precision
    outputs agree to half-precision rounding, float32 models exactly).

    Raises ValueError, before changing anything, for what FusedLoRALinear cannot represent: more than
    one adapter, DoRA or another LoRA variant, bias != "none", a LoRA bias, modules_to_save or trainable
    tokens, LoRA on non-linear layers, merged or disabled adapters.
    """
    peft, lora = _import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    model, configs = _unwrap_peft_model(peft_model, peft, lora)
    if configs is not None:
        if len(configs) > 1:
            raise ValueError(
                f"the model holds {len(configs)} adapters {sorted(configs)}; from_peft converts exactly one. "
                "Delete the others first (peft_model.delete_adapter(name))."
            )
        for adapter, config in configs.items():
            bias = getattr(config, "bias", "none")
            if bias != "none":
                raise ValueError(
                    f"adapter {adapter!r} was created with bias={bias!r} (trainable base biases); from_peft supports "
                    "only bias='none'."
                )

    plans = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(
                f"module {name!r} is a PEFT {type(module).__name__} (modules_to_save or trainable tokens), "
                "which from_peft does not support."
            )
        if isinstance(module, BaseTunerLayer):
            plans.append((name, _plan_peft_layer(name, module, lora)))
    if not plans:
        raise ValueError("no PEFT LoRA layer found in peft_model; nothing to convert.")

    for name, plan in plans:
        base = plan["base"]
        new = FusedLoRALinear.__new__(FusedLoRALinear)
        nn.Module.__init__(new)
        # A 4-bit base (QLoRA) keeps its quantized weight; the fused layer dequantizes it on the fly.
        new._setup(base.weight, base.bias, _is_conv1d(base), plan["r"], plan["alpha"], plan["dropout"], plan["use_rslora"],
                   base_4bit=base if _is_linear4bit(base) else None)
        # Adopt PEFT's Parameter objects themselves (values, dtype, requires_grad, optimizer identity).
        new.lora_A = plan["lora_A"]
        new.lora_B = plan["lora_B"]
        new.train(plan["training"])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)

    # PEFT's bookkeeping on the inner model would make transformers treat it as a PEFT model still
    # (e.g. save_pretrained writing an adapter instead of the weights).
    if "peft_config" in vars(model):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    return model


# --------------------------------------------------------------------------------------------
# Adapter folders
# --------------------------------------------------------------------------------------------


def _pattern_key(pattern_keys, name: str) -> Optional[str]:
    # PEFT's get_pattern_key: the first key that matches a '.'-bounded suffix of the name, as a regex.
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _most_common(values):
    # Ties go to the value seen first, so the choice is deterministic for a given model.
    return Counter(values).most_common(1)[0][0]


def _number(value: float):
    # PEFT writes r and lora_alpha as ints; keep ints ints so the JSON reads like PEFT's own.
    return int(value) if float(value).is_integer() else float(value)


def _pattern(values: Dict[str, float], default, all_names) -> Dict[str, float]:
    """rank_pattern / alpha_pattern entries for the modules whose value differs from the default: a
    bare suffix where every module with that suffix shares the value, full names otherwise."""
    by_suffix: Dict[str, set] = {}
    for name, value in values.items():
        by_suffix.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    pattern = {}
    for name, value in values.items():
        if value == default:
            continue
        suffix = name.rsplit(".", 1)[-1]
        # A suffix key would also apply to unwrapped modules with that suffix should PEFT target them.
        suffix_ok = len(by_suffix[suffix]) == 1 and all(
            n in values for n in all_names if n.rsplit(".", 1)[-1] == suffix
        )
        pattern[suffix if suffix_ok else name] = _number(value)
    return pattern


def save_peft_adapter(
    model: nn.Module, path: Union[str, Path], base_model_name_or_path: Optional[str] = None
) -> Path:
    """Write the FusedLoRALinear adapters of `model` as a PEFT LoRA adapter folder: `adapter_config.json`
    and `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`,
    which `peft.PeftModel.from_pretrained(base_model, path)` loads.

    Module names are taken relative to `model`, so pass the whole transformers model whose base the
    adapter will be loaded onto. Per-module ranks and alphas go to rank_pattern / alpha_pattern; the
    tensors keep their dtype. Returns the folder path.
    """
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("model holds no FusedLoRALinear module; wrap it first with apply_fused_lora() or from_peft().")
    dropouts = {m.lora_dropout for m in modules.values()}
    if len(dropouts) > 1:
        raise ValueError(
            f"the model's LoRA modules use different dropout rates {sorted(dropouts)}, but a PEFT adapter_config "
            "holds a single lora_dropout; set one rate on all modules before saving."
        )
    rslora = {m.use_rslora for m in modules.values()}
    if len(rslora) > 1:
        raise ValueError(
            "some LoRA modules use rsLoRA scaling and others do not, but a PEFT adapter_config holds a single "
            "use_rslora flag; use the same scaling on all modules before saving."
        )

    all_names = [n for n, _ in model.named_modules() if n]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in modules})
    # Suffixes are what PEFT users write, but PEFT would then wrap every module with that suffix; fall
    # back to full names when only some are wrapped (e.g. the client half of a split model).
    covered = {n for n in all_names if n.rsplit(".", 1)[-1] in suffixes}
    target_modules = suffixes if covered == set(modules) else sorted(modules)

    ranks = {n: m.r for n, m in modules.items()}
    alphas = {n: m.lora_alpha for n, m in modules.items()}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": _number(r),
        "lora_alpha": _number(alpha),
        "lora_dropout": dropouts.pop(),
        "target_modules": target_modules,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern(ranks, r, all_names),
        "alpha_pattern": _pattern(alphas, alpha, all_names),
    }

    tensors = {}
    for name, module in modules.items():
        # clone(): safetensors refuses tensors that share storage, and the arrays must be contiguous.
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous().clone()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous().clone()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, str(path / SAFETENSORS_NAME), metadata={"format": "pt"})
    return path


def _read_adapter_folder(path: Path):
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {str(path)!r} does not exist (expected a folder holding {CONFIG_NAME}).")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} is missing; a PEFT adapter folder holds {CONFIG_NAME}.")
    with open(config_file) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}.") from None
    if (path / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / SAFETENSORS_NAME))
    elif (path / BIN_NAME).is_file():
        tensors = torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"no adapter weights in {str(path)!r}: expected {SAFETENSORS_NAME} (or the older {BIN_NAME})."
        )
    return config, tensors


def _check_config(config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"the adapter has peft_type {peft_type!r}; load_peft_adapter reads LoRA adapters (peft_type 'LORA').")
    for field, what in _UNSUPPORTED_CONFIG_FIELDS.items():
        if config.get(field):
            raise ValueError(f"the adapter uses {what} ({field}={config[field]!r}), which FusedLoRALinear does not implement.")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"the adapter was trained with bias={bias!r}; load_peft_adapter supports only bias='none'.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() == "mica":
        raise ValueError("the adapter uses the MiCA variant (init_lora_weights='mica'), which FusedLoRALinear does not implement.")


def _group_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{module name: {"lora_A": A, "lora_B": B}} from PEFT's flat keys."""
    key_re = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        match = key_re.match(key)
        if match is None:
            foreign.append(key)
            continue
        grouped.setdefault(match["module"], {})[match["which"]] = value
    if foreign:
        raise ValueError(
            f"the adapter file holds tensors that are not plain LoRA weights {foreign[:6]}"
            f"{' ...' if len(foreign) > 6 else ''}; expected only keys '{KEY_PREFIX}<module>.lora_A.weight' and "
            "'.lora_B.weight' (LoRA on embeddings, DoRA magnitudes, LoRA biases and modules_to_save are not supported)."
        )
    incomplete = sorted(n for n, pair in grouped.items() if len(pair) != 2)
    if incomplete:
        raise ValueError(f"the adapter file lacks lora_A or lora_B for modules {incomplete}.")
    if not grouped:
        raise ValueError("the adapter file holds no LoRA weights.")
    for name, pair in grouped.items():
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {name!r}: lora_A has shape {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected [r, in] and "
                "[out, r] with the same r."
            )
    return grouped


def load_peft_adapter(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a PEFT LoRA adapter folder (written by `save_peft_adapter` or PEFT's `save_pretrained`) into
    `model`, in place; returns `model`.

    - If `model` holds no FusedLoRALinear yet, the modules named in the weights file are wrapped (ranks
      from the tensors, checked against r / rank_pattern; alphas from lora_alpha / alpha_pattern; dropout
      and use_rslora from the config) and every other parameter is frozen, as apply_fused_lora does.
    - If it is already wrapped, its FusedLoRALinear modules must be exactly the file's modules with the
      same shapes; their values are copied in place and lora_alpha / use_rslora are set from the config
      (they define the adapter's scaling). lora_dropout, a training setting, is left as it is.

    Module names in the file are relative to the transformers model (PEFT's `base_model.model.` prefix),
    so `model` must be that model. Missing files raise FileNotFoundError; unsupported adapter features,
    unknown modules and shape mismatches raise ValueError.
    """
    config, tensors = _read_adapter_folder(Path(path))
    _check_config(config)
    grouped = _group_tensors(tensors)

    default_r = config.get("r", 8)
    default_alpha = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)

    alphas = {}
    for name, pair in grouped.items():
        key = _pattern_key(rank_pattern, name)
        expected_r = rank_pattern[key] if key is not None else default_r
        if pair["lora_A"].shape[0] != expected_r:
            raise ValueError(
                f"module {name!r}: the adapter config gives rank {expected_r} but lora_A has shape "
                f"{tuple(pair['lora_A'].shape)} (rank {pair['lora_A'].shape[0]}); the config and weights disagree."
            )
        key = _pattern_key(alpha_pattern, name)
        alphas[name] = alpha_pattern[key] if key is not None else default_alpha

    existing = lora_modules(model)
    if not existing:
        module_names = {n for n, _ in model.named_modules()}
        absent = sorted(n for n in grouped if n not in module_names)
        if absent:
            raise ValueError(
                f"the adapter targets modules {absent[:6]}{' ...' if len(absent) > 6 else ''} that "
                f"{type(model).__name__} does not have; load it into the model it was trained on "
                "(names are relative to the transformers model, without PEFT's 'base_model.model.' prefix)."
            )
        for name in grouped:
            module = model.get_submodule(name)
            a, b = grouped[name]["lora_A"], grouped[name]["lora_B"]
            weight_shape = tuple(module.weight.shape) if _is_linear_like(module) else None
            expected = (a.shape[1], b.shape[0])
            actual = None
            if weight_shape is not None:
                actual = weight_shape if _is_conv1d(module) else weight_shape[::-1]
            if actual is not None and tuple(actual) != tuple(expected):
                raise ValueError(
                    f"module {name!r} maps {actual[0]} -> {actual[1]} features but the adapter's lora_A "
                    f"{tuple(a.shape)} and lora_B {tuple(b.shape)} expect {expected[0]} -> {expected[1]}."
                )
        apply_fused_lora(
            model,
            sorted(grouped),
            r={n: int(p["lora_A"].shape[0]) for n, p in grouped.items()},
            alpha=alphas,
            dropout=dropout,
            use_rslora=use_rslora,
        )
        existing = lora_modules(model)
    else:
        missing = sorted(n for n in existing if n not in grouped)
        unexpected = sorted(n for n in grouped if n not in existing)
        if missing or unexpected:
            raise ValueError(
                "the adapter's modules do not match the model's FusedLoRALinear modules: "
                f"in the model but not the adapter {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                f"in the adapter but not the model {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}."
            )
        merged = sorted(n for n, m in existing.items() if m.merged)
        if merged:
            raise ValueError(f"modules {merged} are merged; unmerge them (unmerge_lora(model)) before loading an adapter.")
        for name, module in existing.items():
            for which in ("lora_A", "lora_B"):
                given = tuple(grouped[name][which].shape)
                own = tuple(getattr(module, which).shape)
                if given != own:
                    raise ValueError(
                        f"module {name!r}: the adapter's {which} has shape {given} but the model's has {own} "
                        "(a different rank or layer size)."
                    )
        for name, module in existing.items():
            module.lora_alpha = float(alphas[name])
            module.use_rslora = use_rslora

    state = {}
    for name, pair in grouped.items():
        prefix = f"{name}." if name else ""
        state[prefix + "lora_A"] = pair["lora_A"]
        state[prefix + "lora_B"] = pair["lora_B"]
    load_lora_state_dict(model, state, strict=True)
    return model
