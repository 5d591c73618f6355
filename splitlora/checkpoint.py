"""Checkpoints: any nested state (dicts, lists, tensors, numbers, strings) to one folder, atomically.

A checkpoint is a folder `step_<N>/` holding `tensors.safetensors` (every tensor of the state,
keyed by its path) and `state.json` (everything else, with tensors replaced by references).
It is written into a temporary folder and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and never a half-written one; `latest` names the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_PAIRS = "__pairs__"  # dicts whose keys are not all strings (optimizer states use int keys)
_TUPLE = "__tuple__"


def _flatten(obj: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        # safetensors refuses tensors that share storage; a checkpoint wants independent copies.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {_PAIRS: [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}; use tensors, numbers, strings, "
                    "lists and dicts")


def _unflatten(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj and len(obj) == 1:
            return tensors[obj[_TENSOR]]
        if _PAIRS in obj and len(obj) == 1:
            return {k: _unflatten(v, tensors) for k, v in obj[_PAIRS]}
        if _TUPLE in obj and len(obj) == 1:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Writes `state` as `directory/step_<step>` atomically, points `latest` at it, and keeps
    the newest `keep` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    final = directory / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=directory))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, "state": skeleton}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(directory / "latest", final.name)
    for old in sorted(p for p in directory.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    directory = Path(directory)
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path) -> Tuple[int, dict]:
    """(step, state) of a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    try:
        with open(path / "state.json") as f:
            meta = json.load(f)
        tensors = load_file(str(path / "tensors.safetensors"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path} is unreadable ({err}); delete it to start over") from None
    return int(meta["step"]), _unflatten(meta["state"], tensors)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
