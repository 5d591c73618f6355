"""Readers for the user's own files, one per ``data.source``, through Hugging Face ``datasets``.

Every reader turns a path into a list of rows (plain dicts, one per record). A new format is one
function and one :func:`register_format` call. No reader ever touches the network: ``datasets``
is put in offline mode before it is imported, and a path that does not exist is an error naming
the config key and the path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List

__all__ = ["FILE_FORMATS", "register_format", "read_rows", "DataFileError"]

Reader = Callable[[Path], List[dict]]
_READERS: Dict[str, Reader] = {}


class DataFileError(ValueError):
    """A data file that is missing, empty or cannot be parsed; the message names the key and path."""


def register_format(name: str, reader: Reader, *, overwrite: bool = False) -> None:
    """Make ``data.source: name`` read files with `reader(path) -> list of row dicts`."""
    if not callable(reader):
        raise TypeError(f"reader for format {name!r} must be callable, got {type(reader).__name__}")
    if name in _READERS and not overwrite:
        raise ValueError(f"data format {name!r} is already registered; pass overwrite=True to replace it")
    _READERS[name] = reader


def _datasets():
    # Offline before the first import: datasets reads these variables when it is imported.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    # Its "Failed to load JSON ..." lines would repeat the one error read_rows raises.
    datasets.logging.set_verbosity_error()
    return datasets


def _builder_reader(builder: str, **options) -> Reader:
    """A reader through one of datasets' packaged builders (json, csv, parquet) on one local file."""

    def read(path: Path) -> List[dict]:
        ds = _datasets().load_dataset(builder, data_files=str(path), split="train", **options)
        return ds.to_list()

    return read


def _read_disk(path: Path) -> List[dict]:
    ds = _datasets().load_from_disk(str(path))
    if isinstance(ds, _datasets().DatasetDict):
        if "train" not in ds:
            raise DataFileError(f"it holds a DatasetDict with splits {sorted(ds)} and no 'train' split; "
                                f"save the one split to train on (Dataset.save_to_disk)")
        ds = ds["train"]
    return ds.to_list()


def _read_jsonl(path: Path) -> List[dict]:
    # datasets' json builder would read a line holding a list as rows of a "text" column: a JSON
    # lines file of records has an object on every line, checked first (a scan, no parsing).
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            start = line.lstrip()[:1]
            if start and start != b"{":
                raise DataFileError(f"line {number} is not a JSON object (it starts with {start.decode(errors='replace')!r}); "
                                    f"each line of a JSON lines file must be one record {{\"key\": value, ...}}")
    return _builder_reader("json")(path)


register_format("jsonl", _read_jsonl)
register_format("json", _builder_reader("json"))
register_format("csv", _builder_reader("csv"))
register_format("parquet", _builder_reader("parquet"))
register_format("hf_disk", _read_disk)

FILE_FORMATS = tuple(_READERS)


def _root_cause(exc: BaseException) -> BaseException:
    # datasets wraps a parser's error in DatasetGenerationError; the parser's own words are the useful part.
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _first_bad_json_line(path: Path) -> str | None:
    """'line N: ...' for the first line of a JSON-lines file that is not a JSON object, if any."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno}): {line.strip()[:80]!r}"
                if not isinstance(value, dict):
                    return f"line {number} is a JSON {type(value).__name__}, not an object with named fields"
    except UnicodeDecodeError as exc:
        return f"it is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
    return None


def read_rows(source: str, path, key: str) -> List[dict]:
    """The rows of the file (or ``hf_disk`` folder) at `path`, read as `source`.

    `key` is the config key that named the path (``data.train_path``, ...), used in every error.
    Raises DataFileError for a missing path, an empty file, a file that does not parse, or one
    whose records are not mappings.
    """
    if source not in _READERS:
        raise ValueError(f"data.source: unknown file format {source!r}; known: {', '.join(_READERS)}")
    path = Path(path)
    if source == "hf_disk":
        if not path.is_dir():
            raise DataFileError(f"{key}: {str(path)!r} is not a folder; data.source hf_disk reads a folder "
                                f"written by Dataset.save_to_disk")
    else:
        if not path.exists():
            raise DataFileError(f"{key}: no such file {str(path)!r}")
        if not path.is_file():
            raise DataFileError(f"{key}: {str(path)!r} is not a file (data.source {source} reads one file)")
        if path.stat().st_size == 0:
            raise DataFileError(f"{key}: {str(path)!r} is empty; it needs at least one record")
    try:
        rows = _READERS[source](path)
    except DataFileError as exc:
        raise DataFileError(f"{key}: {str(path)!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parser error becomes one line naming the file
        cause = _root_cause(exc)
        what = f"{type(cause).__name__}: {cause}".strip()
        if isinstance(cause, UnicodeDecodeError):
            what = f"it is not valid UTF-8 text ({cause.reason} at byte {cause.start})"
        elif source == "jsonl":
            what = _first_bad_json_line(path) or what
        raise DataFileError(f"{key}: cannot read {str(path)!r} as {source}: {what[:400]}") from None
    if not rows:
        raise DataFileError(f"{key}: {str(path)!r} holds no records")
    if not all(isinstance(r, dict) for r in rows):
        raise DataFileError(f"{key}: {str(path)!r}: every record must be an object with named fields")
    return rows
