"""Checkpoints: any nested state (dicts, lists, tensors, numbers, strings) to one folder, atomically.

A checkpoint is a folder `step_<N>/` holding `tensors.safetensors` (every tensor of the state,
keyed by its path), `state.json` (everything else, with tensors replaced by references) and
`manifest.json` (each of those files' size and sha256, written last). It is written into a
temporary folder (`.step_<N>.*`, never read) and renamed into place, so a crash mid-write leaves
the previous checkpoints intact and never a half-written one.

Resuming does not trust `latest` (a pointer kept for people): `find_checkpoint` lists the
`step_*` folders newest first, verifies each against its manifest (every file present, sizes and
checksums equal, state.json parses, the safetensors file opens and holds every tensor state.json
refers to) and takes the newest that verifies, saying which it skipped and why. A checkpoint
written before manifests existed is accepted when its files read (it cannot be checked by
checksum, and that is said too).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_TENSOR = "__tensor__"
_PAIRS = "__pairs__"  # dicts whose keys are not all strings (optimizer states use int keys)
_TUPLE = "__tuple__"

TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
_STEP_FOLDER = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint folder that is not a whole checkpoint (the message says why), or a checkpoints
    folder none of whose checkpoints is."""


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


def _tensor_refs(obj: Any, out: set) -> set:
    """The tensor keys a state.json skeleton refers to."""
    if isinstance(obj, dict):
        if _TENSOR in obj and len(obj) == 1:
            out.add(obj[_TENSOR])
        else:
            for v in obj.values():
                _tensor_refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _tensor_refs(v, out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Writes `state` as `directory/step_<step>` atomically (its manifest last), points `latest` at
    it, and prunes: checkpoints of later steps go (a run that continues from an earlier checkpoint
    replaces them), and of the earlier ones the newest `keep - 1` complete ones stay beside this one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    final = directory / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=directory))
    try:
        save_file(tensors, str(tmp / TENSORS))
        _fsync(tmp / TENSORS)
        _write_synced(tmp / STATE, json.dumps({"step": step, "state": skeleton}))
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                 for name in (TENSORS, STATE)}
        _write_synced(tmp / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(directory / "latest", final.name)
    _prune(directory, step, keep)
    return final


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(directory: Path, step: int, keep: int) -> None:
    kept = 1  # the checkpoint just written
    for s, path in list_checkpoints(directory):
        if s == step:
            continue
        if s < step and kept < keep and _looks_complete(path):
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
    # Temporary folders of writes that never finished (a killed process): never read, only in the way.
    for tmp in directory.glob(".step_*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _looks_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() or ((path / STATE).is_file() and (path / TENSORS).is_file())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder, from its name (`step_<N>`)."""
    match = _STEP_FOLDER.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (its name is not step_<N>)")
    return int(match.group(1))


def list_checkpoints(directory: str | Path) -> List[Tuple[int, Path]]:
    """(step, folder) of every `step_<N>` folder in `directory`, newest first, whole or not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_FOLDER.fullmatch(path.name)
        if match is not None and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: item[0], reverse=True)


def verify_checkpoint(path: str | Path) -> bool:
    """Raises CheckpointError saying why when `path` is not a whole checkpoint. Returns True when
    its files matched its manifest's sizes and checksums, False for a checkpoint written before
    manifests (its files read, but nothing says they hold what was written)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("not a folder")
    checked = (path / MANIFEST).is_file()
    if checked:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
            expected = {name: (int(files[name]["size"]), str(files[name]["sha256"])) for name in (TENSORS, STATE)}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
        for name, (size, digest) in expected.items():
            if not (path / name).is_file():
                raise CheckpointError(f"{name} is missing")
            actual = (path / name).stat().st_size
            if actual != size:
                raise CheckpointError(f"{name} is {actual} bytes, {size} were written (truncated or replaced)")
            if _sha256(path / name) != digest:
                raise CheckpointError(f"{name} does not match its checksum (sha256): its bytes changed after "
                                      "it was written")
    else:
        for name in (STATE, TENSORS):
            if not (path / name).is_file():
                raise CheckpointError(f"{name} is missing")
    try:
        meta = json.loads((path / STATE).read_text())
        step = int(meta["step"])
        refs = _tensor_refs(meta["state"], set())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{STATE} is unreadable ({type(err).__name__}: {err})") from None
    match = _STEP_FOLDER.fullmatch(path.name)
    if match is not None and int(match.group(1)) != step:
        raise CheckpointError(f"{STATE} is of step {step}, not of step {int(match.group(1))} as the folder's name says")
    try:
        from safetensors import safe_open

        # Opening reads the header and checks that the tensors' offsets cover the file exactly.
        with safe_open(str(path / TENSORS), framework="pt") as f:
            keys = set(f.keys())
    except Exception as err:  # safetensors' own error type, OSError
        raise CheckpointError(f"{TENSORS} does not load ({err})") from None
    missing = refs - keys
    if missing:
        raise CheckpointError(f"{TENSORS} lacks {len(missing)} tensor(s) that {STATE} refers to, e.g. "
                              f"{sorted(missing)[0]!r}")
    return checked


def find_checkpoint(directory: str | Path, *, log: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint folder in `directory` that verifies (`verify_checkpoint`); None when
    there is no checkpoint at all. Each one skipped, and one that could not be checked by checksum,
    gets a line through `log` (default: the logging warning). Raises CheckpointError, naming the
    folder and every checkpoint's reason, when checkpoints exist but none verifies."""
    directory = Path(directory)
    say = log if log is not None else logger.warning
    candidates = list_checkpoints(directory)
    pointer = directory / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = None
        if name not in {p.name for _, p in candidates}:
            shown = "unreadable" if name is None else f"names {name[:60]!r}"
            say(f"resume: {pointer} {shown}, which is no checkpoint here; ignored (the step_* folders are "
                "checked instead)")
    rejected = []
    for _, path in candidates:
        try:
            checked = verify_checkpoint(path)
        except CheckpointError as err:
            say(f"resume: skipped the checkpoint {path}: {err}")
            rejected.append(f"{path.name}: {err}")
            continue
        if not checked:
            say(f"resume: the checkpoint {path} has no {MANIFEST} (written by an earlier version): its files read, "
                "but could not be verified by checksum")
        return path
    if rejected:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(rejected)
                              + ". Move the folder away (or set resume=false) to start again from step 0")
    return None


def latest_checkpoint(directory: str | Path, *, log: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint that verifies (see `find_checkpoint`), None when there is none."""
    return find_checkpoint(directory, log=log)


def load_checkpoint(path: str | Path) -> Tuple[int, dict]:
    """(step, state) of a checkpoint folder written by `save_checkpoint` (verify it first with
    `verify_checkpoint`: this reads it as it is)."""
    path = Path(path)
    try:
        with open(path / STATE) as f:
            meta = json.load(f)
        tensors = load_file(str(path / TENSORS))
        return int(meta["step"]), _unflatten(meta["state"], tensors)
    except Exception as err:  # OSError, JSON, safetensors' own error, a missing tensor
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); delete it to use "
                              "an earlier one") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
