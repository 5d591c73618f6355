"""Measuring what a forward pass keeps for its backward: the activation memory of a training step.

    meter = SavedActivationMeter(exclude=model.parameters())
    with meter:
        loss = model(x).sum()
    meter.bytes        # bytes of the distinct tensors autograd saved for the backward

Autograd hands every tensor it saves for the backward to `torch.autograd.graph.saved_tensors_hooks`;
the meter adds up the distinct storages among them (a tensor and its views count once), leaving
out the storages of `exclude` (the model's own weights, which a step holds anyway). That is what a
client's step needs on top of its parameters and optimizer state until the gradients come back,
the term the budget planner (`splitlora.hetero.SegmentCost.activation_bytes`) estimates. It works
on every device and costs a dictionary update per saved tensor.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


class SavedActivationMeter:
    """Context manager: the bytes of the distinct storages saved for backward inside it."""

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None) -> None:
        self._excluded = {_storage_key(t)[0] for t in (exclude or ())}
        self._seen: dict = {}
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in self._excluded:
            self._seen[key] = nbytes
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedActivationMeter":
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
