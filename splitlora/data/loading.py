"""From a run's ``data`` section to training and evaluation records and, for natural partitions,
which client holds which record.

    records = load_records(cfg.data, clients=cfg.train.clients, seed=cfg.seed)
    for line in records.notes: print(line)

Evaluation data only ever comes from where the user pointed: ``data.eval_path``, else a held-out
``data.eval_fraction`` of the training records (whole prompts at a time, so a prompt's references
are never split between training and evaluation), else, for the synthetic task, its own
generated held-out stream.
"""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, List, Optional, Sequence

from .e2e import read_e2e
from .formats import read_rows
from .sources import load_dataset
from .records import Chat, PromptCompletion, Record, RecordKeys, SkipCounter, detect_format, \
    examples_to_records, rows_to_records

__all__ = ["RecordSets", "load_records", "prompt_key"]


@dataclass
class RecordSets:
    train: List[Record]
    eval: List[Record]
    form: str
    # Natural partitions: shards[c] lists the indices into `train` of client c's records; None for
    # a simulated split (data.partition).
    shards: Optional[List[List[int]]] = None
    client_names: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)  # what was detected or decided, to print
    train_skips: Optional[SkipCounter] = None
    eval_skips: Optional[SkipCounter] = None


def prompt_key(record: Record) -> Hashable:
    """What two records must share to count as the same prompt (with different references)."""
    if isinstance(record, PromptCompletion):
        return ("pc", record.key if record.key is not None else record.prompt)
    if isinstance(record, Chat):
        return ("chat", record.messages[:-1])
    return ("text", record.text)


def _by_prompt(records: Sequence[Record]) -> dict:
    groups: dict = defaultdict(list)
    for i, record in enumerate(records):
        groups[prompt_key(record)].append(i)
    return groups


def _hold_out(records: Sequence[Record], fraction: float, seed: int) -> tuple[List[int], List[int]]:
    """(train indices, eval indices): whole prompts, in a seeded order, until `fraction` of the
    records are held out (at least one prompt, and at least one left for training)."""
    groups = list(_by_prompt(records).values())
    if len(groups) < 2:
        raise ValueError(f"data.eval_fraction: the training data has {len(groups)} distinct prompt(s); holding "
                         f"some out needs at least 2 (or set data.eval_path)")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    held: List[int] = []
    target = fraction * len(records)
    for position, g in enumerate(order):
        if held and len(held) + len(groups[g]) > target:
            break
        if position == len(order) - 1:
            break
        held.extend(groups[g])
    held_set = set(held)
    return [i for i in range(len(records)) if i not in held_set], sorted(held)


def _take_prompts(records: List[Record], limit: int, seed: int) -> List[Record]:
    """About `limit` records made of whole prompts (all references of a prompt kept)."""
    groups = list(_by_prompt(records).values())
    random.Random(seed).shuffle(groups)
    taken: List[int] = []
    for members in groups:
        if taken and len(taken) + len(members) > limit:
            break
        taken.extend(members)
    return [records[i] for i in sorted(taken)]


def _file_records(d, path, key: str, form: Optional[str], skips: SkipCounter, notes: List[str],
                  client_key: Optional[str] = None):
    """(records, form) of one file; with `client_key`, each record's group is its value there."""
    keys = RecordKeys(d.prompt_key, d.completion_key, d.messages_key, d.text_key)
    rows = read_rows(d.source, path, key)
    columns = set().union(*(row.keys() for row in rows))
    if form is None:
        form, why = detect_format(columns, keys)
        notes.append(f"data: {path}: format {form} (detected from {why}; set data.format to choose)")
    groups = None
    if client_key is not None:
        if client_key not in columns:
            raise ValueError(f"data.client_key: {path} has no column {client_key!r}; its columns: {sorted(columns)}")
        groups = ["" if row.get(client_key) is None else str(row[client_key]) for row in rows]
    records, kept = rows_to_records(rows, form, keys, skips, groups)
    if client_key is not None:
        missing = [i for i in kept if groups[i] == ""]
        if missing:
            raise ValueError(f"data.client_key: {len(missing)} record(s) of {path} have no {client_key!r} value "
                             f"(the first is record {missing[0] + 1}); every record must name its client")
    return records, form


def load_records(d, *, clients: int, seed: int) -> RecordSets:
    """The records of a DataConfig `d` (see the module docstring for where evaluation data comes from)."""
    notes: List[str] = []
    if d.source == "synthetic":
        # The generated task has its own held-out stream (sources.load_dataset).
        train, evals = load_dataset("synthetic", seed=seed, num_eval=d.num_eval,
                                    num_train=d.num_train if d.num_train is not None else d.synthetic_examples)
        return RecordSets(examples_to_records(train), examples_to_records(evals), "prompt_completion", notes=notes)

    train_skips, eval_skips = SkipCounter("training"), SkipCounter("evaluation")
    shards = client_names = None
    if d.source == "e2e":
        train = examples_to_records(read_e2e(_existing(d.train_path, "data.train_path")))
        form = "prompt_completion"
    elif d.client_paths is not None:
        train, form = [], d.format
        for c, path in enumerate(d.client_paths):
            records, form = _file_records(d, path, f"data.client_paths[{c}]", form, train_skips, notes)
            # A record's group is its client: the file's position in data.client_paths.
            train.extend(dataclasses.replace(r, group=str(c)) for r in records)
        client_names = [str(p) for p in d.client_paths]
    else:
        train, form = _file_records(d, d.train_path, "data.train_path", d.format, train_skips, notes,
                                            client_key=d.client_key)
    if not train:
        raise ValueError(f"data: no usable training record ({train_skips.summary()})")

    if d.num_train is not None and d.num_train < len(train):
        picked = sorted(random.Random(seed).sample(range(len(train)), d.num_train))
        train = [train[i] for i in picked]

    if d.eval_path is not None:
        if d.source == "e2e":
            evals = examples_to_records(read_e2e(_existing(d.eval_path, "data.eval_path")))
        else:
            evals, _ = _file_records(d, d.eval_path, "data.eval_path", form, eval_skips, notes)
        if not evals:
            raise ValueError(f"data.eval_path: no usable evaluation record in {d.eval_path} ({eval_skips.summary()})")
    else:
        kept, held = _hold_out(train, d.eval_fraction, seed)
        evals = [train[i] for i in held]
        train = [train[i] for i in kept]
        notes.append(f"data: evaluation on {len(evals)} records held out of the training data "
                     f"(data.eval_fraction={d.eval_fraction}; set data.eval_path to evaluate on a file)")
    if d.num_eval is not None and d.num_eval < len(evals):
        evals = _take_prompts(evals, d.num_eval, seed)

    if d.client_key is not None or d.client_paths is not None:
        shards, client_names = _natural_shards(train, clients, d, client_names)
    return RecordSets(train, evals, form, shards, client_names, notes, train_skips, eval_skips)


def _existing(path, key: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{key}: no such file {str(path)!r}")
    return path


def _natural_shards(train: List[Record], clients: int, d, names: Optional[List[str]]):
    """One shard per distinct group (client_key value, or file), in sorted order of the values
    (file order for client_paths)."""
    by_group: dict = defaultdict(list)
    for i, record in enumerate(train):
        by_group[record.group].append(i)
    if d.client_paths is not None:
        order = [str(c) for c in range(len(d.client_paths))]
        empty = [names[int(g)] for g in order if g not in by_group]
        if empty:
            raise ValueError(f"data.client_paths: no training record left for {', '.join(empty)} (after "
                             f"skipping unusable records and holding out evaluation data)")
        return [by_group[g] for g in order], names
    values = sorted(by_group)
    if len(values) != clients:
        shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(f"data.client_key: the column {d.client_key!r} has {len(values)} distinct values "
                         f"({shown}) in the training data, so {len(values)} clients, but train.clients is "
                         f"{clients}; set train.clients={len(values)}")
    return [by_group[v] for v in values], values
