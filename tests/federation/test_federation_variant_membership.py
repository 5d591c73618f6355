"""Clients that come and go under the U-shaped SplitLoRA and vanilla SL, and a round whose sampled
clients all drop, with real processes on loopback (mutual TLS).

- A client killed mid-round (U-shape) or mid-step (SL) is dropped; the others train on; the
  same client restarted (a new process, the same certificate) is admitted at the next round's
  start, the server waiting for it because min_clients would not be met otherwise.
- A U-shaped federation with federation.clients_per_round equals the in-process sampled run.
- The server killed mid-run and restarted with resume=true (U-shape, SL): the clients reconnect
  by themselves and the run ends as the uninterrupted in-process run.
- When the one client sampled for a round dies, the round's steps are skipped (no loss, recorded
  with the reason), the global adapters stay, and the next round samples among the others.

Every wait is bounded and every process is killed in a `finally`."""
import json
import math
from pathlib import Path

import pytest
from fed_testutil import (CLIENTS, WAIT_S, assert_same_training, finish, kill_all, run_beside_in_process, start,
                          wait_for, write_config, write_data)

from splitlora.federation.certs import create_certs
from splitlora.federation.membership import sample_clients

U_SHAPE = ["train.u_shape=true", "model.server_end=2"]


def _setup(folder: Path, federation: str, steps: int = 8) -> Path:
    write_data(folder)
    config = write_config(folder, federation=federation)
    config.write_text(config.read_text().replace("steps: 4, aggregate_every: 2", f"steps: {steps}, aggregate_every: 2"))
    create_certs(folder / "certs", CLIENTS, log=lambda *_: None)
    return config


def _server(folder: Path, config: Path, procs: list, variant):
    log = folder / "server.log"
    server = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen", "127.0.0.1:0",
                    "--no-progress", *variant], log)
    procs.append(server)
    return server, log, wait_for(r"listening on (127\.0\.0\.1:\d+)", log, server, WAIT_S).group(1)


def _client(folder: Path, config: Path, address: str, c: int, tag: str, procs: list, variant, fault=None):
    name = CLIENTS[c]
    log = folder / f"{tag}-client-{name}.log"
    procs.append(start(["client", "--config", str(config), "--server", address, "--name", name, "--certs",
                        str(folder / "certs"), "--data", str(folder / f"client{c}.jsonl"),
                        "--output-dir", str(folder / "runs" / f"{tag}-{name}"), *variant], log, fault=fault))
    return procs[-1], log


def _records(run: Path, kind: str) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["type"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [U_SHAPE, ["strategy=sl"]], ids=["u_shape", "sl"])
def test_killed_client_is_dropped_and_admitted_again(tmp_path, variant):
    """min_clients=3 of 3: client b dies at step 3; the step finishes with a and c; the server waits
    at the next round's start (U-shape: step 4; SL, whose rounds are its steps: step 4 too) for b's
    new process, which is admitted with the newest adapters and trains to the end."""
    config = _setup(tmp_path, "{step_timeout_s: 20, wait_s: 90, min_clients: 3}")
    procs = []
    try:
        server, server_log, address = _server(tmp_path, config, procs, variant)
        clients = {c: _client(tmp_path, config, address, c, "first", procs, variant,
                              fault="exit:client1:3" if c == 1 else None) for c in range(3)}
        b, b_log = clients[1]
        assert finish(b, b_log, WAIT_S) == 17, b_log.read_text()  # the injected abrupt exit
        wait_for(r"client b left", server_log, server, WAIT_S)
        b2, b2_log = _client(tmp_path, config, address, 1, "second", procs, variant)
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for p, log in (clients[0], clients[2], (b2, b2_log)):
            assert finish(p, log, 60) == 0, log.read_text()
    finally:
        kill_all(procs)
    run = tmp_path / "runs" / "fed"
    steps = _records(run, "step")
    dropped = [d for r in steps for d in r.get("dropped", [])]
    joined = [d for r in steps for d in r.get("joined", [])]
    assert [(d["name"], d["step"]) for d in dropped] == [("b", 3)]
    assert [(d["name"], d["client"], d["step"]) for d in joined] == [("b", "client1", 4)]
    # Every step trained (a and c went on at step 3) and has a loss.
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps) and len(steps) == 8
    # b's second process received the newest adapters before it trained again, and sent its own up.
    by_step = {r["step"]: r for r in _records(run, "round")}
    last = by_step[7]["bytes"]["client1"]
    assert last["up"]["activations"] > 0 and last["up"]["adapters"] > 0 and last["down"]["adapters"] > 0
    # Step 3 (round 1): b sent nothing at all in its fatal step.
    assert by_step[3]["bytes"]["client1"]["up"]["activations"] > 0  # its step 2 still counts in round 1
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss"]) and (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sampled_u_shape_federation_equals_the_in_process_sampled_run(tmp_path):
    """clients_per_round=2 of 3 with the U-shape: the same sample each round as the in-process run,
    and the same adapters, losses and byte counts."""
    config = _setup(tmp_path, "{step_timeout_s: 60, wait_s: 120, clients_per_round: 2}")
    run_beside_in_process(tmp_path, config, U_SHAPE)
    local, fed = tmp_path / "runs" / "local", tmp_path / "runs" / "fed"
    want = [[f"client{c}" for c in sample_clients(range(3), 2, seed=0, round_index=r)] for r in range(4)]
    assert [r["clients"] for r in _records(fed, "round")] == [r["clients"] for r in _records(local, "round")] == want
    assert_same_training(fed, local)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [U_SHAPE, ["strategy=sl"]], ids=["u_shape", "sl"])
def test_server_killed_mid_run_resumes_with_its_clients(tmp_path, variant):
    """The server dies abruptly at step 5 (after round 1's checkpoint); restarted with resume=true
    on the same address, it takes back its clients, which reconnect by themselves, and the run
    ends as the uninterrupted in-process run does (adapters, losses, bytes)."""
    config = _setup(tmp_path, "{step_timeout_s: 60, wait_s: 120}")
    procs = []
    try:
        local_log = tmp_path / "local.log"
        procs.append(start(["train", "--config", str(config), "--no-progress", *variant,
                            f"output_dir={tmp_path / 'runs' / 'local'}"], local_log))
        log1 = tmp_path / "server-1.log"
        server = start(["server", "--config", str(config), "--certs", str(tmp_path / "certs"), "--listen",
                        "127.0.0.1:0", "--no-progress", *variant], log1, fault="exit:server:5")
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", log1, server, WAIT_S).group(1)
        clients = [_client(tmp_path, config, address, c, "fed", procs, variant) for c in range(3)]
        assert finish(server, log1, WAIT_S) == 17, log1.read_text()  # the injected abrupt exit
        for p, log in clients:
            wait_for("lost the server", log, p, 60)
        log2 = tmp_path / "server-2.log"
        server2 = start(["server", "--config", str(config), "--certs", str(tmp_path / "certs"), "--listen", address,
                         "--no-progress", *variant, "resume=true"], log2)
        procs.append(server2)
        assert finish(server2, log2, WAIT_S) == 0, log2.read_text()
        assert "resuming" in log2.read_text()
        for p, log in clients:
            assert finish(p, log, 60) == 0, log.read_text()
            assert "(resuming)" in log.read_text()
        assert finish(procs[0], local_log, WAIT_S) == 0, local_log.read_text()
    finally:
        kill_all(procs)
    assert_same_training(tmp_path / "runs" / "fed", tmp_path / "runs" / "local")


@pytest.mark.slow
def test_a_round_whose_sampled_clients_all_drop_is_skipped(tmp_path):
    """clients_per_round=1: the one client sampled for round 1 dies at the round's first step.
    Both steps of the round are skipped (recorded, no loss), the round's average is not taken,
    and round 2 samples among the two clients left; the run finishes."""
    config = _setup(tmp_path, "{step_timeout_s: 20, wait_s: 60, min_clients: 1, start_clients: 3, clients_per_round: 1}")
    (victim,) = sample_clients(range(3), 1, seed=0, round_index=1)
    procs = []
    try:
        server, server_log, address = _server(tmp_path, config, procs, [])
        clients = [_client(tmp_path, config, address, c, "fed", procs, [],
                           fault=f"exit:client{victim}:2" if c == victim else None) for c in range(3)]
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for c, (p, log) in enumerate(clients):
            # The victim died; a client sampled in no round after it may still be dropped at the end.
            assert finish(p, log, 60) == (17 if c == victim else 0), log.read_text()
    finally:
        kill_all(procs)
    assert "step 2 skipped: every client of the step dropped out at step 2" in server_log.read_text()
    run = tmp_path / "runs" / "fed"
    steps = {r["step"]: r for r in _records(run, "step")}
    for s in (2, 3):
        assert steps[s]["loss"] is None and "every client of the step dropped out" in steps[s]["skipped"], steps[s]
    assert [d["client"] for d in steps[2]["dropped"]] == [f"client{victim}"]
    assert all(steps[s]["loss"] is not None and math.isfinite(steps[s]["loss"]) for s in (0, 1, 4, 5, 6, 7))
    rounds = _records(run, "round")
    assert rounds[1]["clients"] == [f"client{victim}"]
    assert rounds[1]["bytes"][f"client{victim}"]["up"]["adapters"] == 0  # no average in round 1
    left = [c for c in range(3) if c != victim]
    for r in (2, 3):
        (sampled,) = sample_clients(left, 1, seed=0, round_index=r)
        assert rounds[r]["clients"] == [f"client{sampled}"]
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["eval_loss"])


@pytest.mark.slow
def test_u_shape_client_that_dies_before_sending_its_tail_gradient_is_dropped(tmp_path):
    """U-shape, min_clients=2 of 3: client b dies at step 3 after the server sent it the
    activations at server_end, before it sends its gradient back. The server drops it while
    waiting for that gradient, backpropagates the other two clients' gradients only (b's rows get
    none), sends them theirs, and the run goes on and finishes with a and c."""
    config = _setup(tmp_path, "{step_timeout_s: 20, wait_s: 60, min_clients: 2, start_clients: 3}")
    procs = []
    try:
        server, server_log, address = _server(tmp_path, config, procs, U_SHAPE)
        clients = [_client(tmp_path, config, address, c, "fed", procs, U_SHAPE,
                           fault="exit:client1:3:gradients" if c == 1 else None) for c in range(3)]
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for c, (p, log) in enumerate(clients):
            assert finish(p, log, 60) == (17 if c == 1 else 0), log.read_text()
    finally:
        kill_all(procs)
    run = tmp_path / "runs" / "fed"
    steps = {r["step"]: r for r in _records(run, "step")}
    (drop,) = [d for r in steps.values() for d in r.get("dropped", [])]
    assert (drop["name"], drop["step"]) == ("b", 3)
    assert "gradients of step 3" in drop["reason"], drop  # dropped in the tail phase, not before
    # Every step has a loss: step 3's is a's and c's (b never reported its own).
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps.values()) and len(steps) == 8
    rounds = _records(run, "round")
    for r in rounds[2:]:  # b is gone from the later rounds; a and c train on
        assert r["bytes"]["client1"]["up"]["activations"] == 0
        assert r["bytes"]["client0"]["up"]["gradients"] > 0 and r["bytes"]["client2"]["up"]["gradients"] > 0
    # Round 1: b sent its tail gradient of step 2 only, and got the cut gradient of step 2 only.
    b1 = rounds[1]["bytes"]["client1"]
    assert b1["up"]["gradients"] > 0 and b1["down"]["gradients"] > 0 and b1["down"]["activations"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss"]) and (run / "adapter" / "adapter_model.safetensors").is_file()
