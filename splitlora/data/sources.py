"""Datasets by name: the embedded synthetic task and E2E files."""
from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

from .e2e import Example, read_e2e, synthetic_examples

DATASET_SOURCES = ("synthetic", "e2e")

def _data_dir_file(relative: str) -> Path:
    root = os.environ.get("SPLITLORA_DATA")
    if not root:
        raise ValueError(f"no path given for the E2E data and SPLITLORA_DATA is not set: pass the "
                         f"file or set SPLITLORA_DATA to the folder holding {relative}")
    return Path(root) / relative


def _take_groups(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """About `limit` examples made of whole source groups (all references of a source kept, so
    multi-reference BLEU stays meaningful), sources picked in a seeded random order."""
    by_source: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_source[e.source].append(e)
    sources = list(by_source)
    random.Random(seed).shuffle(sources)
    taken: list[Example] = []
    for source in sources:
        group = by_source[source]
        if taken and len(taken) + len(group) > limit:
            break
        taken.extend(group)
    return taken


def load_dataset(source: str, *, train_path=None, eval_path=None, num_train: int | None = None,
                 num_eval: int | None = None, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train_examples, eval_examples) for a named source.

    ``"synthetic"``: generated; eval is the first `num_eval` (default 200) of one stream of
    distinct sources and train the next `num_train` (default 2000), so they never share a source.
    ``"e2e"``: read from `train_path` and `eval_path` (default ``$SPLITLORA_DATA/e2e/valid.txt``
    and ``test.txt``). `num_train` takes a seeded random sample of training lines; `num_eval`
    takes whole sources (all their references) up to that many examples.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if source == "synthetic":
        n_train = 2000 if num_train is None else num_train
        n_eval = 200 if num_eval is None else num_eval
        stream = synthetic_examples(n_eval + n_train, seed)
        return stream[n_eval:], stream[:n_eval]
    if source == "e2e":
        train = read_e2e(train_path if train_path is not None else _data_dir_file("e2e/valid.txt"))
        evals = read_e2e(eval_path if eval_path is not None else _data_dir_file("e2e/test.txt"))
        if num_train is not None and num_train < len(train):
            picked = sorted(random.Random(seed).sample(range(len(train)), num_train))
            train = [train[i] for i in picked]
        if num_eval is not None and num_eval < len(evals):
            evals = _take_groups(evals, num_eval, seed)
        return train, evals
    raise ValueError(f"unknown dataset source {source!r}; allowed: {', '.join(DATASET_SOURCES)}")
