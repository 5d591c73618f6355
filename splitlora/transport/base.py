"""The transport interface and the byte ledger every transport fills."""
from __future__ import annotations

import abc
from collections import defaultdict
from typing import Dict, Tuple

import torch

SERVER = "server"

# Kinds of payload; the ledger groups bytes by them.
KINDS = ("activations", "gradients", "labels", "adapters")


def client_name(index: int) -> str:
    return f"client{index}"


def is_client_process(role) -> bool:
    """Whether a process playing `role` (transport=dist: "server" or "client<N>"; None: every party
    in one process) is a client's alone."""
    return role is not None and role != SERVER


class TransportError(RuntimeError):
    """A packet was missing, late, or not the one expected (wrong kind or step)."""


class CommLedger:
    """Bytes moved, by (client, direction, kind) and by round.

    Direction is from the server's point of view: "up" is client to server, "down" is server to
    client (client-to-client handoffs, as in vanilla split learning, count as up then down
    through the server).
    """

    def __init__(self) -> None:
        self.totals: Dict[Tuple[str, str, str], int] = defaultdict(int)
        self.by_round: Dict[int, Dict[Tuple[str, str, str], int]] = defaultdict(lambda: defaultdict(int))
        self.messages = 0

    def record(self, src: str, dst: str, kind: str, round_index: int, nbytes: int) -> None:
        if src == SERVER:
            key = (dst, "down", kind)
        else:
            key = (src, "up", kind)
        self.totals[key] += nbytes
        self.by_round[round_index][key] += nbytes
        self.messages += 1

    def total(self, *, client: str | None = None, direction: str | None = None, kind: str | None = None) -> int:
        return sum(
            n for (c, d, k), n in self.totals.items()
            if (client is None or c == client) and (direction is None or d == direction) and (kind is None or k == kind)
        )

    def round_total(self, round_index: int, *, client: str | None = None, direction: str | None = None,
                    kind: str | None = None) -> int:
        return sum(
            n for (c, d, k), n in self.by_round.get(round_index, {}).items()
            if (client is None or c == client) and (direction is None or d == direction) and (kind is None or k == kind)
        )

    def summary(self) -> dict:
        """{client: {"up": {kind: bytes}, "down": {kind: bytes}}} plus "total"."""
        out: dict = {}
        for (c, d, k), n in sorted(self.totals.items()):
            out.setdefault(c, {"up": {}, "down": {}})[d][k] = n
        out["total"] = self.total()
        return out

    @classmethod
    def merged(cls, ledgers) -> "CommLedger":
        """One ledger adding up several (a process's sent and received ledgers, for instance)."""
        out = cls()
        for ledger in ledgers:
            for key, n in ledger.totals.items():
                out.totals[key] += n
            for r, rows in ledger.by_round.items():
                for key, n in rows.items():
                    out.by_round[r][key] += n
            out.messages += ledger.messages
        return out

    def state_dict(self) -> dict:
        return {
            "totals": [[c, d, k, n] for (c, d, k), n in self.totals.items()],
            "by_round": {str(r): [[c, d, k, n] for (c, d, k), n in v.items()] for r, v in self.by_round.items()},
            "messages": self.messages,
        }

    def load_state_dict(self, state: dict) -> None:
        self.totals = defaultdict(int, {(c, d, k): n for c, d, k, n in state["totals"]})
        self.by_round = defaultdict(lambda: defaultdict(int))
        for r, rows in state["by_round"].items():
            self.by_round[int(r)] = defaultdict(int, {(c, d, k): n for c, d, k, n in rows})
        self.messages = state["messages"]


class Transport(abc.ABC):
    """Point-to-point packet delivery between named parties, with accounting.

    `send` never blocks on the receiver; `recv` waits at most `timeout_s` and raises
    TransportError naming the sender, kind and step when the packet does not come or is not the
    one expected.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.ledger = CommLedger()
        self.round_index = 0

    def set_round(self, round_index: int) -> None:
        """The round the following packets are counted under."""
        self.round_index = int(round_index)

    def send(self, src: str, dst: str, kind: str, step: int, packet: torch.Tensor) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown packet kind {kind!r}; kinds are {KINDS}")
        if not isinstance(packet, torch.Tensor) or packet.dtype != torch.uint8 or packet.dim() != 1:
            raise TypeError(f"a packet is a 1-D uint8 tensor; {src} tried to send {type(packet).__name__} "
                            f"{getattr(packet, 'dtype', '')} {tuple(getattr(packet, 'shape', ()))}")
        self._send(src, dst, kind, step, packet)
        self.ledger.record(src, dst, kind, self.round_index, packet.numel())

    def recv(self, dst: str, src: str, kind: str, step: int) -> torch.Tensor:
        return self._recv(dst, src, kind, step)

    @abc.abstractmethod
    def _send(self, src: str, dst: str, kind: str, step: int, packet: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _recv(self, dst: str, src: str, kind: str, step: int) -> torch.Tensor: ...
