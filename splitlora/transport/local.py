"""In-process transport: one FIFO per (sender, receiver) pair."""
from __future__ import annotations

import queue
from typing import Dict, Tuple

import torch

from .base import Transport, TransportError


class LocalTransport(Transport):
    """Parties live in one process. Packets are handed over by reference (no copy), so the
    bytes counted are the bytes a real link would carry, while the run stays as fast as a
    single-process simulation can be."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        super().__init__(timeout_s)
        self._queues: Dict[Tuple[str, str], "queue.Queue"] = {}

    def _queue(self, src: str, dst: str) -> "queue.Queue":
        return self._queues.setdefault((src, dst), queue.Queue())

    def _send(self, src, dst, kind, step, packet):
        self._queue(src, dst).put((kind, step, packet))

    def _recv(self, dst, src, kind, step) -> torch.Tensor:
        # Every party runs in this thread, so a packet that is not queued yet never will be:
        # fail at once instead of waiting out the timeout.
        try:
            got_kind, got_step, packet = self._queue(src, dst).get_nowait()
        except queue.Empty:
            raise TransportError(f"{dst} expected {kind} of step {step} from {src}, but {src} sent nothing") from None
        if (got_kind, got_step) != (kind, step):
            raise TransportError(
                f"{dst} expected {kind} of step {step} from {src} but received {got_kind} of step {got_step}"
            )
        return packet

    def pending(self) -> int:
        """Packets sent but not received yet (0 after a clean step)."""
        return sum(q.qsize() for q in self._queues.values())
