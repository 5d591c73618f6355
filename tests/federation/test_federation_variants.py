"""strategy=sl (vanilla split learning: clients one after another, adapters relayed through the
server) and the U-shaped SplitLoRA (labels stay on the clients, which report their loss) as
federations of real processes on loopback (mutual TLS): the same adapters, step losses and byte
counts as the in-process run of the same config (rtol 1e-5 / atol 1e-6 for the
adapters, rel 1e-6 for losses, bytes exactly). The reference run goes on beside the federation's
processes; every wait is bounded and every process is killed in a `finally`."""
import json

import pytest
import torch
from fed_testutil import CLIENTS, WAIT_S, finish, kill_all, start, wait_for, write_config, write_data
from safetensors.torch import load_file

from splitlora.federation.certs import create_certs


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["strategy=sl"], ["train.u_shape=true", "model.server_end=2"]],
                         ids=["sl", "u_shape"])
def test_federation_equals_the_in_process_run(tmp_path, variant):
    write_data(tmp_path)
    config = write_config(tmp_path)
    create_certs(tmp_path / "certs", CLIENTS, log=lambda *_: None)
    local_dir, fed_dir = tmp_path / "runs" / "local", tmp_path / "runs" / "fed"
    procs, logs = [], []
    try:
        local_log = tmp_path / "local.log"
        local = start(["train", "--config", str(config), "--no-progress", *variant, f"output_dir={local_dir}"],
                      local_log)
        procs.append(local)
        server_log = tmp_path / "server.log"
        server = start(["server", "--config", str(config), "--certs", str(tmp_path / "certs"), "--listen",
                        "127.0.0.1:0", "--no-progress", *variant], server_log)
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", server_log, server, WAIT_S).group(1)
        for c, name in enumerate(CLIENTS):
            logs.append(tmp_path / f"client-{name}.log")
            procs.append(start(["client", "--config", str(config), "--server", address, "--name", name, "--certs",
                                str(tmp_path / "certs"), "--data", str(tmp_path / f"client{c}.jsonl"),
                                *variant], logs[-1]))
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for p, log in zip(procs[2:], logs):
            assert finish(p, log, 60) == 0, log.read_text()
        assert finish(local, local_log, WAIT_S) == 0, local_log.read_text()
    finally:
        kill_all(procs)
    a = load_file(str(local_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(fed_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    def steps(run):
        return [(r["step"], r["loss"], r["bytes"]) for r in map(json.loads, (run / "metrics.jsonl").open())
                if r["type"] == "step"]

    got, want = steps(fed_dir), steps(local_dir)
    assert [(s, n) for s, _, n in got] == [(s, n) for s, _, n in want]
    assert [l for _, l, _ in got] == pytest.approx([l for _, l, _ in want], rel=1e-6)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (local_dir, fed_dir))
    assert sb["bytes"] == sa["bytes"] and sb["bytes_total"] > 0
