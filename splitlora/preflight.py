"""Checks made before a run starts, so that nothing is silently overwritten or read from a wrong path.

- ``prepare_output_dir(cfg, role)``: a run's ``output_dir`` that already holds another run is
  refused unless ``resume=true`` (continue it) or ``overwrite=true`` (its files are deleted first).
- ``check_input_paths(cfg)``: ``model.path``, ``model.gguf_file`` and ``data.tokenizer`` exist, or
  one error line naming the key and the path.
- ``runs_in(folder)``: the runs a folder holds, itself or its subfolders (``splitlora eval runs/demo``
  after the demo, which writes ``runs/demo/int8`` and ``runs/demo/fp32``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["RUN_FILES", "run_evidence", "check_output_dir", "prepare_output_dir", "check_input_paths", "runs_in"]

# What a run writes into its output_dir (trainer.py): removed by overwrite=true, nothing else is.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "generations.jsonl", "loss.png", "checkpoints",
             "adapter", "base_model", "model", "clients")
# The files that show a run has trained (config.yaml alone is what a run that stopped before its
# first step leaves, e.g. on a wrong cut layer: a corrected rerun may reuse its folder).
_TRAINED = ("metrics.jsonl", "summary.json", "adapter", "model")


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _is_client_process(role: Optional[str]) -> bool:
    from .transport import is_client_process

    return is_client_process(role)


def run_evidence(folder: str | Path, role: Optional[str] = None) -> List[str]:
    """What in `folder` shows that a run was trained there ([] when none): for the server or a
    one-process run its checkpoints, metrics, summary or export (with its config.yaml); for a client
    process under transport=dist (`role` clientN) its own checkpoints in `clients/<role>/`."""
    folder = Path(folder)
    if _is_client_process(role):
        ckpt = folder / "clients" / role / "checkpoints"
        return [f"clients/{role}/checkpoints/"] if _non_empty_dir(ckpt) else []
    found = [name for name in _TRAINED if (folder / name).exists()]
    if _non_empty_dir(folder / "checkpoints"):
        found.append("checkpoints/")
    if found and (folder / "config.yaml").is_file():
        found.insert(0, "config.yaml")
    return [f"{name}/" if (folder / name).is_dir() and not name.endswith("/") else name for name in found]


def check_output_dir(cfg, role: Optional[str] = None) -> None:
    """Raise ValueError when `cfg.output_dir` holds another run and neither resume nor overwrite is set."""
    evidence = run_evidence(cfg.output_dir, role)
    if evidence and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"output_dir: {cfg.output_dir} already holds a run ({', '.join(evidence)}); set resume=true to "
            f"continue it from its last checkpoint, or overwrite=true to delete it and start again "
            f"(or choose another output_dir)")


def prepare_output_dir(cfg, role: Optional[str] = None, *, log: Callable[[str], None] = print) -> None:
    """check_output_dir, then with overwrite=true delete the earlier run's files (RUN_FILES; a
    client process under transport=dist deletes its own `clients/<role>/` only, the server all but
    `clients/`, which the client processes are writing into at the same time)."""
    check_output_dir(cfg, role)
    if not cfg.overwrite:
        return
    out = Path(cfg.output_dir)
    if _is_client_process(role):
        targets = [out / "clients" / role]
    else:  # a one-process run (role None) or the server
        targets = [out / name for name in RUN_FILES if not (role is not None and name == "clients")]
    removed = [p for p in targets if p.exists() or p.is_symlink()]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if removed:
        log(f"overwrite: deleted the earlier run's {', '.join(p.name for p in removed)} in {out}")


def check_input_paths(cfg) -> None:
    """The files a run reads from the model and tokenizer keys exist: else a ValueError naming the
    key and the path (data files are checked where they are read, data.loading)."""
    m, d = cfg.model, cfg.data
    if m.path is not None:
        folder = Path(m.path)
        if not folder.is_dir():
            raise ValueError(f"model.path: no such folder {m.path!r} (a folder written by save_pretrained)")
        if m.gguf_file is not None:
            if not (folder / m.gguf_file).is_file():
                found = sorted(p.name for p in folder.glob("*.gguf"))
                raise ValueError(f"model.gguf_file: no file {m.gguf_file!r} in {m.path!r}; GGUF files there: "
                                 f"{', '.join(found) or 'none'}")
        elif not (folder / "config.json").is_file():
            raise ValueError(f"model.path: {m.path!r} holds no config.json (not a folder written by "
                             f"save_pretrained; a GGUF file in it needs model.gguf_file)")
    if d.tokenizer is not None and not Path(d.tokenizer).exists():
        raise ValueError(f"data.tokenizer: no such file or folder {d.tokenizer!r} (a tokenizer folder, "
                         f"tokenizer.json, a WordTokenizer .json or a .gguf file)")


def runs_in(folder: str | Path) -> List[Path]:
    """[folder] when it is a run folder (holds config.yaml), else its subfolders that are, sorted."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
