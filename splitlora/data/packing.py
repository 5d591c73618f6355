"""Sequence packing (``data.packing``): several whole examples per row, attention kept within each.

Short examples padded to the longest one waste most of every row on padding; packing puts several
of one client's examples side by side in a row of at most ``max_length`` tokens instead:

    row:          [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    position_ids: [ 0  1  2  3  | 0  1  2  | 0  1  | 0   1   ]
    labels:       [ -  .. .. .. | -  .. .. | -  .. | -   -   ]   (- = IGNORE_INDEX)

Every example keeps its own position ids (restarting at 0), so the models see it at the positions
it has unpacked (GPT-2's position embeddings, Llama's rotary angles). The attention mask is not a
padding mask: with ``attention_mask=None`` and packed ``position_ids``, transformers' masking
(``masking_utils.find_packed_sequence_indices``, used by ``create_causal_mask`` for the whole
model and for every split segment) starts a new block wherever a position id is not the previous
one plus one, and builds a block-diagonal causal mask: no token attends to another example. The
trailing padding is one more block (its ids restart at 0 too) whose labels are all ignored.

The loss shifts labels (logits at t predict labels at t+1), so the last token of one example
would predict the first token of the next: each example's first label is set to IGNORE_INDEX.
Unpacked, that label is never predicted either (nothing precedes it), so a packed batch holds
exactly the label tokens of the same examples unpacked, each predicted from the same context:
the token-mean losses are equal up to float rounding.

A row never splits an example and never mixes two clients' examples
(:func:`pack_client_datasets` packs each client's shard on its own).
"""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence

import torch

from .dataset import IGNORE_INDEX, TokenizedDataset

__all__ = ["example_lengths", "pack_indices", "pack_rows", "pack_client_datasets"]


def example_lengths(dataset: TokenizedDataset) -> torch.Tensor:
    """Tokens per example of an unpacked, right-padded dataset ([N] long)."""
    if dataset.position_ids is not None:
        raise ValueError("the dataset is already packed; pack the unpacked (tokenized) dataset")
    lengths = dataset.attention_mask.sum(dim=1)
    # Right padding: the ones of every row are a prefix.
    columns = torch.arange(dataset.seq_len).unsqueeze(0)
    if not torch.equal(dataset.attention_mask.bool(), columns < lengths.unsqueeze(1)):
        raise ValueError("packing needs right-padded rows (attention_mask ones, then zeros)")
    return lengths


def pack_indices(lengths: Sequence[int], max_length: int) -> List[List[int]]:
    """Groups of positions into `lengths` whose lengths sum to at most `max_length` each, every
    position in exactly one group (best-fit decreasing: longest first, each into the fullest row
    that still has room, or a new row).

    Deterministic (ties go to the lower position and the older row). Within a row, positions are
    in the order they were placed (longest first). An example longer than `max_length` cannot be
    packed without being split: ValueError.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} has {n} tokens; every example needs at least one")
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}: an example is "
                             "never split across rows; raise max_length (or tokenize with the same max_length)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    # (room left, row index), sorted: the first entry with room >= n is the best fit.
    free: List[tuple] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def pack_rows(dataset: TokenizedDataset, groups: Sequence[Sequence[int]],
              width: Optional[int] = None) -> TokenizedDataset:
    """A packed dataset with one row per group: the group's examples of `dataset` (indices, in
    order) back to back, then padding to `width` (default: the longest row).

    position_ids restart at 0 at each example and at the padding; each example's first label is
    IGNORE_INDEX (see the module docstring); num_target_tokens counts a row's label positions;
    truncated is whether any of its examples was truncated."""
    lengths = example_lengths(dataset)
    groups = [[int(i) for i in g] for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("pack_rows needs at least one row and no empty row")
    dataset._index([i for g in groups for i in g])  # range check
    row_lengths = [int(sum(int(lengths[i]) for i in g)) for g in groups]
    longest = max(row_lengths)
    width = longest if width is None else int(width)
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest packed row ({longest} tokens)")
    n = len(groups)
    # The padding's token does not matter (its own attention block, no labels): the dataset's own.
    padding = dataset.attention_mask == 0
    pad_id = int(dataset.input_ids[padding][0]) if bool(padding.any()) else 0
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    for r, g in enumerate(groups):
        at = 0
        for i in g:
            m = int(lengths[i])
            input_ids[r, at:at + m] = dataset.input_ids[i, :m]
            attention_mask[r, at:at + m] = 1
            labels[r, at:at + m] = dataset.labels[i, :m]
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous example's last token
            position_ids[r, at:at + m] = torch.arange(m)
            at += m
        position_ids[r, at:] = torch.arange(width - at)
        truncated[r] = bool(dataset.truncated[g].any())
    num_target = (labels != IGNORE_INDEX).sum(dim=1)
    return TokenizedDataset(input_ids, attention_mask, labels, num_target, truncated, position_ids)


def pack_client_datasets(dataset: TokenizedDataset, shards: Sequence[Sequence[int]],
                         max_length: int) -> List[TokenizedDataset]:
    """One packed dataset per client: client c's examples (``shards[c]``, indices into `dataset`)
    in rows of at most `max_length` tokens (:func:`pack_indices`). Every client's rows are padded
    to one common width, the longest row of all, so with ``data.pad_to=dataset`` every batch has
    the same shape; that width is each result's ``seq_len``. Load client c's batches with
    ``ClientLoader(packed[c], range(len(packed[c])), ...)``."""
    lengths = example_lengths(dataset)
    groups = []
    for c, shard in enumerate(shards):
        shard = [int(i) for i in shard]
        if not shard:
            raise ValueError(f"client {c} has no examples")
        dataset._index(shard)  # range check
        for i in shard:
            if int(lengths[i]) > max_length:
                raise ValueError(f"client {c}: example {i} has {int(lengths[i])} tokens, more than max_length="
                                 f"{max_length}: an example is never split across rows; raise max_length")
        rows = pack_indices([int(lengths[i]) for i in shard], max_length)
        groups.append([[shard[j] for j in row] for row in rows])
    width = max(int(sum(int(lengths[i]) for i in row)) for g in groups for row in g)
    return [pack_rows(dataset, g, width) for g in groups]
