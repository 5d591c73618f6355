"""transport=dist with real processes on loopback (gloo): one server and two clients.

Each test launches `python -m splitlora train ... transport=dist` three times with the
environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a failing
process is observed as it is, without torchrun's agent tearing the others down.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PROJECT = Path(__file__).resolve().parents[2]
TINY = ["model.config.n_layer=3", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=96",
        "model.config.activation_function=gelu_pytorch_tanh", "data.synthetic_examples=120", "data.num_eval=16",
        "train.clients=2", "train.batch_size=4", "train.steps=6", "train.aggregate_every=2", "train.eval_every=0",
        "eval.generate=false", "model.cut_layer=1", "codec.bits=4", "codec.error_feedback=true",
        "lora.client.dropout=0.1", "network.timeout_s=30"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra, fault=None, timeout=180):
    """Runs the 3 ranks to completion; returns [(returncode, output)] by rank."""
    port = _free_port()
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env.pop("SPLITLORA_INJECT_FAULT", None)
        if fault:
            env["SPLITLORA_INJECT_FAULT"] = fault
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "splitlora", "train", "--no-progress", f"output_dir={out}", "transport=dist",
             *TINY, *extra], cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            output, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((p.returncode, output))
    finally:
        for p in procs:
            if p.poll() is None:  # never leave a process behind, whatever happened
                p.kill()
                p.wait()
    return results


def _local(out: Path, *extra):
    from splitlora.config import load_config
    from splitlora.trainer import train

    return train(load_config(None, [f"output_dir={out}", *TINY, *extra]), progress=False, log=lambda *_: None)


def _adapters(out: Path):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, _local(out)


def test_dist_run_equals_local_run(tmp_path, local_run):
    local_out, local_summary = local_run
    results = _launch(tmp_path / "dist")
    assert [rc for rc, _ in results] == [0, 0, 0], results
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(local_summary["eval_loss"], rel=1e-6)
    # The accounting counts exactly the bytes that crossed the wire, the same as in-process.
    assert summary["bytes_by_kind"] == local_summary["bytes_by_kind"]
    # The clients' activations were measured in their own processes and gathered by the server.
    assert summary["memory_per_side"] == local_summary["memory_per_side"]
    assert summary["memory_per_side"]["client"]["activation_bytes"] > 0
    a, b = _adapters(tmp_path / "dist"), _adapters(local_out)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # Each client kept its own checkpoints.
    assert (tmp_path / "dist" / "clients" / "client1" / "checkpoints" / "latest").is_file()


def test_dist_run_of_a_saved_model_equals_local_run(tmp_path):
    """Clients of a saved model read only their bottom layers (models.load_bottom_layers) and
    train exactly what a process holding the whole model trains."""
    from splitlora.config import load_config
    from splitlora.trainer import build

    built = build(load_config(None, [f"output_dir={tmp_path / 'save'}", *TINY]), log=lambda *_: None)
    built.setup.base_model.save_pretrained(tmp_path / "model")
    built.tokenizer.save(tmp_path / "words.json")
    saved = ["model.config=null", f"model.path={tmp_path / 'model'}", f"data.tokenizer={tmp_path / 'words.json'}"]
    local = _local(tmp_path / "local", *saved)
    results = _launch(tmp_path / "dist", *saved)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(local["eval_loss"], rel=1e-6)
    a, b = _adapters(tmp_path / "dist"), _adapters(tmp_path / "local")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dead_client_stops_the_server_then_resume_finishes(tmp_path, local_run):
    out = tmp_path / "dist"
    start = time.monotonic()
    # client1 (rank 2) dies just before sending its activations of step 4 (rounds end at 2, 4, 6).
    results = _launch(out, fault="exit:client1:4")
    elapsed = time.monotonic() - start
    (server_rc, server_out), _, (dead_rc, _) = results
    assert dead_rc == 17
    assert server_rc == 3, server_out
    assert "client1 (rank 2)" in server_out and "step 4" in server_out and "resume=true" in server_out
    assert elapsed < 120
    # The last completed round (steps 0..3) is checkpointed on every rank.
    for folder in (out / "checkpoints", out / "clients" / "client0" / "checkpoints",
                   out / "clients" / "client1" / "checkpoints"):
        assert (folder / "step_00000004" / "state.json").is_file(), folder

    results = _launch(out, "resume=true")
    assert [rc for rc, _ in results] == [0, 0, 0], results
    local_out, local_summary = local_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(local_summary["eval_loss"], rel=1e-6)
    a, b = _adapters(out), _adapters(local_out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_corrupt_packet_is_an_error_naming_the_sender(tmp_path):
    results = _launch(tmp_path / "dist", fault="corrupt:client0:1")
    server_rc, server_out = results[0]
    assert server_rc == 3, server_out
    assert "activations packet of step 1 from client0 could not be decoded" in server_out
    assert "Traceback" not in server_out
    # Nobody is left hanging: every process ended (with an error) and none trained on garbage.
    assert all(rc != 0 for rc, _ in results[1:]), results
    assert not (tmp_path / "dist" / "summary.json").exists()
