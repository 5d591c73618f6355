"""The gRPC transport on loopback, in one process: mutual TLS, identities from certificates,
refusals, chunked packets both ways, timeouts and dropped connections. Every wait is bounded."""
import time

import pytest
import torch

from splitlora.federation.certs import create_certs
from splitlora.federation.grpc_transport import GrpcClientTransport, GrpcServerTransport
from splitlora.transport import TransportError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    create_certs(d, ["a", "b", "c"], log=lambda *_: None)
    other = tmp_path_factory.mktemp("other-ca")
    create_certs(other, ["a", "b"], log=lambda *_: None)
    return d, other


@pytest.fixture
def closing():
    opened = []
    yield opened.append
    for t in reversed(opened):
        try:
            t.close(grace_s=0.5)
        except Exception:
            pass


def _server(certs_dir, closing, **kw):
    logs = []
    s = GrpcServerTransport("127.0.0.1:0", certs_dir=certs_dir, timeout_s=kw.pop("timeout_s", 10),
                            log=logs.append, **kw)
    closing(s)
    return s, logs


def _client(s, name, certs_dir, closing, **kw):
    c = GrpcClientTransport(f"127.0.0.1:{s.port}", name, certs_dir=certs_dir, timeout_s=kw.pop("timeout_s", 10), **kw)
    closing(c)
    return c


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_tls_exchange_both_ways_with_chunking(certs, closing):
    d, _ = certs
    s, logs = _server(d, closing, chunk_bytes=1 << 16)
    clients = {n: _client(s, n, d, closing, chunk_bytes=1 << 16, hello={"samples": 10 + i})
               for i, n in enumerate(["b", "a"])}
    assert s.wait_for_clients(2, timeout_s=10) == ["a", "b"]
    assert s.hello("b")["samples"] == 10
    s.assign(["a", "b"])
    for n, c in clients.items():
        w = c.wait_welcome(10)
        assert (w["index"], w["clients"]) == ({"a": 0, "b": 1}[n], 2)
    a, b = clients["a"], clients["b"]
    assert a.me == "client0" and s.name_of("client1") == "b"
    big = torch.randint(0, 256, (300_000,), dtype=torch.uint8)  # several chunks
    a.send("client0", "server", "activations", 0, big)
    b.send("client1", "server", "activations", 0, big[:5])
    b.send("client1", "server", "labels", 0, torch.empty(0, dtype=torch.uint8))
    assert torch.equal(s.recv("server", "client0", "activations", 0), big)
    assert torch.equal(s.recv("server", "client1", "activations", 0), big[:5])
    assert s.recv("server", "client1", "labels", 0).numel() == 0
    s.send("server", "client1", "gradients", 0, big)
    assert torch.equal(b.recv("client1", "server", "gradients", 0), big)
    # The server's ledgers hold every byte of the exchange, as under transport=dist.
    assert s.combined_ledger().total() == 2 * big.numel() + 5
    assert s.combined_ledger().total(client="client0", direction="up") == big.numel()
    with pytest.raises(ValueError, match="cannot send as"):
        s.send("client0", "server", "labels", 0, big[:1])


def test_other_ca_wrong_name_and_duplicate_refused_server_keeps_running(certs, closing):
    d, other = certs
    s, logs = _server(d, closing)
    # A certificate from another CA: the TLS handshake fails; the client learns it at once.
    stranger = _client(s, "a", other, closing)
    with pytest.raises(TransportError, match="did not accept"):
        stranger.wait_welcome(10)
    # The honest clients still get in, and a second "a" is refused as a duplicate.
    a = _client(s, "a", d, closing)
    assert s.wait_for_clients(1, timeout_s=10) == ["a"]
    dup = _client(s, "a", d, closing)
    with pytest.raises(TransportError, match="already connected"):
        dup.wait_welcome(10)
    assert any("duplicate" in r for r in s.refusals)
    s.assign(["a"])
    assert a.wait_welcome(10)["index"] == 0
    a.send("client0", "server", "labels", 0, torch.arange(3, dtype=torch.uint8))
    assert s.recv("server", "client0", "labels", 0).tolist() == [0, 1, 2]


def test_claimed_name_must_match_the_certificate(certs, closing, tmp_path):
    d, _ = certs
    s, logs = _server(d, closing)
    # Client b's key and certificate, filed under the name "c": it claims to be c but is b.
    import shutil

    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(d / "ca.crt", fake / "ca.crt")
    shutil.copy(d / "client-b.crt", fake / "client-c.crt")
    shutil.copy(d / "client-b.key", fake / "client-c.key")
    liar = _client(s, "c", fake, closing)
    with pytest.raises(TransportError, match="certificate names client 'b'"):
        liar.wait_welcome(10)
    assert s.connected() == []


def test_insecure_mode_takes_the_claimed_name(closing):
    s = GrpcServerTransport("127.0.0.1:0", insecure=True, timeout_s=10, log=lambda *_: None)
    closing(s)
    c = GrpcClientTransport(f"127.0.0.1:{s.port}", "zed", insecure=True, timeout_s=10)
    closing(c)
    assert s.wait_for_clients(1, timeout_s=10) == ["zed"]
    with pytest.raises(ValueError, match="--certs"):
        GrpcServerTransport("127.0.0.1:0")


def test_timeouts_and_disconnects_raise_transport_errors(certs, closing):
    d, _ = certs
    s, logs = _server(d, closing, timeout_s=0.5)
    with pytest.raises(TransportError, match="waited 0.3 s for 2 client"):
        s.wait_for_clients(2, timeout_s=0.3)
    a = _client(s, "a", d, closing, timeout_s=0.5)
    s.wait_for_clients(1, timeout_s=10)
    s.assign(["a"])
    a.wait_welcome(10)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="waited 0.5 s for activations of step 3.*federation.step_timeout_s"):
        s.recv("server", "client0", "activations", 3)
    with pytest.raises(TransportError, match="waited 0.5 s for gradients"):
        a.recv("client0", "server", "gradients", 3)
    assert time.monotonic() - t0 < 5
    a.send("client0", "server", "labels", 4, torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(TransportError, match="expected activations of step 4 .* received labels of step 4"):
        s.recv("server", "client0", "activations", 4)
    a.close(grace_s=1)
    assert _until(lambda: s.connected() == [])
    with pytest.raises(TransportError, match="connection ended"):
        s.recv("server", "client0", "activations", 5)
    with pytest.raises(TransportError, match="cannot send"):
        s.send("server", "client0", "gradients", 5, torch.zeros(1, dtype=torch.uint8))
    # Once the run's clients are chosen (assign), a client that comes (back) is refused with the
    # reason, unless the server takes clients in (joinable: plain splitlora, next test).
    a2 = _client(s, "a", d, closing)
    with pytest.raises(TransportError, match="cannot take clients in a running federation"):
        a2.wait_welcome(10)


def test_joinable_server_welcomes_returning_and_new_clients_as_pending(certs, closing):
    """A joinable server (plain splitlora) welcomes a client that comes back under its index and a
    new one under the first free index; both wait as pending until admitted; a full federation,
    another config and a duplicate name are refused."""
    d, _ = certs
    s, logs = _server(d, closing)
    s.fingerprint, s.num_clients, s.joinable = "cfg", 3, True
    a = _client(s, "a", d, closing, hello={"config": "cfg"})
    s.wait_for_clients(1, timeout_s=10)
    s.assign(["a"])
    assert a.wait_welcome(10)["clients"] == 3
    a.close(grace_s=1)
    assert _until(lambda: s.connected() == [])
    wrong = _client(s, "b", d, closing, hello={"config": "other"})
    with pytest.raises(TransportError, match="config differs"):
        wrong.wait_welcome(10)
    a2 = _client(s, "a", d, closing, hello={"config": "cfg"})
    welcome = a2.wait_welcome(10)
    assert (welcome["index"], welcome["join"], welcome["resume"]) == (0, True, False) and a2.me == "client0"
    c = _client(s, "c", d, closing, hello={"config": "cfg"})
    assert c.wait_welcome(10)["index"] == 1
    dup = _client(s, "c", d, closing, hello={"config": "cfg"})
    with pytest.raises(TransportError, match="already connected"):
        dup.wait_welcome(10)
    assert s.pending() == {"client0": "a", "client1": "c"}
    assert s.poll_pending("client0") is None  # nothing sent yet: not ready
    a2.send_control({"type": "ready", "samples": 7})
    assert _until(lambda: (m := s.poll_pending("client0")) is not None and m.get("samples") == 7 or False)
    s.admit("client0")
    assert s.pending() == {"client1": "c"} and s.connected() == ["a"]
    s.send_control("client0", {"type": "start", "step": 4})
    assert a2.control(10) == {"type": "start", "step": 4}
    a2.send("client0", "server", "activations", 4, torch.arange(3, dtype=torch.uint8))
    assert s.recv("server", "client0", "activations", 4).tolist() == [0, 1, 2]
    b = _client(s, "b", d, closing, hello={"config": "cfg"})
    assert b.wait_welcome(10)["index"] == 2
    # Every index taken (c holds client1 while pending): a new name is refused. The CA signed a, b, c
    # only here, so the refusal is checked on the transport's rule directly.
    assert "already has its train.clients=3 clients" in s._join_refusal("d", {"config": "cfg"})
    s.drop_pending("client1", "test")
    assert c.control(10) == {"type": "dropped", "reason": "test"}  # the run goes on: it may rejoin
    # After the last round: the waiting client is told, and a newcomer refused, with the reason.
    s.close_to_joiners("the run has finished its last round")
    assert b.control(10) == {"type": "refused", "reason": "the run has finished its last round"}
    c2 = _client(s, "c", d, closing, hello={"config": "cfg"})
    with pytest.raises(TransportError, match="came after the run started; the run has finished its last round"):
        c2.wait_welcome(10)


def test_malformed_and_oversized_streams_are_dropped_with_a_reason(certs, closing):
    d, _ = certs
    s, logs = _server(d, closing, max_packet_bytes=1000)
    a = _client(s, "a", d, closing)
    b = _client(s, "b", d, closing)
    s.wait_for_clients(2, timeout_s=10)
    s.assign(["a", "b"])
    a.wait_welcome(10)
    b.wait_welcome(10)
    a._outbox.put(b"SLFD garbage that is not a header at all......")
    b.send("client1", "server", "activations", 0, torch.zeros(5000, dtype=torch.uint8))  # past max_packet_bytes
    with pytest.raises(TransportError, match="dropped: .*version"):
        s.recv("server", "client0", "activations", 0)
    with pytest.raises(TransportError, match="dropped: .*limit is 1000 bytes"):
        s.recv("server", "client1", "activations", 0)
    assert _until(lambda: any("dropped client a" in line for line in logs))
    assert a.control(10)["type"] == "closed"
    # Still serving: a new client is answered (refused: the run's clients were chosen).
    c = _client(s, "c", d, closing)
    with pytest.raises(TransportError, match="came after the run started"):
        c.wait_welcome(10)


def test_a_client_without_a_certificate_fails_the_handshake(certs, closing):
    import grpc

    from splitlora.federation.grpc_transport import METHOD, PROTOCOL
    from splitlora.federation.stream import encode_control

    d, _ = certs
    s, logs = _server(d, closing)
    channel = grpc.secure_channel(f"127.0.0.1:{s.port}",
                                  grpc.ssl_channel_credentials(root_certificates=(d / "ca.crt").read_bytes()))
    try:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        responses = call(iter([encode_control({"type": "hello", "protocol": PROTOCOL, "name": "a"})]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(responses)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    assert s.connected() == []
    # And the server still serves a client with a certificate.
    a = _client(s, "a", d, closing)
    assert s.wait_for_clients(1, timeout_s=10) == ["a"]
    a.close(grace_s=0.2)


@pytest.mark.parametrize("joinable,kind", [(True, "dropped"), (False, "refused")])
def test_a_dropped_client_is_told_whether_it_may_rejoin(certs, closing, joinable, kind):
    """A client dropped from a run that takes clients in (`joinable`) is told "dropped" (it rejoins by
    itself); from one that does not, "refused" (it stops). Its transport keeps the server's last word."""
    d, _ = certs
    s, logs = _server(d, closing)
    s.fingerprint, s.num_clients = "cfg", 2
    a = _client(s, "a", d, closing, hello={"config": "cfg"})
    s.wait_for_clients(1, timeout_s=10)
    s.assign(["a"])
    s.joinable = joinable
    a.wait_welcome(10)
    s.drop("a", "it waited 8 s for activations of step 3")
    assert a.control(10) == {"type": kind, "reason": "it waited 8 s for activations of step 3"}
    assert _until(lambda: a.control(10)["type"] == "closed")
    assert a.server_ended == {"type": kind, "reason": "it waited 8 s for activations of step 3"}
    with pytest.raises(TransportError, match="expected gradients of step 3 from the server, but the connection "
                                             "ended: .*it waited 8 s"):
        a.recv("client0", "server", "gradients", 3)
    if joinable:  # and it is welcomed back, under its index, to join at a later round
        a2 = _client(s, "a", d, closing, hello={"config": "cfg"})
        welcome = a2.wait_welcome(10)
        assert (welcome["index"], welcome["join"]) == (0, True)


@pytest.mark.parametrize("duplicate_wait_s", [0.0, 15.0])
def test_join_tries_a_duplicate_name_again_while_the_old_connection_may_be_a_ghost(certs, closing,
                                                                                    duplicate_wait_s):
    """A client whose name the server still holds (its own earlier connection, not yet noticed
    gone) is refused as a duplicate; `join` tries again for up to duplicate_wait_s, and gets in
    once the old connection is gone. Without that grace it stops at the first refusal."""
    import threading

    from splitlora.federation.client import join

    d, _ = certs
    s, logs = _server(d, closing)
    ghost = _client(s, "a", d, closing)
    s.wait_for_clients(1, timeout_s=10)
    lines, out = [], {}

    def rejoin():
        try:
            out["joined"] = join(lambda: _client(s, "a", d, closing), "x", 30, lines.append, first_delay_s=0.2,
                                 duplicate_wait_s=duplicate_wait_s)
        except TransportError as err:
            out["error"] = err

    t = threading.Thread(target=rejoin, daemon=True)
    t.start()
    if duplicate_wait_s:
        assert _until(lambda: any("still holds a connection under this client's name" in line for line in lines))
        ghost.close(grace_s=0.2)  # the server notices the old connection is gone
        # The new connection is in once the server logged a second "connected" for a.
        assert _until(lambda: sum("client a connected" in line for line in logs) == 2 or "error" in out)
        assert "error" not in out and s.connected() == ["a"]
        s.assign(["a"])
        t.join(20)
        transport, welcome = out["joined"]
        assert welcome["index"] == 0 and transport.me == "client0"
    else:
        t.join(20)
        assert not t.is_alive() and "joined" not in out
        assert "already connected (a duplicate name; if that connection is this client's earlier process" in str(
            out["error"])
        assert not any("still holds" in line for line in lines)


def test_a_second_server_on_a_port_in_use_is_refused(certs, closing):
    """gRPC's default SO_REUSEPORT would let a second server bind the same port and split the
    clients between the two without a word; it is turned off, so the second one fails at once."""
    d, _ = certs
    s, _ = _server(d, closing)
    with pytest.raises(ValueError, match=rf"cannot listen on '127.0.0.1:{s.port}' .*the address is in use"):
        closing(GrpcServerTransport(f"127.0.0.1:{s.port}", certs_dir=d, timeout_s=5, log=lambda *_: None))
