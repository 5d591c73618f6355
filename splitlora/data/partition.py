"""Which client holds which example: IID and Dirichlet splits for simulation."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet")

def partition(groups: Sequence[str], num_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[list[int]]:
    """Split example indices ``0..len(groups)-1`` among clients; each list is sorted.

    ``"iid"``: a shuffled equal split (sizes differ by at most one).
    ``"dirichlet"``: for every group, the share of each client is drawn from Dirichlet(alpha)
    (small alpha: each group concentrates on few clients). A client left empty then gets one
    example from the currently largest client, until none is empty.
    """
    n = len(groups)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} is more than the {n} examples to split; "
                         f"every client needs at least one")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(n)
        return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]

    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for the dirichlet scheme, got {alpha!r}")
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for g in sorted(by_group):
        members = rng.permutation(by_group[g])
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            clients[client].extend(int(i) for i in part)
    for client in range(num_clients):
        while not clients[client]:
            donor = max(range(num_clients), key=lambda c: len(clients[c]))
            taken = clients[donor].pop(int(rng.integers(len(clients[donor]))))
            clients[client].append(taken)
    return [sorted(c) for c in clients]


def group_skew(groups: Sequence[str], parts: Sequence[Sequence[int]]) -> float:
    """Mean over clients of the total variation distance between the client's group distribution
    and the whole data's: 0 for a perfectly IID split, approaching 1 for disjoint groups."""
    labels = sorted(set(groups))
    overall = np.array([sum(g == label for g in groups) for label in labels], dtype=float)
    overall /= overall.sum()
    distances = []
    for part in parts:
        counts = np.array([sum(groups[i] == label for i in part) for label in labels], dtype=float)
        distances.append(0.5 * np.abs(counts / counts.sum() - overall).sum())
    return float(np.mean(distances))
