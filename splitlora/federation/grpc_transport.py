"""The federation transport: gRPC, one long-lived bidirectional stream per client.

The server listens (`GrpcServerTransport`); each client program opens one stream
(`GrpcClientTransport`) and keeps it for the whole run. Packets cross it as bounded chunks
(splitlora.federation.stream), never pickled. With TLS (the default) the server requires a
client certificate signed by the federation's CA (mutual TLS, gRPC's own), and a client's name
is its certificate's subject CN, read from the connection (`context.auth_context()`), never what
the client claims. Both ends send keepalive pings, so a peer that vanished without closing (a
pulled cable, a killed VM) is noticed; every receive waits at most `timeout_s`.

Both classes are `Transport`s: the strategies (SplitLoRA, vanilla SL) drive them as they drive
the local and dist transports. Parties are still "server" and "client<N>"; the server maps each
connected client's name to its index (`assign`) and tells the client in a welcome message.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..transport.base import SERVER, CommLedger, Transport, TransportError, client_name
from .certs import check_client_name, client_credentials_files, server_credentials_files
from .stream import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_PACKET_BYTES, HEADER_BYTES, Control, Reassembler,
                     StreamError, chunk_packet, encode_control)

logger = logging.getLogger(__name__)

METHOD = "/splitlora.federation.Federation/Connect"
PROTOCOL = 1
# The server's last word on a client's stream: the run is over ("done"), it failed ("aborted"), it
# was interrupted and may be resumed ("paused"), this client cannot take part ("refused"), or this
# client was dropped from a run that goes on and that it may rejoin ("dropped").
ENDINGS = ("done", "aborted", "paused", "refused", "dropped")


def channel_options(chunk_bytes: int, keepalive_s: float) -> list:
    # A message is one chunk plus its header: anything larger is refused by gRPC itself before
    # our code sees it. Keepalive pings notice a peer that vanished without closing its stream.
    limit = chunk_bytes + HEADER_BYTES + 4096
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def _server_fault_step() -> Optional[int]:
    """SPLITLORA_INJECT_FAULT=exit:server:<step> (the tests' fault injection, as under
    transport=dist): the server process ends abruptly as it is about to send that step's gradients."""
    spec = os.environ.get("SPLITLORA_INJECT_FAULT", "")
    what, _, rest = spec.partition(":")
    party, _, step = rest.partition(":")
    return int(step) if what == "exit" and party == SERVER and step.isdigit() else None


class _Closed:
    """Put in an inbox when the connection ends; `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse(code_name: str, reason: str):
    return ("refuse", code_name, reason)


@dataclass
class _Peer:
    """The server's end of one client's stream."""

    name: str
    outbox: "queue.Queue" = field(default_factory=queue.Queue)
    inbox: "queue.Queue" = field(default_factory=queue.Queue)
    hello: dict = field(default_factory=dict)
    reports: "queue.Queue" = field(default_factory=queue.Queue)  # figures a client reports (its loss)
    alive: bool = True
    reason: str = ""
    party: Optional[str] = None

    def close(self, reason: str) -> None:
        if self.alive:
            self.alive, self.reason = False, reason
            self.inbox.put(_Closed(reason))
            self.outbox.put(None)


class _LedgerMixin:
    def _init_ledgers(self) -> None:
        # Bytes this process received, by the same keys as the ledger (the ledger counts sends).
        self.received = CommLedger()
        self.wire_bytes_sent = 0

    def combined_ledger(self) -> CommLedger:
        """What this process sent and received, in one ledger: on the server (the hub every packet
        passes through) that is every byte of the run."""
        return CommLedger.merged((self.ledger, self.received))

    def _take(self, inbox: "queue.Queue", who: str, kind: str, step: int, deadline_s: float) -> torch.Tensor:
        try:
            item = inbox.get(timeout=deadline_s)
        except queue.Empty:
            raise TransportError(f"{self.me} waited {deadline_s:g} s for {kind} of step {step} from {who}; "
                                 f"nothing came (federation.step_timeout_s)") from None
        if isinstance(item, _Closed):
            inbox.put(item)  # every later receive sees the closed connection too
            raise TransportError(f"{self.me} expected {kind} of step {step} from {who}, but the connection "
                                 f"ended: {item.reason}")
        if isinstance(item, Control):
            raise TransportError(f"{self.me} expected {kind} of step {step} from {who} but received the "
                                 f"control message {item.message.get('type')!r}: {item.message.get('reason', '')}")
        if (item.kind, item.step) != (kind, step):
            raise TransportError(f"{self.me} expected {kind} of step {step} from {who} but received "
                                 f"{item.kind} of step {item.step}")
        return item.data


class GrpcServerTransport(_LedgerMixin, Transport):
    """The server's side: listens, authenticates clients, and moves packets to and from them."""

    def __init__(self, listen: str = "127.0.0.1:0", *, certs_dir=None, insecure: bool = False,
                 timeout_s: float = 60.0, max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, keepalive_s: float = 20.0, max_clients: int = 64,
                 log=None) -> None:
        import grpc
        from concurrent import futures

        super().__init__(timeout_s)
        self._init_ledgers()
        if certs_dir is None and not insecure:
            raise ValueError("the federation server needs --certs DIR (made by `splitlora certs DIR --clients ...`); "
                             "--insecure turns TLS off, for loopback tests only")
        self.me = SERVER
        self.insecure = bool(insecure)
        self.max_packet_bytes = int(max_packet_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._log = log or (lambda msg: logger.warning("%s", msg))
        self._lock = threading.Condition()
        self._peers: Dict[str, _Peer] = {}  # by client name: the connected ones
        self._parties: Dict[str, str] = {}  # "client<N>" -> client name
        self.refusals: List[str] = []
        self.closed_to_new = False  # set once the run's clients are chosen (assign)
        # Once the run started, a client may still join (or come back) when this is set (by the
        # server program, whose strategies admit clients at a round's start): it is
        # welcomed at once, waits as "pending" until the server's next round admits it (`admit`).
        self.joinable = False
        self.fingerprint: Optional[str] = None  # the config digest a joining client must match
        self.num_clients = 0
        self._pending: Dict[str, _Peer] = {}  # party -> a joined client not yet admitted
        self._no_join = ""  # why no client may join any more (close_to_joiners)
        self.membership = None  # splitlora.federation.membership.Membership, set by the server program
        # One worker per open stream (each stream's response generator holds one), plus slack for
        # refusals, which end at once.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_clients + 4),
                                   options=channel_options(self.chunk_bytes, keepalive_s)
                                   + [("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                                      # gRPC binds with SO_REUSEPORT by default: a second server on the
                                      # same port would start, and the kernel would split the clients
                                      # between the two. Off, the second one is refused.
                                      ("grpc.so_reuseport", 0)],
                                   maximum_concurrent_rpcs=max_clients)
        handler = grpc.stream_stream_rpc_method_handler(self._connect, request_deserializer=None,
                                                        response_serializer=None)
        service, method = METHOD.rsplit("/", 1)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.lstrip("/"),
                                                                                    {method: handler}),))
        try:
            if self.insecure:
                self.port = self._server.add_insecure_port(listen)
            else:
                ca, key, cert = server_credentials_files(certs_dir)
                creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
                self.port = self._server.add_secure_port(listen, creds)
        except RuntimeError:  # grpcio >= 1.5x raises where older ones returned port 0
            self.port = 0
        if not self.port:
            raise ValueError(f"cannot listen on {listen!r} (federation.listen / --listen): the address is in use or "
                             f"not this machine's; give HOST:PORT, e.g. 127.0.0.1:50051")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        self._server.start()

    # -- connections ---------------------------------------------------------------------------
    def _refused(self, peer_desc: str, reason: str) -> None:
        self.refusals.append(reason)
        self._log(f"federation: refused {peer_desc}: {reason}")

    def _connect(self, request_iterator, context):
        import grpc

        peer_desc = context.peer()
        claimed = None
        try:
            first = next(request_iterator)
            got = Reassembler(self.max_packet_bytes, self.chunk_bytes).feed(first)
            if not isinstance(got, Control) or got.message.get("type") != "hello":
                raise StreamError("the first message of a connection must be a hello")
            hello = got.message
            if hello.get("protocol") != PROTOCOL:
                raise StreamError(f"protocol {hello.get('protocol')!r}; this server speaks {PROTOCOL}: run the "
                                  f"same splitlora on both sides")
            claimed = check_client_name(str(hello.get("name")))
        except (StopIteration, grpc.RpcError):
            self._refused(peer_desc, "the connection ended before its hello")
            return
        except (StreamError, ValueError) as err:
            self._refused(peer_desc, str(err))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {err}")
        if self.insecure:
            name = claimed
        else:
            names = context.auth_context().get("x509_common_name") or []
            if not names:
                self._refused(peer_desc, "no client certificate")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "refused: a client certificate signed by the "
                                                               "federation's CA is required")
            name = names[0].decode(errors="replace")
            if name != claimed:
                reason = f"its certificate names client {name!r} but it says it is {claimed!r}"
                self._refused(peer_desc, reason)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"refused: {reason}; use --name {name}")
        with self._lock:
            if self.closed_to_new and not self.joinable:
                reason = (f"client {name!r} came after the run started; "
                          + (self._no_join or "this strategy cannot take clients in a running federation"))
                self._refused(peer_desc, reason)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused: {reason}")
            if (name in self._peers and self._peers[name].alive) or any(
                    p.name == name and p.alive for p in self._pending.values()):
                reason = (f"client {name!r} is already connected (a duplicate name; if that connection is this "
                          f"client's earlier process, gone without closing it, the server notices within "
                          f"federation.keepalive_s + 10 s)")
                self._refused(peer_desc, reason)
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"refused: {reason}")
            peer = _Peer(name=name, hello=hello)
            old = self._peers.get(name)
            if self.closed_to_new:
                reason = self._join_refusal(name, hello)
                if reason:
                    self._refused(peer_desc, reason)
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused: {reason}")
                # A client seen before (playing, or waiting on a connection now gone) keeps its
                # index; a new one takes the first free one.
                waiting = [party for party, p in self._pending.items() if p.name == name]
                peer.party = (old.party if old is not None and old.party is not None
                              else waiting[0] if waiting else self._free_parties()[0])
                self._pending[peer.party] = peer
                peer.outbox.put(encode_control({"type": "welcome", "index": int(peer.party[len("client"):]),
                                                "clients": self.num_clients, "config": self.fingerprint,
                                                "resume": False, "join": True}))
            else:
                if old is not None and old.party is not None:
                    peer.party = old.party  # a reconnecting client keeps its index
                    self._parties[old.party] = name
                self._peers[name] = peer
            self._lock.notify_all()
        context.add_callback(lambda: self._ended(peer, "the client closed its stream or the connection broke"))
        threading.Thread(target=self._read, args=(peer, request_iterator), daemon=True,
                         name=f"federation-read-{name}").start()
        self._log(f"federation: client {name} connected from {peer_desc}")
        while True:
            try:
                item = peer.outbox.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    self._ended(peer, "the connection broke")
                    return
                continue
            if item is None:
                if peer.reason.startswith("dropped"):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, peer.reason)
                return
            yield item

    def _read(self, peer: _Peer, request_iterator) -> None:
        import grpc

        stream = Reassembler(self.max_packet_bytes, self.chunk_bytes)
        try:
            for message in request_iterator:
                got = stream.feed(message)
                if isinstance(got, Control) and got.message.get("type") == "report":
                    peer.reports.put(got.message)
                elif got is not None:
                    peer.inbox.put(got)
            stream.finish()
            self._ended(peer, "the client closed its stream")
        except StreamError as err:
            self._log(f"federation: dropped client {peer.name}: {err}")
            self._ended(peer, f"dropped: {err}")
        except grpc.RpcError as err:
            self._ended(peer, f"the connection broke ({err.code().name})" if hasattr(err, "code") else str(err))
        except Exception as err:  # never let a reader thread die silently
            self._ended(peer, f"dropped: {type(err).__name__}: {err}")

    def _ended(self, peer: _Peer, reason: str) -> None:
        with self._lock:
            if peer.alive:
                self._log(f"federation: client {peer.name} left: {reason}")
            peer.close(reason)
            self._lock.notify_all()

    def _join_refusal(self, name: str, hello: dict) -> str:
        """Why a client connecting to the running federation cannot join ("" if it can)."""
        if hello.get("config") != self.fingerprint:
            return (f"client {name!r}: its config differs from the server's in keys that change the training "
                    f"(fingerprint {hello.get('config')} vs {self.fingerprint}); give every party the same run.yaml")
        known = (any(p.party is not None for n, p in self._peers.items() if n == name)
                 or any(p.name == name for p in self._pending.values()))
        if not known and not self._free_parties():
            return (f"client {name!r}: the federation already has its train.clients={self.num_clients} clients; "
                    f"only those may rejoin")
        return ""

    def _free_parties(self) -> List[str]:
        """The indices no client has played or waits to play (under self._lock)."""
        return [client_name(i) for i in range(self.num_clients)
                if client_name(i) not in self._parties and client_name(i) not in self._pending]

    def pending(self) -> Dict[str, str]:
        """The clients that joined the running federation and wait to be admitted: party -> name."""
        with self._lock:
            return {party: p.name for party, p in self._pending.items()}

    def poll_pending(self, party: str) -> Optional[dict]:
        """A pending client's first message (its "ready"), without waiting: None while it has sent
        nothing; a pending client whose connection ended is forgotten."""
        with self._lock:
            peer = self._pending.get(party)
        if peer is None:
            return None
        try:
            item = peer.inbox.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Control):
            return item.message
        with self._lock:
            self._pending.pop(party, None)
        if not isinstance(item, _Closed):
            self._drop_peer(peer, f"it sent {item.kind} of step {item.step} before it was admitted")
        return None

    def admit(self, party: str) -> None:
        """The pending client of `party` plays it from now on (its earlier connection, if any, is gone)."""
        with self._lock:
            peer = self._pending.pop(party)
            old = self._peers.get(peer.name)
            if old is not None and old is not peer:
                old.close(old.reason or "replaced by a new connection")
            self._peers[peer.name] = peer
            self._parties[party] = peer.name

    def close_to_joiners(self, reason: str) -> None:
        """No client joins any more (the last round is over): the ones waiting are told `reason`."""
        with self._lock:
            self.joinable, self._no_join = False, reason
            waiting, self._pending = list(self._pending.values()), {}
        for peer in waiting:
            self._drop_peer(peer, reason)

    def drop_pending(self, party: str, reason: str) -> None:
        with self._lock:
            peer = self._pending.pop(party, None)
        if peer is not None:
            self._drop_peer(peer, reason)

    def connected(self) -> List[str]:
        with self._lock:
            return sorted(n for n, p in self._peers.items() if p.alive)

    def wait_for_clients(self, count: int, timeout_s: float) -> List[str]:
        """Waits until `count` clients are connected (at most `timeout_s`); their names, sorted."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                names = sorted(n for n, p in self._peers.items() if p.alive)
                if len(names) >= count:
                    return names
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"the server waited {timeout_s:g} s for {count} client(s) "
                                         f"(federation.min_clients); {len(names)} connected"
                                         + (f": {', '.join(names)}" if names else ""))
                self._lock.wait(min(left, 1.0))

    def hello(self, name: str) -> dict:
        return dict(self._peers[name].hello)

    def assign(self, names: Sequence[str], welcome: Optional[dict] = None) -> None:
        """Client `names[i]` plays party client<i>; each is told its index in a welcome message. From
        then on, new connections are refused."""
        with self._lock:
            self.closed_to_new = True
            self.num_clients = max(self.num_clients, len(names))
            for i, name in enumerate(names):
                peer = self._peers.get(name)
                if peer is None or not peer.alive:
                    raise TransportError(f"client {name} is not connected")
                party = client_name(i)
                peer.party = party
                self._parties[party] = name
        for i, name in enumerate(names):
            self.send_control(client_name(i), {"type": "welcome", "index": i, "clients": self.num_clients,
                                               **(welcome or {})})

    def _peer(self, party: str) -> _Peer:
        name = self._parties.get(party)
        if name is None:
            raise TransportError(f"no client plays {party} (assign() maps connected clients to parties)")
        return self._peers[name]

    def name_of(self, party: str) -> str:
        return self._peer(party).name

    def send_control(self, party: str, message: dict) -> None:
        peer = self._peer(party)
        if peer.alive:
            peer.outbox.put(encode_control(message))

    def recv_control(self, party: str, timeout_s: float) -> dict:
        """The next message from `party`, which must be a control message (e.g. its "ready")."""
        peer = self._peer(party)
        try:
            item = peer.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise TransportError(f"the server waited {timeout_s:g} s for {party} ({peer.name}) to get ready; "
                                 f"nothing came") from None
        if isinstance(item, _Closed):
            peer.inbox.put(item)
            raise TransportError(f"{party} ({peer.name}) left before it was ready: {item.reason}")
        if not isinstance(item, Control):
            raise TransportError(f"{party} ({peer.name}) sent {item.kind} of step {item.step} before it was ready")
        return item.message

    def recv_report(self, party: str, key: str, step: int) -> float:
        """The figure `key` of `step` that `party` reported (Transport.report on its side): a number
        for the metrics, outside the protocol's packets and the byte counts."""
        peer = self._peer(party)
        try:
            message = peer.reports.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TransportError(f"the server waited {self.timeout_s:g} s for {party} ({peer.name}) to report its "
                                 f"{key} of step {step} (federation.step_timeout_s)") from None
        value = message.get("value")
        if (message.get("key"), message.get("step")) != (key, step) or not isinstance(value, (int, float)):
            raise TransportError(f"{party} ({peer.name}) reported {message.get('key')!r} of step {message.get('step')} "
                                 f"where the server expected its {key} of step {step}")
        return float(value)

    def drop(self, name: str, reason: str) -> None:
        """Ends client `name`'s connection; it is told `reason`."""
        with self._lock:
            peer = self._peers.get(name)
        if peer is not None:
            self._drop_peer(peer, reason)

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        # While the run takes clients in (`joinable`), a dropped client may come back at a later
        # round's start, so it is told "dropped" (it rejoins by itself); otherwise rejoining is
        # pointless (a config mismatch, the run finished or is still gathering its first clients)
        # and it is told "refused" (it stops).
        kind = "dropped" if self.joinable else "refused"
        self._log(f"federation: dropped client {peer.name}: {reason}")
        peer.outbox.put(encode_control({"type": kind, "reason": reason}))
        self._ended(peer, f"dropped: {reason}")

    # -- Transport ----------------------------------------------------------------------------
    def _send(self, src, dst, kind, step, packet):
        if src != SERVER:
            raise ValueError(f"this process is the server; it cannot send as {src}")
        if kind == "gradients" and _server_fault_step() == step:
            os._exit(17)  # fault injection for the tests: the server dies mid-round, abruptly
        peer = self._peer(dst)
        if not peer.alive:
            raise TransportError(f"the server cannot send {kind} of step {step} to {dst} ({peer.name}): "
                                 f"{peer.reason}")
        for message in chunk_packet(kind, step, packet, self.chunk_bytes):
            peer.outbox.put(message)
            self.wire_bytes_sent += len(message)

    def _recv(self, dst, src, kind, step) -> torch.Tensor:
        if dst != SERVER:
            raise ValueError(f"this process is the server; it cannot receive as {dst}")
        peer = self._peer(src)
        data = self._take(peer.inbox, f"{src} ({peer.name})", kind, step, self.timeout_s)
        self.received.record(src, dst, kind, self.round_index, data.numel())
        return data

    def flush(self) -> None:
        """Sends are queued on each client's stream; gRPC's flow control paces them."""

    def close(self, grace_s: float = 5.0, message: Optional[dict] = None) -> None:
        """Tells every client the run is over (`message`, by default {"type": "done"}), lets their
        streams drain for up to `grace_s`, and stops listening."""
        with self._lock:
            peers = [p for p in list(self._peers.values()) + list(self._pending.values()) if p.alive]
        for p in peers:
            p.outbox.put(encode_control(message or {"type": "done"}))
            p.outbox.put(None)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(not p.outbox.empty() for p in peers):
            time.sleep(0.05)
        self._server.stop(grace=max(0.0, deadline - time.monotonic())).wait(grace_s + 1)


class GrpcClientTransport(_LedgerMixin, Transport):
    """A client's side: one stream to the server for the whole run."""

    def __init__(self, server: str, name: str, *, certs_dir=None, insecure: bool = False, timeout_s: float = 60.0,
                 max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 keepalive_s: float = 20.0, hello: Optional[dict] = None) -> None:
        import grpc

        super().__init__(timeout_s)
        self._init_ledgers()
        if certs_dir is None and not insecure:
            raise ValueError("the federation client needs --certs DIR holding ca.crt and client-<name>.crt/.key; "
                             "--insecure turns TLS off, for loopback tests only")
        self.name = check_client_name(name)
        self.me: Optional[str] = None  # "client<N>", once the server's welcome says which
        self.max_packet_bytes = int(max_packet_bytes)
        self.chunk_bytes = int(chunk_bytes)
        options = channel_options(self.chunk_bytes, keepalive_s)
        if insecure:
            self._channel = grpc.insecure_channel(server, options=options)
        else:
            ca, key, cert = client_credentials_files(certs_dir, name)
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(server, creds, options=options)
        self.server = server
        self._outbox: "queue.Queue" = queue.Queue()
        self._inbox: "queue.Queue" = queue.Queue()
        self._controls: "queue.Queue" = queue.Queue()
        self._outbox.put(encode_control({"type": "hello", "protocol": PROTOCOL, "name": self.name, **(hello or {})}))
        call = self._channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self._call = call(self._requests())
        self._fault = None
        self._stall_step: Optional[int] = None
        self._closed = threading.Event()  # set when the stream has ended
        # The server's last word ({"type": one of ENDINGS, ...}), None while it has said nothing
        # (a connection that just broke: the server may come back).
        self.server_ended: Optional[dict] = None
        threading.Thread(target=self._read, daemon=True, name="federation-read").start()

    def _requests(self):
        while True:
            item = self._outbox.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        import grpc

        stream = Reassembler(self.max_packet_bytes, self.chunk_bytes)
        reason = "the server closed the stream"
        try:
            for message in self._call:
                got = stream.feed(message)
                if isinstance(got, Control):
                    self._controls.put(got.message)
                    if got.message.get("type") in ENDINGS:
                        self.server_ended = got.message
                        reason = (f"the server ended the connection ({got.message.get('type')}"
                                  + (f": {got.message['reason']}" if got.message.get("reason") else "") + ")")
                elif got is not None:
                    self._inbox.put(got)
            stream.finish()
        except StreamError as err:
            reason = f"the server sent a malformed stream: {err}"
        except grpc.RpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        self._controls.put({"type": "closed", "reason": reason})
        self._inbox.put(_Closed(reason))
        self._closed.set()

    def control(self, timeout_s: Optional[float] = None) -> dict:
        """The next control message from the server ({"type": "closed", ...} when the stream ended)."""
        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self._controls.get(timeout=wait)
        except queue.Empty:
            raise TransportError(f"client {self.name} waited {wait:g} s for the server at {self.server}; no "
                                 f"answer") from None

    def wait_welcome(self, timeout_s: float) -> dict:
        """Waits for the server's welcome (which makes this process client<index>)."""
        message = self.control(timeout_s)
        if message.get("type") != "welcome":
            raise TransportError(f"client {self.name}: the server at {self.server} did not accept this client: "
                                 f"{message.get('reason', message.get('type'))}")
        self.me = client_name(int(message["index"]))
        from ..transport.dist import _fault_from_env

        # The tests' fault injection: the dist transport's (corrupt, exit), plus stall:<party>:<step>,
        # a client that stops answering before that step's activations (until the server drops it).
        spec = os.environ.get("SPLITLORA_INJECT_FAULT", "")
        if spec.startswith("stall:"):
            _, party, step = spec.split(":")
            self._stall_step = int(step) if party == self.me else None
        else:
            self._fault = _fault_from_env(self.me)
        return message

    def send_control(self, message: dict) -> None:
        self._outbox.put(encode_control(message))

    def next_round(self, step: int, timeout_s: float) -> dict:
        """The server's message that opens the round starting at `step`: {"type": "round", "train":
        whether this client is sampled, "adapters": whether the global adapters follow}."""
        message = self.control(timeout_s)
        if message.get("type") != "round" or message.get("step") != step:
            raise TransportError(f"client {self.name} expected the server's start of the round at step {step} but "
                                 f"got {message.get('type')!r}"
                                 + (f" of step {message.get('step')}" if "step" in message else "")
                                 + (f": {message['reason']}" if message.get("reason") else ""))
        return message

    def report(self, src: str, key: str, step: int, value: float) -> None:
        """A figure for the server's metrics (a U-shaped client's loss): a control message, outside
        the packets the ledger counts."""
        self.send_control({"type": "report", "key": key, "step": int(step), "value": float(value)})

    def _send(self, src, dst, kind, step, packet):
        if src != self.me or dst != SERVER:
            raise ValueError(f"this process is {self.me}; it sends to the server only, as itself (got {src} -> {dst})")
        if self._fault is not None:
            packet = self._fault.apply(kind, step, packet)
        if kind == "activations" and step == self._stall_step:
            self._closed.wait(120)
        for message in chunk_packet(kind, step, packet, self.chunk_bytes):
            self._outbox.put(message)
            self.wire_bytes_sent += len(message)

    def _recv(self, dst, src, kind, step) -> torch.Tensor:
        if dst != self.me or src != SERVER:
            raise ValueError(f"this process is {self.me}; it receives from the server only (got {src} -> {dst})")
        data = self._take(self._inbox, "the server", kind, step, self.timeout_s)
        self.received.record(src, dst, kind, self.round_index, data.numel())
        return data

    def flush(self) -> None:
        """Sends are queued on the stream; gRPC's flow control paces them."""

    def close(self, grace_s: float = 5.0) -> None:
        """Ends this client's stream (after what is queued has gone, for up to `grace_s`)."""
        self._outbox.put(None)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not self._outbox.empty():
            time.sleep(0.05)
        self._channel.close()
