"""Faults in a federation, with real processes on loopback (mutual TLS): four clients, of which
one is killed mid-round, one sends a corrupted packet and one stalls past
federation.step_timeout_s. Each is dropped with its reason logged and recorded in metrics.jsonl;
the rounds' FedAvg runs over the clients that finished. The server tells the corrupt and the
stalled client "dropped" (the run goes on and takes clients in), and they rejoin by themselves:
the server waits at the next round's start for them (federation.min_clients=3 of the three
still alive), admits them, and the run finishes with them. Every wait is bounded; every process
is killed in a `finally`."""
import json

import pytest
from fed_testutil import WAIT_S, finish, kill_all, start, wait_for, write_config, write_data
from splitlora.federation.certs import create_certs

CLIENTS = ("a", "b", "c", "d")
FAULTS = {"b": "exit:client1:1", "c": "corrupt:client2:2", "d": "stall:client3:3"}


@pytest.mark.slow
def test_clients_that_die_corrupt_or_stall_are_dropped_and_the_others_rejoin(tmp_path):
    write_data(tmp_path, CLIENTS)
    config = write_config(tmp_path, CLIENTS, federation="{step_timeout_s: 8, wait_s: 120, min_clients: 3, "
                                                        "start_clients: 4}")
    # Four rounds: the drops happen in round 1 (steps 2-3), the rejoins are admitted at a later one.
    config.write_text(config.read_text().replace("steps: 4, aggregate_every: 2", "steps: 8, aggregate_every: 2"))
    create_certs(tmp_path / "certs", CLIENTS, log=lambda *_: None)
    procs, logs = [], {}
    try:
        server_log = tmp_path / "server.log"
        server = start(["server", "--config", str(config), "--certs", str(tmp_path / "certs"), "--listen",
                        "127.0.0.1:0", "--no-progress"], server_log)
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", server_log, server, WAIT_S).group(1)
        clients = {}
        for c, name in enumerate(CLIENTS):
            logs[name] = tmp_path / f"client-{name}.log"
            clients[name] = start(["client", "--config", str(config), "--server", address, "--name", name,
                                   "--certs", str(tmp_path / "certs"), "--data", str(tmp_path / f"client{c}.jsonl")],
                                  logs[name], fault=FAULTS.get(name))
            procs.append(clients[name])
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        rcs = {name: finish(p, logs[name], 60) for name, p in clients.items()}
    finally:
        kill_all(procs)
    out = server_log.read_text()
    assert rcs["a"] == 0, logs["a"].read_text()
    assert rcs["b"] == 17  # the injected abrupt exit
    for name in ("b", "c", "d"):
        assert f"dropped client {name}" in out, out
    run = tmp_path / "runs" / "fed"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["type"] == "step"]
    dropped = {d["name"]: d for r in steps for d in r.get("dropped", [])}
    joined = {d["name"]: d for r in steps for d in r.get("joined", [])}
    assert dropped["b"]["step"] == 1 and "connection ended" in dropped["b"]["reason"]
    assert dropped["c"]["step"] == 2 and "could not be decoded" in dropped["c"]["reason"]
    assert dropped["d"]["step"] == 3 and "waited 8 s" in dropped["d"]["reason"]
    assert "b" not in joined  # its process is gone
    for name, party in (("c", "client2"), ("d", "client3")):
        text = logs[name].read_text()
        # Told "dropped" with the reason, it rejoined by itself (not the "lost the server" path),
        # replaced its stale folder and finished the run.
        assert rcs[name] == 0, text
        assert f"client {name} was dropped by the server ({dropped[name]['reason']}" in text, text
        assert ("it rejoins the running federation (rejoin 1; 0 attempt(s) in a row without a finished step: it "
                "stops at 5)") in text, text  # its first attempt trained steps before the drop
        assert "lost the server" not in text, text
        assert f"replaced its earlier folder {tmp_path / 'runs' / f'fed-{name}' / 'clients' / party}" in text, text
        assert f"client {name} finished its 8 steps" in text, text
        back = joined[name]
        assert back["client"] == party
        # Admitted at a later round's start (min_clients=3 makes the server wait for both at the first).
        assert back["step"] % 2 == 0 and back["step"] > dropped[name]["step"]
        assert back["step"] == 4
    rounds = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["type"] == "round"]
    for r in rounds[2:]:  # the rounds after the rejoin: a, c and d train, b does not
        assert r["bytes"]["client2"]["up"]["activations"] > 0 and r["bytes"]["client3"]["up"]["activations"] > 0, r
        assert r["bytes"]["client1"]["up"]["activations"] == 0, r
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    # b's bytes stop at its drop; client a's run to the end.
    assert summary["bytes"]["client0"]["up"]["activations"] > summary["bytes"]["client1"]["up"]["activations"] > 0
