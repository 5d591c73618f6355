"""bench.federation_overhead without running anything: per-step times from metrics records, the
loss check that must fail loudly, the report from fixed numbers, and the TCP relay's byte counts."""
import socket

import pytest

from bench import federation_overhead as fo


def _run(mode, steps, loss_shift=0.0, ledger=1000, framed=None, **extra):
    walls = [0.5] + [s for s in steps]  # the first step is the warm-up
    run = {"mode": mode, "process_s": 10.0, "wall_time_s": sum(walls), "step_wall_s": walls,
           "step_losses": [4.0 - 0.1 * i + loss_shift for i in range(len(walls))], "eval_loss": 3.5 + loss_shift,
           "bytes_total": ledger, "bytes_by_kind": {}, "ledger_sent_bytes": ledger}
    if framed is not None:
        run["framed_bytes"] = framed
    run.update(extra)
    return run


def _runs():
    fed = dict(grpc_packet_messages=10, grpc_packet_bytes=1320, grpc_control_messages=3, grpc_control_bytes=180)
    return {"local": [_run("local", [0.1, 0.1]), _run("local", [0.1, 0.3])],
            "dist": [_run("dist", [0.2, 0.2], framed=1320), _run("dist", [0.2, 0.2], framed=1320)],
            "federation": [_run("federation", [0.3, 0.3], framed=1500, **fed),
                           _run("federation", [0.4, 0.4], framed=1500, **fed)]}


def test_step_times_are_the_differences_of_the_cumulative_wall_time():
    records = [{"type": "step", "wall_time_s": 1.0}, {"type": "eval", "wall_time_s": 1.0},
               {"type": "step", "wall_time_s": 1.5}, {"type": "round"}, {"type": "step", "wall_time_s": 2.25}]
    assert fo.step_times(records) == pytest.approx([1.0, 0.5, 0.75])


def test_different_losses_fail_loudly():
    runs = _runs()
    assert fo.check_losses(runs, 1e-5) == 0.0
    runs["dist"][1] = _run("dist", [0.2, 0.2], loss_shift=1e-3)
    with pytest.raises(SystemExit, match="did not train the same.*dist"):
        fo.check_losses(runs, 1e-5)


def test_report_from_fixed_numbers():
    relay = _run("federation", [0.3, 0.3], framed=1500, tcp_up=900, tcp_down=700, tcp_connections=3)
    summary = fo.summarize(_runs(), warmup=1, tolerance=1e-5, relay=relay)
    # Per-step: each run's mean after the warm-up step, then the median over the repeats.
    assert summary["stats"]["local"]["per_repeat_mean_step_s"] == pytest.approx([0.1, 0.2])
    assert summary["stats"]["local"]["mean_step_s"] == pytest.approx(0.15)
    # Ratios: per repeat, then their median.
    assert summary["ratios_per_repeat"][0]["federation/dist"] == pytest.approx(1.5)
    assert summary["ratios"]["federation/local"] == pytest.approx((3.0 + 2.0) / 2)
    args = {"clients": 3, "steps": 3, "repeats": 2, "warmup": 1}
    report = fo.format_report({"args": args, "summary": summary})
    assert "| federation | 4 (gRPC + mTLS) | 0.3500 | 0.3500 | 0.3000, 0.4000 | 2.33 |" in report
    assert "1,500 (+50.00%)" in report and "1,320 (+32.00%)" in report
    assert "1,600 bytes on the sockets (900 up, 700 down), +60.00% over its ledger" in report


def test_relay_counts_both_directions():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)
    relay = fo.Relay(server.getsockname())
    try:
        client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        conn, _ = server.accept()
        conn.settimeout(10)
        client.sendall(b"x" * 5000)
        got = b""
        while len(got) < 5000:
            got += conn.recv(65536)
        conn.sendall(b"y" * 123)
        back = b""
        while len(back) < 123:
            back += client.recv(65536)
        client.close()
        conn.close()
        assert (relay.up, relay.down, relay.connections) == (5000, 123, 1)
    finally:
        relay.close()
        server.close()
