"""`splitlora server`: the federation's server program.

It listens (federation.listen / --listen), waits for the clients (federation.min_clients, at most
federation.wait_s), gives each its index (sorted by name), collects their sample counts (the
FedAvg weights), then trains: it owns the server segment and its adapters, the aggregation, the
schedule, the checkpoints (every round) and the run folder, exactly as the server rank of
transport=dist does (trainer._train with role "server"), over the gRPC transport. It never reads
the clients' training data: it evaluates on data.eval_path (or the synthetic task's held-out
stream).

It takes clients in while it runs: the first round starts once federation.start_clients (default
min_clients) are connected; a client that connects later, or comes back after a drop or a crash
(same certificate name, same index), is welcomed at once and admitted at the next round's start
(`_admit`, called at a round's start by the strategy: splitlora.strategies.rounds), and each round
of SplitLoRA (plain or U-shaped) trains a seeded sample of the clients in the run
(federation.clients_per_round). Vanilla SL's rounds are its steps.

Restarting it with resume=true continues from its last checkpoint: the clients, which keep
trying to reconnect, rejoin, and every party goes back to the newest round that all of them have
checkpointed, so the run ends as an uninterrupted one would.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from ..transport import SERVER, TransportError, client_name
from .settings import check_address, check_federation_run, config_fingerprint

INSECURE_WARNING = ("warning: --insecure: TLS is off; anyone who can reach this address can join the federation "
                    "and read or alter what crosses it. Use it for loopback tests only.")


def run_server(cfg, *, listen: Optional[str] = None, certs_dir=None, insecure: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    from ..trainer import _Interrupts, _train
    from .data import ServerData
    from .grpc_transport import GrpcServerTransport
    from .membership import Membership

    check_federation_run(cfg)
    f = cfg.federation
    listen = check_address(listen or f.listen, "--listen")
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    n = cfg.train.clients
    transport = GrpcServerTransport(listen, certs_dir=certs_dir, insecure=insecure, timeout_s=f.step_timeout_s,
                                    max_packet_bytes=f.max_packet_bytes, chunk_bytes=f.chunk_bytes,
                                    keepalive_s=f.keepalive_s, max_clients=max(2 * n, 8), log=log)
    # Clients are taken in at a round's start (splitlora.strategies.rounds): the run starts with
    # start_clients (default min_clients) and clients may (re)join later.
    first = f.start_clients or f.min_clients or n
    log(f"federation server listening on {transport.address} ({'insecure' if insecure else 'mutual TLS'}); "
        f"waiting up to {f.wait_s:g} s for {first} client(s)")
    fingerprint = config_fingerprint(cfg)
    transport.fingerprint, transport.num_clients = fingerprint, n
    interrupts = _Interrupts(Path(cfg.output_dir) / "checkpoints")
    closing = {"type": "done"}
    try:
        with interrupts:
            try:
                names = _gather(transport, first, f.wait_s, fingerprint, log, most=n)
                transport.joinable = True
                transport.assign(names, welcome={"config": fingerprint, "resume": bool(cfg.resume)})
                # The strategy asks it which clients are still in, and reports the ones that fail
                # (SplitLoRA._server_step); a dropped client's connection is closed with the reason.
                # The clients absent at the start have no name yet (they take one when they join).
                all_names = list(names) + [client_name(i) for i in range(len(names), n)]
                members = Membership(n, min_clients=f.min_clients or n, names=all_names,
                                     on_drop=lambda c, reason: transport.drop(members.names[c], reason),
                                     active=range(len(names)), wait_s=f.wait_s)
                # Every client's sample count as the run started (what the server's privacy accounting
                # uses): the start message of each client, joiners included, carries it.
                start_counts: List[int] = []
                members.admit = lambda step: _admit(transport, members, step, log, start_counts)
                members.finish = lambda: transport.close_to_joiners("the run has finished its last round")
                transport.membership = members
                parties = [client_name(i) for i in range(len(names))]

                def agree(step: int) -> int:
                    # The newest checkpoint every party has (-1: some party refuses to resume).
                    steps = [step] + [_expect(transport, p, "resume_step", f.wait_s)["step"] for p in parties]
                    common = min(int(s) for s in steps)
                    for p in parties:
                        transport.send_control(p, {"type": "resume_at", "step": common})
                    return common

                def samples() -> List[int]:
                    counts = [_expect(transport, p, "ready", f.wait_s)["samples"] for p in parties]
                    bad = [f"{p} ({c!r})" for p, c in zip(parties, counts) if not isinstance(c, int) or c < 1]
                    if bad:
                        raise TransportError(f"clients reported no usable sample count: {', '.join(bad)}")
                    log("federation: clients " + ", ".join(f"{p}={name} ({c} samples)"
                                                           for p, name, c in zip(parties, names, counts)))
                    # An absent client's FedAvg weight is set when it joins (SplitLoRA._admit); until
                    # then it is in no round.
                    start_counts[:] = counts + [1] * (n - len(counts))
                    # Every client's count goes with the start: privacy.epsilon sets the noise
                    # multiplier from the largest sample rate (batch / examples) of all clients, and
                    # each client must add the noise the server accounts for (federation.data.ClientData).
                    for p in parties:
                        transport.send_control(p, {"type": "start", "samples": start_counts})
                    return list(start_counts)

                return _train(cfg, SERVER, progress=progress, log=log, interrupts=interrupts, transport=transport,
                              federation=ServerData(samples), agree_resume=agree)
            except KeyboardInterrupt:
                stop = interrupts.stopped(SERVER)
                # Clients wait (up to federation.wait_s) for the server to come back with resume=true.
                closing = {"type": "paused", "reason": "the server was interrupted"}
            except BaseException as err:
                closing = {"type": "aborted", "reason": f"the server stopped: {err}"}
                raise
    finally:
        transport.close(message=closing)
    print(stop.message, file=sys.stderr, flush=True)
    raise stop


def _expect(transport, party: str, kind: str, wait_s: float) -> dict:
    message = transport.recv_control(party, wait_s)
    if message.get("type") != kind:
        raise TransportError(f"{party} ({transport.name_of(party)}) sent {message.get('type')!r} where the server "
                             f"expected {kind!r}")
    return message


def _admit(transport, members, step: int, log, start_counts: List[int]) -> dict:
    """The clients that joined the running federation and are ready, admitted to the round that
    starts at `step`: {index: sample count}. Called by the strategy at each round's start. Their
    start message carries `start_counts` (every client's sample count as the run started)."""
    admitted = {}
    for party, name in transport.pending().items():
        message = transport.poll_pending(party)
        if message is None:
            continue  # not ready yet (still loading): a later round takes it
        samples = message.get("samples")
        if message.get("type") != "ready" or not isinstance(samples, int) or samples < 1:
            transport.drop_pending(party, f"it sent {message.get('type')!r} (samples {samples!r}) where the server "
                                          f"expected its ready message with a sample count")
            continue
        c = int(party[len("client"):])
        if c in members.training():  # its earlier connection is gone without the server noticing yet
            members.drop(c, step, f"{name} connected again")
        transport.admit(party)
        transport.send_control(party, {"type": "start", "step": step, "samples": start_counts})
        members.rejoin(c, name, step)
        log(f"federation: client {name} joins as {party} at step {step} ({samples} samples)")
        admitted[c] = samples
    return admitted


def _gather(transport, n: int, wait_s: float, fingerprint: str, log, *, most: Optional[int] = None) -> list:
    """The connected clients (by name, at most `most`, default n) whose config matches the
    server's, once at least n of them are connected; others are dropped."""
    deadline = time.monotonic() + wait_s
    while True:
        names = transport.wait_for_clients(n, max(0.0, deadline - time.monotonic()))
        good = []
        for name in names:
            theirs = transport.hello(name).get("config")
            if theirs != fingerprint:
                transport.drop(name, f"its config differs from the server's in keys that change the training "
                                     f"(fingerprint {theirs} vs {fingerprint}); give every party the same run.yaml")
            else:
                good.append(name)
        if len(good) >= n:
            return good[:most or n]
