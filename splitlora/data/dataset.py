"""Token tensors for training and evaluation, and the per-client endless batch loader.

Client data is a list of indices into one :class:`TokenizedDataset`; :class:`ClientLoader` draws
endless shuffled mini-batches from one list with its own generator, whose state can be saved and
restored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .e2e import DEFAULT_SEPARATOR, TARGET_PREFIX, Example

logger = logging.getLogger(__name__)

#: Label value that cross-entropy ignores (prompt and padding positions).
IGNORE_INDEX = -100

@dataclass
class TokenizedDataset:
    """Right-padded token tensors, one row per example.

    ``labels`` equals ``input_ids`` on the completion (target tokens and the final eos) and is
    IGNORE_INDEX on the prompt and the padding; like Hugging Face causal LMs, the loss shifts it
    (logits at position t predict labels at t+1).

    A packed dataset (:mod:`.packing`) holds several whole examples per row: ``position_ids``
    restart at 0 at each example (and at the row's trailing padding), ``attention_mask`` is 1 on
    the examples' tokens and 0 on that padding, and ``num_target_tokens``/``truncated`` describe the
    row's examples together. Its batches carry ``position_ids``, from which the models build a
    block-diagonal causal mask (see :func:`splitlora.strategies.base.mask_kwargs`). Unpacked,
    ``position_ids`` is None and batches hold no such key.
    """

    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N, T] long
    num_target_tokens: torch.Tensor  # [N] long: label positions per example
    truncated: torch.Tensor  # [N] bool: the completion was cut at max_length
    position_ids: Optional[torch.Tensor] = None  # [N, T] long when packed, else None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def _index(self, indices) -> torch.Tensor:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} examples")
        return index

    def subset(self, indices) -> "TokenizedDataset":
        index = self._index(indices)
        return TokenizedDataset(self.input_ids[index], self.attention_mask[index],
                                self.labels[index], self.num_target_tokens[index],
                                self.truncated[index],
                                None if self.position_ids is None else self.position_ids[index])

    def batch(self, indices, trim: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels (and, packed, position_ids) for `indices`.

        With ``trim`` the trailing columns that are padding in every row are dropped; with right
        padding and causal attention that changes no logit at a real position.
        """
        index = self._index(indices)
        batch = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                 "labels": self.labels[index]}
        if self.position_ids is not None:
            batch["position_ids"] = self.position_ids[index]
        if trim and index.numel():
            length = int(batch["attention_mask"].sum(dim=1).max())
            batch = {k: v[:, :max(length, 1)] for k, v in batch.items()}
        return batch


def tokenize(examples: Sequence[Example], tokenizer, max_length: int,
             separator: str = DEFAULT_SEPARATOR) -> TokenizedDataset:
    """Encode ``source + separator`` (prompt) then ``TARGET_PREFIX + target`` and eos (completion).

    Rows are right-padded to the longest sequence in the set. A sequence longer than `max_length`
    keeps its whole prompt and as much of the completion as fits (its eos is then cut too, and it
    counts in ``num_truncated``). If a prompt leaves no room for even one completion token the
    target would be silently lost, so that raises ValueError naming max_length and the length
    the example needs.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("tokenize needs at least one example")
    rows, prompt_lens, truncated = [], [], []
    for i, example in enumerate(examples):
        prompt = tokenizer.encode(example.source + separator)
        completion = tokenizer.encode(TARGET_PREFIX + example.target) + [tokenizer.eos_id]
        if len(prompt) + 1 > max_length:
            raise ValueError(
                f"example {i}: its prompt alone is {len(prompt)} tokens, so with max_length="
                f"{max_length} no target token fits (the full example needs "
                f"{len(prompt) + len(completion)}); raise max_length. Source: {example.source[:80]!r}"
            )
        ids = prompt + completion
        truncated.append(len(ids) > max_length)
        rows.append(ids[:max_length])
        prompt_lens.append(len(prompt))
    if any(truncated):
        logger.warning("%d of %d examples were longer than max_length=%d: their targets were cut",
                       sum(truncated), len(examples), max_length)
    masks = [[False] * p + [True] * (len(ids) - p) for ids, p in zip(rows, prompt_lens)]
    return rows_to_dataset(list(zip(rows, masks)), truncated, tokenizer.pad_id)


def rows_to_dataset(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], truncated: Sequence[bool],
                    pad_id: int) -> TokenizedDataset:
    """Right-padded tensors of `rows` ((token ids, label mask) each: labels are the ids where the
    mask is True, IGNORE_INDEX elsewhere and on the padding)."""
    n, length = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((n, length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    num_target = torch.empty(n, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        row = torch.tensor(list(ids), dtype=torch.long)
        keep = torch.tensor(list(mask), dtype=torch.bool)
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
        labels[i, :len(row)] = torch.where(keep, row, torch.full_like(row, IGNORE_INDEX))
        num_target[i] = int(keep.sum())
    return TokenizedDataset(input_ids, attention_mask, labels, num_target,
                            torch.tensor(list(truncated), dtype=torch.bool))




class ClientLoader:
    """Endless shuffled mini-batches over one client's examples.

    Each pass over the client's indices is a fresh permutation from the loader's own
    ``torch.Generator`` (seeded from `seed` and `client_id`), and a batch that runs past the end
    of a pass continues into the next one, so every batch has ``batch_size`` examples (capped at
    the client's number of examples, so no batch holds an example twice).
    ``state_dict``/``load_state_dict`` make a resumed run draw the same batches as an
    uninterrupted one.
    """

    def __init__(self, dataset: TokenizedDataset, indices: Sequence[int], batch_size: int, *,
                 seed: int = 0, client_id: int = 0, trim: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        if self.indices.numel() == 0:
            raise ValueError(f"client {client_id} has no examples")
        dataset._index(self.indices)  # range check
        self.dataset = dataset
        self.batch_size = min(batch_size, self.indices.numel())
        self.client_id = client_id
        self.trim = trim
        # Distinct, reproducible streams per (seed, client): mix the two into one 63-bit seed.
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + client_id) % (2**63))
        self.epoch = 0
        self._order = torch.randperm(self.indices.numel(), generator=self.generator)
        self._position = 0

    def __len__(self) -> int:
        return self.indices.numel()

    def next_indices(self) -> torch.Tensor:
        """Dataset indices of the next batch."""
        taken = []
        need = self.batch_size
        while need:
            if self._position == self._order.numel():
                self.epoch += 1
                self._order = torch.randperm(self.indices.numel(), generator=self.generator)
                self._position = 0
            chunk = self._order[self._position:self._position + need]
            taken.append(chunk)
            self._position += chunk.numel()
            need -= chunk.numel()
        return self.indices[torch.cat(taken)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.dataset.batch(self.next_indices(), trim=self.trim)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order.clone(),
                "position": self._position, "epoch": self.epoch,
                "num_examples": self.indices.numel(), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["num_examples"]) != self.indices.numel():
            raise ValueError(f"loader state is for {state['num_examples']} examples, this client has "
                             f"{self.indices.numel()}: was the data partitioned the same way?")
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"loader state has batch_size {state['batch_size']}, this loader "
                             f"{self.batch_size}")
        self.generator.set_state(state["generator"])
        self._order = torch.as_tensor(state["order"], dtype=torch.long).clone()
        self._position = int(state["position"])
        self.epoch = int(state["epoch"])
