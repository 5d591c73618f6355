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

from contextlib import contextmanager
from typing import Iterable, Optional

import torch

from .quantize import quantization_state_bytes


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


class ActivationPeaks:
    """Per party ("client0", "server", ...), the most bytes one of its forwards saved for the
    backward. Saved activations grow with the tokens of a batch, so only a forward over more
    tokens than any of that party's before is measured (`measure`): after the first steps almost
    none is, and a run with fixed shapes measures once. `state_dict` lets a resumed run keep the
    peaks of the steps before the stop."""

    def __init__(self) -> None:
        self.peaks: dict = {}  # party -> (tokens of the measured forward, bytes)

    @contextmanager
    def measure(self, party: str, tokens: int, exclude: Optional[Iterable[torch.Tensor]] = None):
        known = self.peaks.get(party)
        if known is not None and tokens <= known[0]:
            yield
            return
        meter = SavedActivationMeter(exclude=exclude)
        with meter:
            yield
        self.peaks[party] = (tokens, max(meter.bytes, known[1] if known else 0))

    def bytes(self, party: str) -> Optional[int]:
        known = self.peaks.get(party)
        return None if known is None else known[1]

    def state_dict(self) -> dict:
        return {party: [tokens, nbytes] for party, (tokens, nbytes) in self.peaks.items()}

    def load_state_dict(self, state: dict) -> None:
        self.peaks = {str(party): (int(tokens), int(nbytes)) for party, (tokens, nbytes) in state.items()}


def side_memory(modules: Iterable[torch.nn.Module], optimizer: Optional[torch.optim.Optimizer],
                activation_bytes: Optional[int]) -> dict:
    """What one party holds during a training step, in bytes: its weights (every parameter of its
    modules, frozen and trainable, each storage once), the gradients of its trainable parameters,
    its optimizer's state (the tensors the optimizer keeps, e.g. AdamW's two moments) and the
    activations its forward saved for the backward (measured, `ActivationPeaks`; None when this
    process did not run that party's forward). `total_bytes` adds them up (None without the
    activations)."""
    modules = list(modules)
    storages, grads = {}, 0
    for module in modules:
        for p in module.parameters():
            key, nbytes = _storage_key(p)
            storages[key] = nbytes
            if p.requires_grad:
                grads += p.numel() * p.element_size()
    state = 0
    if optimizer is not None:
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    # A 4-bit weight's block scales live outside its parameter (splitlora.quantize).
    weights = sum(storages.values()) + quantization_state_bytes(modules)
    total = None if activation_bytes is None else weights + grads + state + activation_bytes
    return {"weights_bytes": weights, "gradient_bytes": grads, "optimizer_bytes": state,
            "activation_bytes": activation_bytes, "total_bytes": total}


def most_demanding(sides: Iterable[dict]) -> dict:
    """The side_memory with the largest total (by weights where activations were not measured)."""
    return max(sides, key=lambda m: (m["total_bytes"] or 0, m["weights_bytes"]))
