"""`splitlora server` and `splitlora client` as real processes on loopback, with mutual TLS.

One module-scoped scenario (processes are slow to start on a small CI machine): a server, a
client holding a certificate from another CA (refused; the server keeps running) and three
clients, each with its own shard file. The run must equal the in-process run of the same config
with `data.client_paths` listing the same files: the same adapters (rtol 1e-5, atol 1e-6, the
dist tests' tolerance; bit for bit in practice, on one CPU thread), step losses (rel 1e-6) and
byte counts (exactly). Then the server is killed mid-round and restarted with resume=true: the
clients reconnect by themselves and the run still ends as the in-process one. Every wait is
bounded and every process is killed in a `finally`.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from fed_testutil import CLIENTS, WAIT_S, finish, kill_all, start, wait_for, write_config, write_data
from safetensors.torch import load_file

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data, certificates and config, and the in-process run of that config (the reference)."""
    from splitlora.federation.certs import create_certs

    folder = tmp_path_factory.mktemp("federation")
    write_data(folder)
    config = write_config(folder)
    create_certs(folder / "certs", CLIENTS, log=lambda *_: None)
    create_certs(folder / "other-ca", ["a"], log=lambda *_: None)
    local_log = folder / "local.log"
    local = start(["train", "--config", str(config), "--no-progress", f"output_dir={folder / 'runs' / 'local'}"],
                   local_log)
    try:
        assert finish(local, local_log, WAIT_S) == 0, local_log.read_text()
    finally:
        if local.poll() is None:
            local.kill()
            local.wait(timeout=30)
    return folder, config


def _clients(folder: Path, config: Path, address: str, run: str, procs: list) -> list:
    logs = []
    for c, name in enumerate(CLIENTS):
        log = folder / f"{run}-client-{name}.log"
        logs.append(log)
        procs.append(start(["client", "--config", str(config), "--server", address, "--name", name, "--certs",
                             str(folder / "certs"), "--data", str(folder / f"client{c}.jsonl"),
                             "--output-dir", str(folder / "runs" / f"{run}-{name}")], log))
    return logs


@pytest.fixture(scope="module")
def scenario(setup):
    folder, config = setup
    procs = []
    try:
        server_log = folder / "server.log"
        server = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen",
                         "127.0.0.1:0", "--no-progress"], server_log)
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", server_log, server, WAIT_S).group(1)
        # A client whose certificate another CA signed, beside the three real ones: refused by the
        # TLS handshake while the server goes on to train with the others.
        stranger_log = folder / "stranger.log"
        stranger = start(["client", "--config", str(config), "--server", address, "--name", "a", "--certs",
                           str(folder / "other-ca"), "--data", str(folder / "client0.jsonl"),
                           "--output-dir", str(folder / "runs" / "stranger")], stranger_log)
        procs.append(stranger)
        client_logs = _clients(folder, config, address, "fed", procs)
        stranger_rc = finish(stranger, stranger_log, WAIT_S)
        server_alive_after_stranger = server.poll() is None
        server_rc = finish(server, server_log, WAIT_S)
        client_rcs = [finish(p, log, 60) for p, log in zip(procs[-3:], client_logs)]
    finally:
        kill_all(procs)
    return {"stranger": (stranger_rc, stranger_log.read_text()),
            "server_alive_after_stranger": server_alive_after_stranger,
            "server": (server_rc, server_log.read_text()),
            "clients": [(rc, log.read_text()) for rc, log in zip(client_rcs, client_logs)]}


def test_client_from_another_ca_is_refused_and_the_server_keeps_running(scenario):
    rc, output = scenario["stranger"]
    assert rc != 0, output
    assert "did not accept" in output and "CERTIFICATE_VERIFY_FAILED" in output, output
    assert scenario["server_alive_after_stranger"]
    assert scenario["server"][0] == 0, scenario["server"][1]


def _same_run(folder: Path, run: str) -> None:
    """The federation run `run` has the in-process run's adapters (float32, rtol 1e-5 and atol 1e-6,
    the dist tests' tolerance; they are equal bit for bit on one CPU thread), step losses (rel 1e-6)
    and byte counts (exactly)."""
    local, fed = folder / "runs" / "local", folder / "runs" / run
    a = load_file(str(local / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(fed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    def steps(r):
        return [(x["step"], x["loss"], x["bytes"]) for x in map(json.loads, (r / "metrics.jsonl").open())
                if x["type"] == "step"]

    got, want = steps(fed), steps(local)
    assert [(s, n) for s, _, n in got] == [(s, n) for s, _, n in want]
    assert [l for _, l, _ in got] == pytest.approx([l for _, l, _ in want], rel=1e-6)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (local, fed))
    assert sb["bytes"] == sa["bytes"] and sb["bytes_total"] == sa["bytes_total"] > 0
    assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], rel=1e-6)


def test_federation_run_equals_the_in_process_run(setup, scenario):
    folder, _ = setup
    rc, output = scenario["server"]
    assert rc == 0, output
    for c, (rc, out) in enumerate(scenario["clients"]):
        assert rc == 0, out
        # Each client shows its own progress: its steps (all 4 of them) and the bytes it moved.
        assert re.search(rf"splitlora \(client{c}\): 100%.*4/4.*moved=[\d.]+ [KM]iB", out), out
    assert "client0=a (24 samples), client1=b (24 samples), client2=c (24 samples)" in output
    _same_run(folder, "fed")
    # Each client kept its checkpoints in its own folder.
    for name in CLIENTS:
        assert (folder / "runs" / f"fed-{name}" / "clients").is_dir()


def test_server_killed_mid_run_restarts_and_the_clients_rejoin(setup):
    """The server dies abruptly mid-round (step 3, after the checkpoint of round 0); restarted with
    resume=true on the same address, it takes back its clients, which reconnect by themselves, and
    the run ends as the uninterrupted in-process run does."""
    folder, config = setup
    procs = []
    try:
        log1 = folder / "restart-server-1.log"
        server = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen",
                         "127.0.0.1:0", "--no-progress", f"output_dir={folder / 'runs' / 'restart'}"], log1,
                        fault="exit:server:3")
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", log1, server, WAIT_S).group(1)
        client_logs = _clients(folder, config, address, "restart", procs)
        assert finish(server, log1, WAIT_S) == 17, log1.read_text()  # the injected abrupt exit
        for log, p in zip(client_logs, procs[1:]):
            wait_for("lost the server", log, p, 60)
        log2 = folder / "restart-server-2.log"
        server2 = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen", address,
                          "--no-progress", f"output_dir={folder / 'runs' / 'restart'}", "resume=true"], log2)
        procs.append(server2)
        assert finish(server2, log2, WAIT_S) == 0, log2.read_text()
        assert "resuming splitlora from" in log2.read_text()
        for log, p in zip(client_logs, procs[1:4]):
            assert finish(p, log, 60) == 0, log.read_text()
            assert "(resuming)" in log.read_text()
    finally:
        kill_all(procs)
    _same_run(folder, "restart")
