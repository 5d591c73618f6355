"""Which clients are in a federation's run: plain bookkeeping, no networking.

The server's strategy asks `training()` which clients take part in a step and reports a client
that failed (disconnected, missed federation.step_timeout_s, or sent a packet that does not
decode) with `drop()`: the client leaves the run, its unfinished step is discarded, the round's
FedAvg runs over the clients that finished (`weights()`: their sample counts, renormalised by
fedavg), and training goes on. Without `wait_s` the run ends as soon as fewer than `min_clients`
remain; with it (a federation's server) clients may come back (`rejoin`) and the server
waits up to wait_s at a round's start for min_clients. `events()` and `joins()` hand what
happened to the metrics.

`sample_clients` picks which of the available clients train in a round
(federation.clients_per_round), the same way in the in-process simulation and in the federation
server.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Union


def sample_size(clients_per_round: Union[int, float, None], available: int) -> int:
    """How many of `available` clients train in a round: all (null), the count (at most the
    available ones), or ceil(fraction x available), at least 1."""
    if clients_per_round is None:
        return available
    if isinstance(clients_per_round, float):
        return max(1, min(available, math.ceil(clients_per_round * available - 1e-9)))
    return min(available, int(clients_per_round))


def sample_clients(available: Sequence[int], clients_per_round: Union[int, float, None], seed: int,
                   round_index: int) -> List[int]:
    """The clients (indices, sorted) that train in round `round_index`: a uniform sample of
    `available`, drawn from a generator seeded by (seed, round_index) alone, so that a run, and a
    resumed run, draws the same sample each round whatever happened before. All of them (in
    index order, no draw) when clients_per_round is null or covers every available client."""
    available = sorted(available)
    k = sample_size(clients_per_round, len(available))
    if k >= len(available):
        return available
    # A str seed is hashed with SHA-512 by random.seed: the same in every process (PYTHONHASHSEED aside).
    rng = random.Random(f"splitlora-clients-per-round:{int(seed)}:{int(round_index)}")
    return sorted(rng.sample(available, k))

from ..transport import TransportError, client_name


class Membership:
    """`active`: the clients in the run at its start (default: all). With `wait_s` (a federation
    whose clients may come back), a drop below min_clients does not end the run at once: the
    server's next round waits up to wait_s for clients to (re)join (`admit`, set by the server
    program, hands over the ones ready at a round's start)."""

    def __init__(self, num_clients: int, *, min_clients: int, names: Optional[Sequence[str]] = None,
                 on_drop: Optional[Callable[[int, str], None]] = None, active: Optional[Sequence[int]] = None,
                 wait_s: Optional[float] = None) -> None:
        if not 1 <= min_clients <= num_clients:
            raise ValueError(f"federation.min_clients must be from 1 to train.clients ({num_clients}), "
                             f"got {min_clients}")
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.names = list(names) if names is not None else [client_name(c) for c in range(num_clients)]
        self.on_drop = on_drop
        self._active = set(range(num_clients)) if active is None else set(active)
        self._events: List[Dict] = []
        self._joins: List[Dict] = []
        self.wait_s = wait_s
        # step -> {client: sample count} of the clients that (re)join at that round's start.
        self.admit: Optional[Callable[[int], Dict[int, int]]] = None
        # Called after the last round: no client can join any more (the server program refuses them).
        self.finish: Optional[Callable[[], None]] = None

    def rejoin(self, c: int, name: str, step: int) -> None:
        """Client c (back, or new) takes part from the round starting at `step`."""
        self._active.add(c)
        self.names[c] = name
        self._joins.append({"client": client_name(c), "name": name, "step": step})

    def joins(self) -> List[Dict]:
        """The (re)joins since the last call (for metrics.jsonl)."""
        out, self._joins = self._joins, []
        return out

    def training(self) -> List[int]:
        """The clients still in the run, in index order."""
        return sorted(self._active)

    def drop(self, c: int, step: int, reason: str) -> None:
        """Client c leaves the run at `step` because of `reason`; raises TransportError when fewer
        than min_clients remain."""
        if c not in self._active:
            return
        self._active.discard(c)
        self._events.append({"client": client_name(c), "name": self.names[c], "step": step, "reason": reason})
        if self.on_drop is not None:
            self.on_drop(c, reason)
        if len(self._active) < self.min_clients and self.wait_s is None:
            left = ", ".join(self.names[i] for i in sorted(self._active)) or "none"
            raise TransportError(f"only {len(self._active)} client(s) remain ({left}) after {self.names[c]} was "
                                 f"dropped at step {step} ({reason}); the run needs federation.min_clients="
                                 f"{self.min_clients}")

    def weights(self, all_weights: Sequence[float], clients: Sequence[int]) -> List[float]:
        """The FedAvg weights of `clients` (fedavg divides by their sum: renormalised)."""
        return [float(all_weights[c]) for c in clients]

    def events(self) -> List[Dict]:
        """The drops since the last call (for metrics.jsonl)."""
        out, self._events = self._events, []
        return out
