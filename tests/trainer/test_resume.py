"""Resume that loses nothing and takes nothing wrong: checkpoints that verify (a damaged newest one
is skipped, said, and the run still ends where an uninterrupted one does), a changed config
refused key by key, and SIGINT/SIGTERM that stop a run cleanly with one line saying where to
resume from. Each test damages, interrupts or misconfigures a run on purpose."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from splitlora.checkpoint import (CheckpointError, find_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint, verify_checkpoint)
from splitlora.config import ConfigError, dump_config, load_config
from splitlora.trainer import _Interrupts, _may_change_on_resume, config_changes, train
from trainer_testutil import tiny_config

PROJECT = Path(__file__).resolve().parents[2]
# Dropout, stochastic rounding and error feedback: a resume must restore every stream and residual.
EXTRA = ["codec.bits=4", "codec.error_feedback=true", "codec.stochastic=true", "lora.client.dropout=0.1",
         "train.aggregate_every=2"]
QUIET = dict(progress=False, log=lambda *_: None)


def _step_records(run: Path):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 6-step run: what every resumed run must end as."""
    base = tmp_path_factory.mktemp("full")
    summary = train(tiny_config(base, *EXTRA, "train.steps=6", name="run"), **QUIET)
    run = base / "run"
    return summary, load_file(str(run / "adapter" / "adapter_model.safetensors")), _step_records(run)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The same run stopped after 4 steps: checkpoints of steps 2 and 4 (rounds of 2 steps, keep=2)."""
    base = tmp_path_factory.mktemp("stopped")
    train(tiny_config(base, *EXTRA, "train.steps=4", name="run"), **QUIET)
    assert [s for s, _ in list_checkpoints(base / "run" / "checkpoints")] == [4, 2]
    return base / "run"


def _copy(stopped: Path, tmp_path: Path) -> Path:
    """A private copy of the stopped run, its config.yaml naming the copy (output_dir may change)."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    cfg = load_config(run / "config.yaml")
    cfg.output_dir = str(run)
    dump_config(cfg, run / "config.yaml")
    return run


def _resume(run: Path, *overrides):
    lines = []
    summary = train(tiny_config(run.parent, *EXTRA, "train.steps=6", "resume=true", *overrides, name=run.name),
                    progress=False, log=lines.append)
    return summary, lines


def _assert_same_as_full(run: Path, summary: dict, full):
    full_summary, full_adapters, full_steps = full
    assert summary["eval_loss"] == pytest.approx(full_summary["eval_loss"], rel=1e-6)
    assert summary["bytes_total"] == full_summary["bytes_total"]
    adapters = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert set(adapters) == set(full_adapters)
    for key in adapters:
        torch.testing.assert_close(adapters[key], full_adapters[key], rtol=0, atol=0, msg=key)
    steps = _step_records(run)
    assert [r["step"] for r in steps] == list(range(6))
    assert [r["loss"] for r in steps] == [r["loss"] for r in full_steps]  # exactly, redone steps included


def _flip_a_tensor_byte(path: Path):
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, data
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _damage(ckpt: Path, how: str):
    tensors = ckpt / "tensors.safetensors"
    if how == "no_state":
        (ckpt / "state.json").unlink()
    elif how == "truncated":
        with open(tensors, "r+b") as f:
            f.truncate(tensors.stat().st_size // 2)
    elif how == "flipped":
        _flip_a_tensor_byte(tensors)
        with safe_open(str(tensors), framework="pt") as f:  # still a well-formed file: only the checksum tells
            assert len(list(f.keys())) > 0
    else:
        raise AssertionError(how)


def test_garbage_latest_pointer_is_ignored(stopped, full, tmp_path):
    run = _copy(stopped, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(b"\x00../../nowhere\xff")
    summary, lines = _resume(run)
    assert any("latest" in line and "ignored" in line for line in lines), lines
    assert f"resuming splitlora from {run / 'checkpoints' / 'step_00000004'} (step 4 of 6)" in lines
    assert not [line for line in lines if "skipped" in line]
    _assert_same_as_full(run, summary, full)


@pytest.mark.parametrize("how, reason", [
    ("no_state", "state.json is missing"),
    ("truncated", "tensors.safetensors is .* bytes, .* were written"),
    ("flipped", "tensors.safetensors does not match its checksum"),
])
def test_damaged_newest_checkpoint_is_skipped_for_the_older_one(stopped, full, tmp_path, how, reason):
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    _damage(newest, how)
    summary, lines = _resume(run)
    skipped = [line for line in lines if "skipped" in line]
    assert len(skipped) == 1 and str(newest) in skipped[0] and re.search(reason, skipped[0]), lines
    assert f"resuming splitlora from {run / 'checkpoints' / 'step_00000002'} (step 2 of 6)" in lines
    _assert_same_as_full(run, summary, full)
    # The damaged checkpoint was replaced by the resumed run's own: every checkpoint left verifies.
    left = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in left] == [6, 4]
    assert all(verify_checkpoint(path) for _, path in left)


def test_all_checkpoints_damaged_is_an_error_naming_the_folder(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    _damage(run / "checkpoints" / "step_00000004", "flipped")
    _damage(run / "checkpoints" / "step_00000002", "no_state")
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}
    with pytest.raises(CheckpointError) as err:
        _resume(run)
    message = str(err.value)
    assert f"no usable checkpoint in {run / 'checkpoints'}" in message
    assert "step_00000004: tensors.safetensors does not match its checksum" in message
    assert "step_00000002: state.json is missing" in message
    # Refused before anything was written: the run folder is as it was.
    assert {p: p.read_bytes() for p in before} == before
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 2]


def test_checkpoint_without_manifest_still_loads_and_says_so(stopped, full, tmp_path):
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    (newest / "manifest.json").unlink()  # as written by the version before manifests
    assert verify_checkpoint(newest) is False
    summary, lines = _resume(run)
    assert any(str(newest) in line and "could not be verified by checksum" in line for line in lines), lines
    assert f"resuming splitlora from {newest} (step 4 of 6)" in lines
    _assert_same_as_full(run, summary, full)


def test_checkpoint_without_manifest_is_rejected_when_unreadable(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.arange(1000.0)})
    save_checkpoint(tmp_path, 2, {"x": torch.arange(1000.0)})
    newest = tmp_path / "step_00000002"
    (newest / "manifest.json").unlink()
    tensors = newest / "tensors.safetensors"
    with open(tensors, "r+b") as f:
        f.truncate(tensors.stat().st_size - 100)
    lines = []
    assert find_checkpoint(tmp_path, log=lines.append) == tmp_path / "step_00000001"
    assert len(lines) == 1 and "tensors.safetensors does not load" in lines[0]
    with pytest.raises(CheckpointError, match="unreadable"):  # not a raw safetensors traceback
        load_checkpoint(newest)


def test_pruning_keeps_complete_checkpoints_and_drops_superseded_ones(tmp_path):
    state = {"x": torch.ones(3)}
    for step in (1, 2, 4):
        save_checkpoint(tmp_path, step, state)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 2]
    # A run that continued from step 2 (step 4 rejected) writes step 3: step 4 belongs to the
    # abandoned continuation and goes; step 2 stays as the one earlier checkpoint.
    save_checkpoint(tmp_path, 3, state)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]
    # An incomplete earlier checkpoint does not count as the one kept: the complete one before it stays.
    for name in ("manifest.json", "state.json"):
        (tmp_path / "step_00000003" / name).unlink()
    stray = tmp_path / ".step_00000009.abc"  # a killed write's temporary folder: never read
    stray.mkdir()
    (stray / "state.json").write_text("{}")
    assert find_checkpoint(tmp_path, log=lambda *_: None) == tmp_path / "step_00000002"
    save_checkpoint(tmp_path, 5, state)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 2]
    assert not stray.exists()
    assert (tmp_path / "latest").read_text() == "step_00000005"
    assert all(verify_checkpoint(p) for _, p in list_checkpoints(tmp_path))


def test_no_checkpoint_at_all_finds_none(tmp_path):
    lines = []
    assert find_checkpoint(tmp_path / "checkpoints", log=lines.append) is None
    assert lines == []


def test_config_that_changes_the_result_is_refused_listing_the_keys(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}
    with pytest.raises(ConfigError) as err:
        _resume(run, "train.lr=0.02", "codec.bits=8", "seed=1", "eval.max_sources=3")
    assert {line.split(":")[0] for line in err.value.errors} == {"train.lr", "codec.bits", "seed"}
    message = str(err.value)
    for shown in ("train.lr: 0.01 -> 0.02", "codec.bits: 4 -> 8", "seed: 0 -> 1"):
        assert shown in message
    assert "eval.max_sources" not in message and "train.steps" not in message
    assert {p: p.read_bytes() for p in before} == before  # config.yaml not replaced
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 2]


def test_more_steps_and_report_settings_are_accepted_and_printed(stopped, full, tmp_path):
    run = _copy(stopped, tmp_path)
    summary, lines = _resume(run, "eval.max_sources=3")
    assert [line for line in lines if line.startswith("resume: changed")] == [
        "resume: changed train.steps 4 -> 6, eval.max_sources 2 -> 3"]
    _assert_same_as_full(run, summary, full)
    saved = load_config(run / "config.yaml")  # the run's config is now the one it continued with
    assert saved.train.steps == 6 and saved.eval.max_sources == 3


def test_fewer_steps_than_the_checkpoint_is_refused(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    with pytest.raises(ConfigError) as err:
        _resume(run, "train.steps=3")
    assert [line.split(":")[0] for line in err.value.errors] == ["train.steps"]
    assert "fewer than the 4 steps" in str(err.value)


def test_which_keys_may_change_on_resume():
    splitlora = load_config(None, ["strategy=splitlora"])
    hsplit = load_config(None, ["strategy=hsplitlora"])
    for key in ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "eval.num_beams",
                "output_dir", "device", "network.bandwidth_mbps", "network.timeout_s", "hsplitlora.max_rank"):
        assert _may_change_on_resume(key, splitlora), key
    for key in ("train.lr", "train.batch_size", "train.clients", "train.warmup_steps", "train.lr_schedule",
                "codec.bits", "lora.client.r", "model.cut_layer", "model.config.n_layer", "data.source", "seed",
                "strategy", "transport"):
        assert not _may_change_on_resume(key, splitlora), key
    # hsplitlora sizes each client's cut and ranks from the client-side network.
    assert not _may_change_on_resume("network.bandwidth_mbps", hsplit)
    assert not _may_change_on_resume("hsplitlora.max_rank", hsplit)
    assert _may_change_on_resume("network.timeout_s", hsplit)
    changes = config_changes(splitlora, load_config(None, ["strategy=splitlora", "model.config.n_embd=32"]))
    assert changes == [("model.config.n_embd", 64, 32)]


def test_a_signal_waits_for_the_checkpoint_being_written(tmp_path):
    old = signal.getsignal(signal.SIGTERM)
    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt):
        with _Interrupts(tmp_path) as guard:
            with guard.atomic():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now: it only noted the signal
                reached_end_of_block = True
    assert reached_end_of_block and guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is old  # the previous handler is back
    stop = guard.stopped(None)
    assert stop.code == 143 and "no checkpoint yet" in stop.message


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_finishes(tmp_path, sig, code):
    out = tmp_path / "run"
    config = dump_config(tiny_config(tmp_path, *EXTRA, "train.steps=100000", name="run"), tmp_path / "cfg.yaml")
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(stdout, "w") as so, open(stderr, "w") as se:
        # SIGINT back to its default in the child: a shell's background job inherits it ignored.
        proc = subprocess.Popen([sys.executable, "-m", "splitlora", "train", "--no-progress", "--config", str(config)],
                                cwd=PROJECT, env=env, stdout=so, stderr=se,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 180
            while not (out / "checkpoints" / "step_00000002").is_dir():
                assert proc.poll() is None, (stdout.read_text(), stderr.read_text())
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.05)
            proc.send_signal(sig)
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr.read_text()
    assert returncode == code, (stdout.read_text(), err)
    assert "Traceback" not in err and "Traceback" not in stdout.read_text()
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1, err
    name = signal.Signals(sig).name
    match = re.fullmatch(rf"interrupted \({name}\) at step (\d+); the last checkpoint is step (\d+) in (.+): "
                         r"rerun the same command with resume=true", said[0])
    assert match, said[0]
    at, last = int(match.group(1)), int(match.group(2))
    assert match.group(3) == str(out / "checkpoints")
    assert last >= 2 and last % 2 == 0 and 0 <= at - last <= 1  # a checkpoint every round of 2 steps
    # Nothing half-written: the newest checkpoint is the one named and verifies; every metrics line is whole.
    left = list_checkpoints(out / "checkpoints")
    assert left[0][0] == last and all(verify_checkpoint(p) for _, p in left)
    steps = [r["step"] for r in _step_records(out)]
    assert steps == list(range(len(steps))) and len(steps) >= last

    # Resume (fewer steps than first asked, more than done) ends where an uninterrupted run does.
    lines = []
    resumed = train(tiny_config(tmp_path, *EXTRA, f"train.steps={last + 2}", "resume=true", name="run"),
                    progress=False, log=lines.append)
    assert f"resuming splitlora from {out / 'checkpoints' / f'step_{last:08d}'} (step {last} of {last + 2})" in lines
    assert f"resume: changed train.steps 100000 -> {last + 2}" in lines
    assert [r["step"] for r in _step_records(out)] == list(range(last + 2))
    uninterrupted = train(tiny_config(tmp_path, *EXTRA, f"train.steps={last + 2}", name="straight"), **QUIET)
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=1e-6)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
