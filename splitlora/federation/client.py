"""`splitlora client`: one client of a federation.

It connects to the server (one gRPC stream, mutual TLS), learns its index from the server's
welcome, loads its client segment only (the saved model's bottom layers, as a transport=dist
client does), reads its own data file (`--data`, any format the data readers accept), reports
its sample count and trains in lockstep with the server (trainer._train with role client<N>).
Its data never leaves it: only activations (and, in the plain variant, labels) at the cut and
its adapters cross. It checkpoints every round in its own output folder.

A client that connects to a running federation (late, or restarted after a crash) is told so in
the welcome; it reports its samples and starts at the round the server admits it to, with the
global adapters. Its own earlier folder (`clients/<role>/` in its output folder, from an earlier
attempt) is stale then, and it replaces it: rerunning the same command is enough. In each round
the server says whether it trains (federation.clients_per_round).

When the server drops it from a run that goes on (it missed federation.step_timeout_s, sent a
packet that does not decode, its connection broke; the server says "dropped"), it rejoins by
itself at a later round (it stops after MAX_FRUITLESS_REJOINS attempts in a row that finish no
step). When the connection to the server breaks (the server crashed or is restarting), it tries
to reconnect with exponential backoff for up to federation.wait_s, and continues from the newest
round that it and the restarted server both have checkpointed (or, if the server trained on,
joins it as above). A server that ended the run
("done", "aborted") or refuses this client ("refused": another config, a duplicate name, the run
finished) ends it.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..transport import TransportError
from .settings import check_address, check_federation_run, config_fingerprint

INSECURE_WARNING = ("warning: --insecure: TLS is off; the server is not authenticated and what crosses the "
                    "connection can be read or altered. Use it for loopback tests only.")


def run_client(cfg, *, server: str, name: str, certs_dir=None, insecure: bool = False, data: Optional[str] = None,
               output_dir: Optional[str] = None, log: Callable[[str], None] = print, progress: bool = False) -> int:
    from ..trainer import _Interrupts, _train
    from .data import ClientData, read_client_records
    from .grpc_transport import GrpcClientTransport

    check_federation_run(cfg)
    check_address(server, "--server")
    data = data or cfg.data.train_path
    if data is None:
        raise ValueError("a client trains on its own data: give --data FILE (or set data.train_path in its config)")
    if not Path(data).exists():
        # Before connecting: a typo should not cost a wait for the server, nor a slot in its run.
        raise ValueError(f"--data {data}: no such file or folder (this client's training data)")
    # Read now: a file that cannot be read should not cost a wait for the server either.
    records = read_client_records(cfg.data, data)
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    f = cfg.federation
    fingerprint = config_fingerprint(cfg)
    cfg = dataclasses.replace(cfg, output_dir=output_dir or f"{cfg.output_dir}-{name}")

    # A client waits for the server, which may itself wait step_timeout_s for each client of the
    # step that is late before it answers anyone.
    timeout_s = (cfg.train.clients + 1) * f.step_timeout_s

    def connect():
        return GrpcClientTransport(server, name, certs_dir=certs_dir, insecure=insecure, timeout_s=timeout_s,
                                   max_packet_bytes=f.max_packet_bytes, chunk_bytes=f.chunk_bytes,
                                   keepalive_s=f.keepalive_s, hello={"config": fingerprint})

    # A duplicate-name refusal is tried again for as long as the server may take to notice that
    # this client's earlier connection vanished (keepalive_s, then gRPC's 10 s ping timeout).
    duplicate_wait_s = f.keepalive_s + 15.0

    def connected():
        try:
            return join(connect, server, f.wait_s, log, duplicate_wait_s=duplicate_wait_s)
        except KeyboardInterrupt:  # Ctrl-C while waiting for the server: one line, no traceback
            raise _interrupted_waiting(name, server) from None

    transport, welcome = connected()
    # Automatic reconnections (after a drop or a broken connection): as many as the run needs, but
    # at most MAX_FRUITLESS_REJOINS in a row that finish no step, so that a client the server keeps
    # dropping (e.g. one always slower than step_timeout_s) stops and says why.
    rejoins = fruitless = 0
    try:
        while True:
            role = transport.me
            joining, resume = bool(welcome.get("join")), bool(welcome.get("resume"))
            log(f"federation: client {name} joined {server} as {role} of {welcome['clients']}"
                + (" (resuming)" if resume else "")
                + (" (the run is under way: it trains from the next round)" if joining else ""))
            if joining:
                _replace_own_folder(cfg, role, name, log)
            # A client joining a running federation waits for the next round's start, up to a round.
            ready_wait = f.wait_s + (cfg.train.aggregate_every + 1) * timeout_s if joining else f.wait_s
            run_cfg = dataclasses.replace(cfg, resume=resume, overwrite=cfg.overwrite and not resume)
            attempt: dict = {}
            try:
                _run(run_cfg, role, transport, ClientData(data, int(welcome["index"]), int(welcome["clients"]),
                                                           on_ready=_ready(transport, name, ready_wait),
                                                           records=records),
                     _agree(transport, f.wait_s), log, _train, _Interrupts, progress=progress, seen=attempt)
                log(f"federation: client {name} finished its {cfg.train.steps} steps")
                return 0
            except TransportError as err:
                ended = transport.server_ended
                kind = None if ended is None else ended.get("type")
                if kind not in (None, "paused", "dropped"):
                    raise  # the server ended the run, or refuses this client: nothing to rejoin
                trained = attempt["interrupts"].steps_done if "interrupts" in attempt else 0
                fruitless = 0 if trained else fruitless + 1
                if fruitless >= MAX_FRUITLESS_REJOINS:
                    raise TransportError(
                        f"client {name} gave up: {fruitless} attempts in a row finished no step (the last ended: "
                        f"{ended.get('reason') if ended else err}); if the server keeps dropping it for missing "
                        f"federation.step_timeout_s, raise that (in every party's run.yaml), then rerun the same "
                        f"command") from None
                rejoins += 1
                if kind == "dropped":
                    log(f"federation: client {name} was dropped by the server ({ended.get('reason', 'no reason given')}"
                        f"); it rejoins the running federation (rejoin {rejoins}; {fruitless} attempt(s) in a row "
                        f"without a finished step: it stops at {MAX_FRUITLESS_REJOINS}), trying for up to "
                        f"{f.wait_s:g} s")
                else:
                    log(f"federation: client {name} lost the server ({err}); reconnecting for up to {f.wait_s:g} s")
                transport.close(grace_s=0)
                transport, welcome = connected()
    finally:
        transport.close()


def _replace_own_folder(cfg, role: str, name: str, log) -> None:
    """A client joining a running run starts afresh, at the round the server admits it to, with the
    global adapters: what its own earlier attempt left in `clients/<role>/` is stale, and would make
    prepare_output_dir refuse the rerun of the same command. It is deleted here (prepare_output_dir
    with overwrite=true and a client role deletes that folder only, never the server's files nor
    other clients')."""
    from ..preflight import prepare_output_dir, run_evidence

    if not run_evidence(cfg.output_dir, role):
        return
    prepare_output_dir(dataclasses.replace(cfg, resume=False, overwrite=True), role, log=lambda _: None)
    log(f"federation: client {name} joins the running run afresh as {role}: replaced its earlier folder "
        f"{Path(cfg.output_dir) / 'clients' / role} (an earlier attempt's checkpoints; the server's global "
        f"adapters take their place)")


# Automatic rejoins in a row that finish no step before a client gives up (see run_client).
MAX_FRUITLESS_REJOINS = 5


# What an interrupted client does next: it does not resume on its own (the server decides where
# the run is), it rejoins it.
CLIENT_ADVICE = ("rerun the same command (a running server admits it at its next round; a server restarted "
                 "with resume=true resumes it)")


def _interrupted_waiting(name: str, server: str):
    """The RunInterrupted of a Ctrl-C while the client waits for the server (before a run, or
    between two attempts), its message printed."""
    from ..trainer import RunInterrupted

    stop = RunInterrupted(f"client {name}: interrupted (SIGINT) while waiting for the server at {server}; this "
                          f"attempt trained nothing: {CLIENT_ADVICE}", 130)
    print(stop.message, file=sys.stderr, flush=True)
    return stop


def _run(cfg, role, transport, federation, agree, log, train, interrupts_cls, progress: bool = False,
         seen: Optional[dict] = None) -> None:
    """One attempt at the run; `seen["interrupts"]`, when given, tells the caller how far it got."""
    interrupts = interrupts_cls(Path(cfg.output_dir) / "clients" / role / "checkpoints")
    if seen is not None:
        seen["interrupts"] = interrupts
    with interrupts:
        try:
            train(cfg, role, progress=progress, log=log, interrupts=interrupts, transport=transport,
                  federation=federation, agree_resume=agree)
        except KeyboardInterrupt:
            stop = interrupts.stopped(role, CLIENT_ADVICE)
            print(stop.message, file=sys.stderr, flush=True)
            raise stop from None


def _ready(transport, name: str, wait_s: float):
    def ready(samples: int) -> dict:
        """Reports the sample count; returns the server's start message (its "step": where a client
        joining a running federation starts; its "samples", if any: every client's count)."""
        transport.send_control({"type": "ready", "samples": samples})
        message = transport.control(wait_s)
        if message.get("type") != "start":
            raise TransportError(f"client {name}: the server did not start the run: "
                                 f"{message.get('reason', message.get('type'))}")
        return message
    return ready


def _agree(transport, wait_s: float):
    def agree(step: int) -> int:
        transport.send_control({"type": "resume_step", "step": int(step)})
        message = transport.control(wait_s)
        if message.get("type") != "resume_at":
            raise TransportError(f"the server did not answer which step to resume from: "
                                 f"{message.get('reason', message.get('type'))}")
        return int(message["step"])
    return agree


# An unreachable server that waiting cannot cure: a certificate one side does not trust (a TLS
# protocol failure or alert; a handshake cut short by a server that is going down or starting up
# is transient). Refusals by the server itself (a duplicate name, another config) are not UNAVAILABLE.
_FINAL = re.compile(r"CERTIFICATE|SSL_ERROR_SSL|TSI_PROTOCOL_FAILURE|ALERT", re.IGNORECASE)


def join(connect, server: str, wait_s: float, log, *, first_delay_s: float = 0.5, max_delay_s: float = 10.0,
         duplicate_wait_s: float = 0.0):
    """(transport, welcome): connects and waits for the server's welcome. While the server cannot be
    reached (not started yet, restarting), tries again with exponential backoff, for at most
    `wait_s` in all; a refusal (TLS, another config) ends it at once. A refusal for a duplicate
    name is tried again for up to `duplicate_wait_s`: the connection the server holds under this
    name may be this client's own earlier one, gone without the server noticing yet (a crashed
    machine, a dropped network: its keepalive notices within federation.keepalive_s + 10 s)."""
    started = time.monotonic()
    deadline = started + wait_s
    duplicate_deadline = started + min(duplicate_wait_s, wait_s)
    delay = first_delay_s
    while True:
        transport = connect()
        try:
            return transport, transport.wait_welcome(max(1.0, deadline - time.monotonic()))
        except TransportError as err:
            transport.close(grace_s=0)
            message = str(err)
            if "ALREADY_EXISTS" in message and time.monotonic() + delay <= duplicate_deadline:
                log(f"federation: the server at {server} still holds a connection under this client's name (its "
                    f"earlier process, gone without the server noticing yet?); trying again in {delay:.1f} s")
            elif "UNAVAILABLE" not in message or _FINAL.search(message) or time.monotonic() + delay > deadline:
                raise
            else:
                log(f"federation: the server at {server} cannot be reached yet; trying again in {delay:.1f} s")
            time.sleep(delay)
            delay = min(2 * delay, max_delay_s)
