"""The federation programs' checks, in one process: which configs can run as a federation, the
config section, config agreement between parties, joining with backoff, and the CLI's refusals."""
import re
import threading
import time

import pytest
from fed_testutil import write_config, write_data

from splitlora.config import ConfigError, load_config
from splitlora.federation.client import join
from splitlora.federation.grpc_transport import GrpcClientTransport, GrpcServerTransport
from splitlora.federation.server import _gather
from splitlora.federation.settings import check_federation_run, config_fingerprint
from splitlora.transport import TransportError


def _cfg(*overrides):
    return load_config(None, ["data.tokenizer=tok.json", *overrides])


@pytest.mark.parametrize("overrides,match", [
    (["strategy=fedlora"], "strategy=fedlora cannot run as a federation yet; supported: strategy splitlora"),
    (["strategy=sl", "train.u_shape=true", "model.server_end=3"], "strategy=sl with train.u_shape"),
    (["data.tokenizer=null"], "set data.tokenizer"),
    (["federation.min_clients=5"], "federation.min_clients=5 is more than train.clients"),
    (["privacy.clip=1.0", "privacy.epsilon=8.0", "train.clients=3", "federation.min_clients=2"],
     r"privacy.epsilon sets the noise from every client's sample count at the start, but the run would start "
     r"with 2 of 3 clients .*set federation.start_clients to 3, or give privacy.noise_multiplier"),
])
def test_configs_a_federation_cannot_run_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_federation_run(_cfg(*overrides))


def test_privacy_epsilon_runs_as_a_federation_that_starts_with_every_client():
    check_federation_run(_cfg("privacy.clip=1.0", "privacy.epsilon=8.0", "train.clients=3",
                              "federation.min_clients=2", "federation.start_clients=3"))


def test_federation_section_is_validated():
    with pytest.raises(ConfigError) as err:
        _cfg("federation.listen=nowhere", "federation.chunk_bytes=10", "federation.wait_s=0",
             "federation.min_clients=0", "federation.max_packet_bytes=5")
    text = str(err.value)
    for key in ("federation.listen", "federation.chunk_bytes", "federation.wait_s", "federation.min_clients",
                "federation.max_packet_bytes"):
        assert key in text
    assert _cfg("federation.listen='[::1]:0'").federation.listen == "[::1]:0"


def test_fingerprint_ignores_where_a_party_runs_but_not_what_it_trains():
    base = config_fingerprint(_cfg())
    assert config_fingerprint(_cfg("output_dir=elsewhere", "data.eval_path=e.jsonl", "device=auto",
                                   "data.tokenizer=/other/tok.json", "federation.wait_s=5")) == base
    assert config_fingerprint(_cfg("seed=1")) != base
    assert config_fingerprint(_cfg("codec.bits=4")) != base


def test_a_client_with_another_config_is_dropped(tmp_path):
    server = GrpcServerTransport("127.0.0.1:0", insecure=True, timeout_s=10, log=lambda *_: None)
    opened = [server]
    try:
        good = GrpcClientTransport(f"127.0.0.1:{server.port}", "good", insecure=True, hello={"config": "x"})
        bad = GrpcClientTransport(f"127.0.0.1:{server.port}", "bad", insecure=True, hello={"config": "y"})
        opened += [good, bad]
        server.wait_for_clients(2, 10)  # both known before the server looks at their configs
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("names", _gather(server, 1, 10, "x", print)), daemon=True)
        t.start()
        with pytest.raises(TransportError, match="config differs"):
            bad.wait_welcome(10)
        t.join(10)
        assert done["names"] == ["good"]
    finally:
        for x in opened:
            x.close(grace_s=0.2)


def test_join_retries_until_the_server_is_up():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = {}

    def late_server():
        time.sleep(1.5)
        server = GrpcServerTransport(f"127.0.0.1:{port}", insecure=True, timeout_s=10, log=lambda *_: None)
        started["server"] = server
        server.wait_for_clients(1, 20)
        server.assign(["late"])

    t = threading.Thread(target=late_server, daemon=True)
    t.start()
    logs = []
    transport = None
    try:
        transport, welcome = join(lambda: GrpcClientTransport(f"127.0.0.1:{port}", "late", insecure=True), "x", 30,
                                  logs.append, first_delay_s=0.2)
        assert welcome["index"] == 0 and transport.me == "client0"
        assert any("cannot be reached yet" in line for line in logs)
    finally:
        t.join(20)
        if transport is not None:
            transport.close(grace_s=0.2)
        if "server" in started:
            started["server"].close(grace_s=0.2)


def test_join_gives_up_after_wait_s():
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="UNAVAILABLE"):
        join(lambda: GrpcClientTransport("127.0.0.1:9", "x", insecure=True), "x", 1.5, lambda *_: None,
             first_delay_s=0.2)
    assert time.monotonic() - t0 < 10


def test_cli_refusals(tmp_path, capsys):
    from splitlora.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("strategy: fedlora\ndata: {tokenizer: tok.json}\n")
    assert main(["server", "--config", str(config)]) == 2
    assert "give --certs DIR" in capsys.readouterr().err
    assert main(["client", "--config", str(config), "--server", "127.0.0.1:1", "--name", "a", "--insecure",
                 "--certs", "x"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["server", "--config", str(config), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "supported: strategy splitlora" in err


def test_a_client_with_a_missing_data_file_stops_before_connecting(tmp_path, capsys):
    """A typo in --data is one line and exit 2 at once, not a wait for a server (none listens here)."""
    from splitlora.cli import main

    write_data(tmp_path)
    config = write_config(tmp_path)
    started = time.monotonic()
    assert main(["client", "--config", str(config), "--server", "127.0.0.1:1", "--name", "a", "--insecure",
                 "--data", str(tmp_path / "clinet0.jsonl")]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "--data" in err and "clinet0.jsonl: no such file" in err


def test_a_client_whose_data_file_cannot_be_read_stops_before_connecting(tmp_path, capsys):
    """--data naming the wrong file (here the config itself, read as the config's JSON lines):
    the reader's one-line error and exit 2 at once, with no wait for a server (none listens)."""
    from splitlora.cli import main

    write_data(tmp_path)
    config = write_config(tmp_path)
    started = time.monotonic()
    assert main(["client", "--config", str(config), "--server", "127.0.0.1:1", "--name", "a", "--insecure",
                 "--data", str(config)]) == 2
    assert time.monotonic() - started < 30
    out = capsys.readouterr()
    assert "line 1 is not a JSON object" in out.err and "run.yaml" in out.err
    assert "cannot be reached" not in out.out + out.err  # it never tried to connect


def test_an_interrupted_client_is_told_to_rerun_the_same_command(tmp_path, capsys):
    """Ctrl-C in a client: a rerun of the same command rejoins the run (a running server admits it,
    a server restarted with resume=true resumes it); `resume=true` is the one-process advice."""
    from splitlora.federation.client import _run
    from splitlora.trainer import RunInterrupted, _Interrupts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = _cfg(f"output_dir={tmp_path / 'run'}")
    with pytest.raises(RunInterrupted) as stop:
        _run(cfg, "client1", None, None, None, print, interrupted, _Interrupts)
    message = stop.value.message
    assert message.startswith("client1: interrupted (SIGINT) before training started; there is no checkpoint yet in ")
    assert message.endswith(": rerun the same command (a running server admits it at its next round; a server "
                            "restarted with resume=true resumes it)")
    assert stop.value.code == 130 and message in capsys.readouterr().err
    # The default advice, for a one-process run or a server, is unchanged.
    assert _Interrupts(tmp_path).stopped("server").message.endswith(": rerun the same command with resume=true")


def _fake_client(monkeypatch, tmp_path, ended, steps=3, trained=()):
    """run_client with a fake server whose every run ends in a TransportError after `ended` (the
    server's last word), attempt i having finished trained[i] steps first (0 past the list's end;
    None: attempt i finishes the run): (the join calls, the log lines, the error raised or None)."""
    import splitlora.trainer as trainer
    from splitlora.federation import client as client_mod

    class Transport:
        me, server_ended = "client0", None

        def close(self, grace_s=5.0):
            pass

    joins, lines = [], []

    def fake_join(connect, server, wait_s, log, **kwargs):
        joins.append(server)
        return Transport(), {"index": 0, "clients": 2, "join": len(joins) > 1, "resume": False}

    def fake_train(cfg, role, *, transport, interrupts, **kwargs):
        attempt = len(joins) - 1
        done = trained[attempt] if attempt < len(trained) else 0
        if done is None:
            return {}
        interrupts.steps_done = done
        transport.server_ended = ended
        raise TransportError("client0 expected gradients of step 1 from the server, but the connection ended")

    monkeypatch.setattr(client_mod, "join", fake_join)
    monkeypatch.setattr(trainer, "_train", fake_train)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = _cfg(f"train.steps={steps}", f"output_dir={tmp_path / 'run'}")
    try:
        client_mod.run_client(cfg, server="127.0.0.1:1", name="a", insecure=True, data=str(data), log=lines.append)
    except TransportError as err:
        return joins, lines, err
    return joins, lines, None


def test_a_dropped_client_stops_after_five_attempts_in_a_row_that_finish_no_step(tmp_path, monkeypatch):
    joins, lines, err = _fake_client(monkeypatch, tmp_path, {"type": "dropped", "reason": "it waited 8 s"})
    assert len(joins) == 5  # the first connection, then 4 rejoins: 5 attempts without a finished step
    rejoins = [line for line in lines if "was dropped by the server (it waited 8 s); it rejoins the running " in line]
    assert len(rejoins) == 4
    assert "(rejoin 4; 4 attempt(s) in a row without a finished step: it stops at 5)" in rejoins[-1]
    assert str(err) == ("client a gave up: 5 attempts in a row finished no step (the last ended: it waited 8 s); if "
                        "the server keeps dropping it for missing federation.step_timeout_s, raise that (in every "
                        "party's run.yaml), then rerun the same command")


def test_a_dropped_client_that_trains_between_drops_rejoins_as_often_as_needed(tmp_path, monkeypatch):
    """Attempts that finish steps reset the count: 7 drops (more than the limit of 5), each after
    some training, then the 8th attempt finishes the run."""
    joins, lines, err = _fake_client(monkeypatch, tmp_path, {"type": "dropped", "reason": "it waited 8 s"}, steps=40,
                                     trained=[3, 0, 0, 2, 1, 0, 4, None])
    assert err is None and len(joins) == 8
    assert lines[-1] == "federation: client a finished its 40 steps"
    streaks = [re.search(r"; (\d+) attempt\(s\) in a row", line).group(1) for line in lines
               if "it rejoins the running" in line]
    assert streaks == ["0", "1", "2", "0", "0", "1", "0"]


@pytest.mark.parametrize("kind", ["done", "aborted", "refused"])
def test_a_client_whose_server_ended_the_run_does_not_rejoin(tmp_path, monkeypatch, kind):
    joins, lines, err = _fake_client(monkeypatch, tmp_path, {"type": kind, "reason": "the run finished"})
    assert len(joins) == 1 and "connection ended" in str(err)
    assert not any("rejoins" in line or "reconnecting" in line for line in lines)


def test_a_client_joining_a_running_run_replaces_its_own_folder_only(tmp_path):
    from splitlora.federation.client import _replace_own_folder

    out = tmp_path / "run"
    for role in ("client0", "client1"):
        (out / "clients" / role / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "config.yaml").write_text("strategy: splitlora\n")
    cfg = _cfg(f"output_dir={out}")
    lines = []
    _replace_own_folder(cfg, "client1", "b", lines.append)
    assert not (out / "clients" / "client1").exists()
    assert (out / "clients" / "client0" / "checkpoints" / "step_00000002").is_dir() and (out / "config.yaml").is_file()
    assert lines == [f"federation: client b joins the running run afresh as client1: replaced its earlier folder "
                     f"{out / 'clients' / 'client1'} (an earlier attempt's checkpoints; the server's global adapters "
                     f"take their place)"]
    _replace_own_folder(cfg, "client1", "b", lines.append)  # nothing there any more: nothing said
    assert len(lines) == 1


def test_a_client_interrupted_while_waiting_for_the_server_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the client waits for the server (join's backoff): RunInterrupted (exit status
    130, no traceback) whose one line says what happened and what to do."""
    from splitlora.federation import client as client_mod
    from splitlora.trainer import RunInterrupted

    def waiting(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(client_mod, "join", waiting)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(RunInterrupted) as stop:
        client_mod.run_client(_cfg(f"output_dir={tmp_path / 'run'}"), server="127.0.0.1:1", name="a", insecure=True,
                              data=str(data), log=lambda *_: None)
    assert stop.value.code == 130
    assert stop.value.message == ("client a: interrupted (SIGINT) while waiting for the server at 127.0.0.1:1; this "
                                  "attempt trained nothing: rerun the same command (a running server admits it at "
                                  "its next round; a server restarted with resume=true resumes it)")
    assert stop.value.message in capsys.readouterr().err
