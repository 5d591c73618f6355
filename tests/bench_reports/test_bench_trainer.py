"""bench.bench_trainer on a CPU at the Llama code path's tiny size: the fused and PEFT servers compute
the same loss (the script refuses to time them otherwise), every (layers, N, mode) row is written,
and the throughput columns agree with the counted flops and tokens."""
import csv

import pytest

pytest.importorskip("peft")

from bench import bench_trainer  # noqa: E402
from splitlora.timemodel import forward_flops, train_flops  # noqa: E402


def test_llama_shape_rows_and_flops(tmp_path, capsys):
    bench_trainer.main(["--device", "cpu", "--model", "llama-tiny", "--clients", "1,2", "--repeats", "1",
                        "--out", str(tmp_path)])
    assert "fused and PEFT servers agree" in capsys.readouterr().out
    with open(tmp_path / "trainer_cpu_llama-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["layers"], int(r["clients"]), r["mode"]) for r in rows}
    assert keys == {(k, n, m) for k in ("fused", "peft") for n in (1, 2) for m in ("batched", "per-client")}

    spec = bench_trainer.MODELS["llama-tiny"]
    n_layer, hidden, _ = bench_trainer.model_dims(spec)
    server = bench_trainer.build_server(spec, "cpu", bench_trainer.torch.float32)
    for r in rows:
        n = int(r["clients"])
        assert int(r["tokens"]) == n * spec["batch"] * spec["seq_len"]
        flops = train_flops(forward_flops(server, n * spec["batch"], spec["seq_len"], n_layer - spec["cut"], hidden))
        seconds = float(r["ms"]) / 1e3
        assert float(r["tflops"]) == pytest.approx(flops / seconds / 1e12, rel=1e-9)
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["tokens"]) / seconds, rel=1e-9)
        assert r["mfu"] == ""  # no GPU peak on a CPU
    assert "llama-tiny shape" in (tmp_path / "trainer_cpu_llama-tiny.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--layers", "fused,lora"], "--layers takes fused, peft or both"),
    (["--clients", "0,4"], "--clients takes positive integers"),
    (["--clients", "four"], "--clients takes positive integers"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_trainer.main(["--device", "cpu", "--model", "llama-tiny", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
