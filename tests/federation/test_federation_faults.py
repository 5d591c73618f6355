"""Faults in a federation, with real processes on loopback (mutual TLS): four clients, of which
one is killed mid-round, one sends a corrupted packet and one stalls past
federation.step_timeout_s. Each is dropped with its reason logged and recorded in metrics.jsonl;
the rounds' FedAvg runs over the clients that finished; the server finishes the run with the one
client left (federation.min_clients=1). Every wait is bounded; every process is killed in a
`finally`."""
import json

import pytest
from fed_testutil import WAIT_S, finish, kill_all, start, wait_for, write_config, write_data
from splitlora.federation.certs import create_certs

CLIENTS = ("a", "b", "c", "d")
FAULTS = {"b": "exit:client1:1", "c": "corrupt:client2:2", "d": "stall:client3:3"}


@pytest.mark.slow
def test_clients_that_die_corrupt_or_stall_are_dropped_and_training_goes_on(tmp_path):
    write_data(tmp_path, CLIENTS)
    config = write_config(tmp_path, CLIENTS, federation="{step_timeout_s: 8, wait_s: 120, min_clients: 1, start_clients: 4}")
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
    for name in ("c", "d"):
        assert rcs[name] != 0 and "dropped" in logs[name].read_text(), logs[name].read_text()
        assert "reconnecting" not in logs[name].read_text()  # dropped on purpose: it does not come back
    for name in ("b", "c", "d"):
        assert f"dropped client {name}" in out, out
    run = tmp_path / "runs" / "fed"
    dropped = {d["name"]: d for r in map(json.loads, (run / "metrics.jsonl").open()) if r["type"] == "step"
               for d in r.get("dropped", [])}
    assert dropped["b"]["step"] == 1 and "connection ended" in dropped["b"]["reason"]
    assert dropped["c"]["step"] == 2 and "could not be decoded" in dropped["c"]["reason"]
    assert dropped["d"]["step"] == 3 and "waited 8 s" in dropped["d"]["reason"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    # The dropped clients' bytes stop at their drop; client a's run to the end.
    assert summary["bytes"]["client0"]["up"]["activations"] > summary["bytes"]["client1"]["up"]["activations"] > 0
