"""What data each party of a federation reads: a client its own file, the server none of theirs.

`trainer.build(cfg, federation=...)` asks one of these for its records and loaders instead of
reading `cfg.data`'s training files and partitioning them:

- `ClientData`: the client's own file (`splitlora client --data FILE`, any format the data readers
  accept), every record of it in order, as client `index`'s loader. That is client `index`'s shard
  of the in-process run with `data.client_paths` listing the clients' files in index order, so both
  draw the same batches.
- `ServerData`: no training record at all; evaluation records from `data.eval_path` (or the
  synthetic task's held-out stream); the FedAvg weights are the clients' sample counts, which they
  report when they join.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, List, Optional

FILE_SOURCES = ("jsonl", "json", "csv", "parquet", "hf_disk")
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_federation_data(d) -> None:
    """The data keys a federation cannot honour, refused with what to do instead."""
    if d.num_train is not None:
        raise ValueError("data.num_train: in a federation each client trains on its whole --data file; set "
                         "data.num_train to null (shorten the clients' files instead)")
    if d.packing:
        raise ValueError("data.packing is not supported by `splitlora server`/`client` yet; set data.packing=false")


def _source_for(d, path: str) -> str:
    if d.source in FILE_SOURCES:
        return d.source
    p = Path(path)
    if p.is_dir():
        return "hf_disk"
    if p.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[p.suffix.lower()]
    raise ValueError(f"--data {path}: cannot tell its format; set data.source to one of {', '.join(FILE_SOURCES)}")


class _Absent:
    """Another client's loader, in a client process (or any client's, on the server): it exists
    only elsewhere. Checkpoints hold nothing for it."""

    def __init__(self, index: int, samples: int = 1, batch_size: int = 1) -> None:
        self.client_id = index
        self.samples = samples
        # As a ClientLoader's: capped at the client's examples (the privacy accounting reads it).
        self.batch_size = min(batch_size, samples)

    def __len__(self) -> int:
        return self.samples

    def next_batch(self):
        raise RuntimeError(f"client {self.client_id}'s data is not in this process (a federation party holds "
                           f"its own data only)")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def read_client_records(d, path: str):
    """A client's training records (a RecordSets) from its own file. The client program reads them
    once, before it connects (a file that cannot be read costs no wait for the server), and every
    attempt of the run reuses them."""
    from ..data.loading import RecordSets, _file_records
    from ..data.records import SkipCounter

    check_federation_data(d)
    notes: List[str] = []
    skips = SkipCounter("training")
    # The client's file is read as data.source says, or (a config whose source is synthetic or
    # e2e) as its suffix says.
    d = dataclasses.replace(d, source=_source_for(d, path))
    train, form = _file_records(d, path, "--data", d.format, skips, notes)
    if not train:
        raise ValueError(f"--data {path}: no usable training record ({skips.summary()})")
    # A client evaluates nothing (the server holds the held-out data), but build() encodes an
    # evaluation set: one of its own records stands in, and is never evaluated.
    return RecordSets(train, train[:1], form, notes=notes, train_skips=skips)


class ClientData:
    """`on_ready(samples)`: reports this client's sample count once its loader exists, and returns
    the server's "start" message ({"type": "start", "step": where a joining client starts, "samples":
    every client's count, when the server sends them}) or None."""

    def __init__(self, path: str, index: int, clients: int, *,
                 on_ready: Optional[Callable[[int], Optional[dict]]] = None, records=None) -> None:
        self.path, self.index, self.clients = str(path), int(index), int(clients)
        self.on_ready = on_ready
        self._records = records  # read_client_records' result, when the caller read them already
        # A client that joins a running federation: the step it starts at (from the server's
        # "start" message); None for one that starts with the run.
        self.start_step: Optional[int] = None

    def records(self, d, seed: int):
        if self._records is None:
            return read_client_records(d, self.path)
        # A copy for each attempt: build() adds its own skips (records too long) to the counter.
        return dataclasses.replace(self._records, notes=list(self._records.notes),
                                   train_skips=copy.deepcopy(self._records.train_skips))

    def loaders(self, train_data, cfg, trim: bool):
        from ..data import ClientLoader

        own = ClientLoader(train_data, range(len(train_data)), cfg.train.batch_size, seed=cfg.seed,
                           client_id=self.index, trim=trim)
        loaders = [own if c == self.index else _Absent(c) for c in range(self.clients)]
        shards = [range(len(own)) if c == self.index else range(1) for c in range(self.clients)]
        if self.on_ready is not None:
            start = self.on_ready(len(own)) or {}
            self.start_step = start.get("step")
            counts = start.get("samples")
            if (isinstance(counts, list) and len(counts) == self.clients
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts)):
                # The other clients' sample counts, when the server sends them: the DP sample rates
                # (batch / examples) of every client, as in the in-process run. privacy.epsilon sets
                # the noise multiplier from the largest one; with the placeholders' rate of 1 this
                # client would add more noise than the server accounts for.
                loaders = [own if c == self.index else _Absent(c, n, cfg.train.batch_size)
                           for c, n in enumerate(counts)]
        return shards, loaders, train_data.seq_len


class ServerData:
    """`client_samples`: each client's sample count, or a callable returning them (called once the
    server's model is loaded: the clients load theirs meanwhile)."""

    def __init__(self, client_samples) -> None:
        self.client_samples = client_samples

    def records(self, d, seed: int):
        from ..data.e2e import read_e2e
        from ..data.loading import RecordSets, _existing, _file_records, _take_prompts, examples_to_records
        from ..data.records import SkipCounter
        from ..data.sources import load_dataset

        check_federation_data(d)
        notes: List[str] = []
        skips = SkipCounter("evaluation")
        if d.source == "synthetic":
            # The synthetic task's held-out stream: generated here, shares no source with training.
            _, evals = load_dataset("synthetic", seed=seed, num_eval=d.num_eval, num_train=1)
            evals = examples_to_records(evals)
            return RecordSets(evals[:1], evals, "prompt_completion", notes=notes, eval_skips=skips)
        if d.eval_path is None:
            raise ValueError("data.eval_path: the federation server never reads the clients' training data, so it "
                             "evaluates on a file of its own; set data.eval_path")
        if d.source == "e2e":
            evals, form = examples_to_records(read_e2e(_existing(d.eval_path, "data.eval_path"))), "prompt_completion"
        else:
            evals, form = _file_records(d, d.eval_path, "data.eval_path", d.format, skips, notes)
        if not evals:
            raise ValueError(f"data.eval_path: no usable evaluation record in {d.eval_path} ({skips.summary()})")
        if d.num_eval is not None and d.num_eval < len(evals):
            evals = _take_prompts(evals, d.num_eval, seed)
        # build() encodes a training set: one evaluation record stands in (the server's loaders are
        # placeholders, so nothing trains on it).
        return RecordSets(evals[:1], evals, form, notes=notes, eval_skips=skips)

    def loaders(self, train_data, cfg, trim: bool):
        samples = self.client_samples() if callable(self.client_samples) else self.client_samples
        samples = [int(n) for n in samples]
        if len(samples) != cfg.train.clients:
            raise ValueError(f"train.clients is {cfg.train.clients} but {len(samples)} clients joined")
        # No training row here: the step shapes come from the clients' activations. seq_len (the
        # time model's default length) is data.max_length, the longest a client's batch can be.
        loaders = [_Absent(c, s, cfg.train.batch_size) for c, s in enumerate(samples)]
        return [range(s) for s in samples], loaders, cfg.data.max_length
