"""Clients that come and go, with real processes on loopback (mutual TLS): the server's per-round
sample (federation.clients_per_round) equals the in-process run's, and a client killed mid-run
comes back (a new process, the same certificate) and is admitted at a later round's start, the
server waiting for it because min_clients would not be met otherwise. Every wait is bounded and
every process is killed in a `finally`."""
import json
from pathlib import Path

import pytest
import torch
from fed_testutil import CLIENTS, WAIT_S, finish, kill_all, start, wait_for, write_config, write_data
from safetensors.torch import load_file

from splitlora.checkpoint import list_checkpoints
from splitlora.federation.certs import create_certs
from splitlora.federation.membership import sample_clients


def _server(folder: Path, config: Path, log: Path, procs: list, *extra):
    server = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen", "127.0.0.1:0",
                    "--no-progress", *extra], log)
    procs.append(server)
    return server, wait_for(r"listening on (127\.0\.0\.1:\d+)", log, server, WAIT_S).group(1)


def _client(folder: Path, config: Path, address: str, c: int, tag: str, procs: list, fault=None, out_tag=None):
    """Client c's process; its log is <tag>-client-<name>.log, its output folder runs/<out_tag or tag>-<name>."""
    name = CLIENTS[c]
    log = folder / f"{tag}-client-{name}.log"
    procs.append(start(["client", "--config", str(config), "--server", address, "--name", name, "--certs",
                        str(folder / "certs"), "--data", str(folder / f"client{c}.jsonl"),
                        "--output-dir", str(folder / "runs" / f"{out_tag or tag}-{name}")], log, fault=fault))
    return procs[-1], log


def _records(run: Path, kind: str) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["type"] == kind]


@pytest.mark.slow
def test_sampled_federation_equals_the_in_process_sampled_run(tmp_path):
    """clients_per_round=2 of 3: the server draws the same sample as the in-process run each round,
    left-out clients idle, and adapters, losses and byte counts equal the in-process run's."""
    write_data(tmp_path)
    config = write_config(tmp_path, federation="{step_timeout_s: 60, wait_s: 120, clients_per_round: 2}")
    text = config.read_text().replace("steps: 4, aggregate_every: 2", "steps: 8, aggregate_every: 2")
    config.write_text(text)
    create_certs(tmp_path / "certs", CLIENTS, log=lambda *_: None)
    procs = []
    try:
        local_log = tmp_path / "local.log"
        local = start(["train", "--config", str(config), "--no-progress", f"output_dir={tmp_path / 'runs' / 'local'}"],
                      local_log)
        procs.append(local)
        server_log = tmp_path / "server.log"
        server, address = _server(tmp_path, config, server_log, procs)
        clients = [_client(tmp_path, config, address, c, "fed", procs) for c in range(3)]
        assert finish(local, local_log, WAIT_S) == 0, local_log.read_text()
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for p, log in clients:
            assert finish(p, log, 60) == 0, log.read_text()
    finally:
        kill_all(procs)
    local, fed = tmp_path / "runs" / "local", tmp_path / "runs" / "fed"
    want = [[f"client{c}" for c in sample_clients(range(3), 2, seed=0, round_index=r)] for r in range(4)]
    assert [r["clients"] for r in _records(fed, "round")] == [r["clients"] for r in _records(local, "round")] == want
    assert len({tuple(w) for w in want}) > 1  # the sample changes between rounds
    a = load_file(str(local / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(fed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    got, exp = _records(fed, "step"), _records(local, "step")
    assert [r["bytes"] for r in got] == [r["bytes"] for r in exp]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in exp], rel=1e-6)
    assert [r["bytes"] for r in _records(fed, "round")] == [r["bytes"] for r in _records(local, "round")]


@pytest.mark.slow
def test_killed_client_restarts_and_is_admitted_at_a_later_round(tmp_path):
    """min_clients=3 of 3: client b dies at step 3 (mid-round 1); the round finishes with a and c,
    then the server waits (federation.wait_s) at round 2's start; b restarted by hand with the same
    command (a new process, the same certificate and --output-dir, no overwrite) replaces its first
    attempt's folder, is admitted with the global adapters, trains in the later rounds, and the
    run finishes."""
    write_data(tmp_path)
    config = write_config(tmp_path, federation="{step_timeout_s: 20, wait_s: 90, min_clients: 3}")
    config.write_text(config.read_text().replace("steps: 4, aggregate_every: 2", "steps: 8, aggregate_every: 2"))
    create_certs(tmp_path / "certs", CLIENTS, log=lambda *_: None)
    procs = []
    try:
        server_log = tmp_path / "server.log"
        server, address = _server(tmp_path, config, server_log, procs)
        clients = {c: _client(tmp_path, config, address, c, "first", procs,
                              fault="exit:client1:3" if c == 1 else None) for c in range(3)}
        b, b_log = clients[1]
        assert finish(b, b_log, WAIT_S) == 17, b_log.read_text()  # the injected abrupt exit
        wait_for(r"client b left", server_log, server, WAIT_S)
        first_ckpts = tmp_path / "runs" / "first-b" / "clients" / "client1" / "checkpoints"
        assert any(first_ckpts.iterdir())  # the first attempt's checkpoint of round 0 (step 2)
        b2, b2_log = _client(tmp_path, config, address, 1, "second", procs, out_tag="first")
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for p, log in (clients[0], clients[2], (b2, b2_log)):
            assert finish(p, log, 60) == 0, log.read_text()
    finally:
        kill_all(procs)
    text = b2_log.read_text()
    assert "trains from the next round" in text
    assert f"replaced its earlier folder {tmp_path / 'runs' / 'first-b' / 'clients' / 'client1'}" in text, text
    run = tmp_path / "runs" / "fed"
    steps = _records(run, "step")
    dropped = [d for r in steps for d in r.get("dropped", [])]
    joined = [d for r in steps for d in r.get("joined", [])]
    assert [d["name"] for d in dropped] == ["b"] and dropped[0]["step"] == 3
    assert [(d["name"], d["client"]) for d in joined] == [("b", "client1")]
    back = joined[0]["step"]
    assert back % 2 == 0 and back >= 4
    # The folder holds the second attempt's checkpoints only (the first attempt's step 2 is gone).
    assert all(step > back for step, _ in list_checkpoints(first_ckpts)), list_checkpoints(first_ckpts)
    rounds = _records(run, "round")
    for r in rounds:  # each round's clients are those in the run at its start
        first = r["step"] - 1
        expected = ["client0", "client1", "client2"] if first <= 2 or first >= back else ["client0", "client2"]
        assert r["clients"] == expected, r
    # b's second process received the global adapters before its first step, and trained.
    last = rounds[-1]["bytes"]["client1"]
    assert last["up"]["activations"] > 0 and last["up"]["adapters"] > 0
    rejoin_round = back // 2
    assert rounds[rejoin_round]["bytes"]["client1"]["down"]["adapters"] == \
        2 * rounds[rejoin_round]["bytes"]["client1"]["up"]["adapters"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
