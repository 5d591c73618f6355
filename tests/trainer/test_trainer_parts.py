"""Units of the trainer: FedAvg, checkpoints, transport and ledger, wire packets, time model."""
import pytest
import torch
from torch import nn

from splitlora.aggregate import fedavg
from splitlora.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from splitlora.timemodel import SimTime, TimeModel, as_sim_time, forward_flops, matmul_params, train_flops
from splitlora.transport import LocalTransport, TransportError
from splitlora.wire import CodecSettings, TensorStream, pack_tensors, unpack_tensors


def test_fedavg_weighted_mean_and_errors():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([4.0], dtype=torch.bfloat16)}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["h"].dtype == torch.bfloat16 and float(out["h"]) == 3.0
    with pytest.raises(ValueError, match="keys"):
        fedavg([a, {"w": a["w"]}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([a, {"w": torch.zeros(3), "h": b["h"]}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        fedavg([a, b], [0, 0])


def test_checkpoint_round_trip_and_latest(tmp_path):
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    state = {"opt": opt_state, "gen": torch.Generator().manual_seed(5).get_state(), "t": (1, "x", None, True),
             "nested": [{"a": torch.arange(3)}]}
    save_checkpoint(tmp_path, 10, state)
    save_checkpoint(tmp_path, 20, state)
    save_checkpoint(tmp_path, 30, state, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020", "step_00000030"]
    step, loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert step == 30
    assert list(loaded["opt"]["state"]) == [0]  # int keys survive
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg"], torch.ones(2))
    assert loaded["t"] == (1, "x", None, True)
    assert torch.equal(loaded["nested"][0]["a"], torch.arange(3))
    assert torch.equal(loaded["gen"], state["gen"])
    # A torch optimizer takes the restored state back.
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    opt.load_state_dict(loaded["opt"])


def test_checkpoint_failure_leaves_previous_intact(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)})
    with pytest.raises(TypeError, match="cannot checkpoint"):
        save_checkpoint(tmp_path, 2, {"x": object()})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step")]


def test_local_transport_order_kind_and_ledger():
    t = LocalTransport(timeout_s=1)
    t.set_round(2)
    t.send("client0", "server", "activations", 5, torch.zeros(10, dtype=torch.uint8))
    t.send("server", "client1", "gradients", 5, torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(TransportError, match="expected gradients of step 5 from client0"):
        t.recv("server", "client0", "gradients", 5)
    with pytest.raises(TransportError, match="sent nothing"):
        t.recv("server", "client3", "activations", 5)
    assert t.recv("client1", "server", "gradients", 5).numel() == 7
    ledger = t.ledger
    assert ledger.total(client="client0", direction="up", kind="activations") == 10
    assert ledger.round_total(2, client="client1", direction="down") == 7 and ledger.round_total(1) == 0
    with pytest.raises(TypeError, match="uint8"):
        t.send("client0", "server", "activations", 5, torch.zeros(3))
    with pytest.raises(ValueError, match="kind"):
        t.send("client0", "server", "weights", 5, torch.zeros(3, dtype=torch.uint8))


def test_wire_packets_round_trip_and_reject_garbage():
    tensors = {"labels": torch.tensor([[1, -100]]), "mask": torch.ones(1, 2, dtype=torch.long)}
    back = unpack_tensors(pack_tensors(tensors))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_tensors(torch.randint(0, 255, (64,), dtype=torch.uint8))
    x = torch.randn(2, 3, 64)
    raw = TensorStream(CodecSettings(bits=32))
    assert torch.equal(raw.decode(raw.encode(x)), x)  # 32 bits: exact
    q = TensorStream(CodecSettings(bits=8))
    assert (q.decode(q.encode(x)) - x).abs().max() <= x.abs().max() / 127


def test_time_model_and_flops():
    tm = TimeModel(client_tflops=2.0, server_tflops=10.0, bandwidth_mbps=8.0, latency_ms=5.0)
    assert tm.transfer(0) == 0.0
    assert tm.transfer(1_000_000) == pytest.approx(0.005 + 1.0)  # 8 Mbit over 8 Mbit/s + latency
    assert tm.client_compute(4e12) == pytest.approx(2.0) and tm.server_compute(4e12) == pytest.approx(0.4)
    layer = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.Linear(8, 4, bias=False))
    assert matmul_params(layer) == 4 * 8 + 8 * 4  # embeddings and biases excluded
    f = forward_flops(layer, batch=2, seq_len=3, num_layers=1, hidden_size=4)
    assert f == 2 * 6 * 64 + 4 * 6 * 3 * 4
    assert train_flops(f) == 2 * f and train_flops(f, full_finetune=True) == 3 * f


def test_sim_time_keeps_and_reprices_link_parts():
    tm = TimeModel(client_tflops=2.0, server_tflops=10.0, bandwidth_mbps=8.0, latency_ms=5.0)
    small, big = tm.transfer(1_000_000), tm.transfer(3_000_000)
    compute = tm.client_compute(4e12)  # 2 s, a plain float
    # Phases in a row add up; parallel parties: max keeps the slowest one's parts.
    step = compute + max(small, big) + sum(tm.transfer(b) for b in (500_000, 500_000))
    assert isinstance(step, SimTime)
    assert float(step) == pytest.approx(2.0 + (0.005 + 3.0) + 2 * (0.005 + 0.5))
    assert step.messages == 3 and step.bits == 8 * 4_000_000
    assert step.compute_seconds == pytest.approx(2.0)
    # Re-priced at the configured link it is itself; at 80 Mbit/s and no latency the bits cost 10x less.
    assert step.at(8.0, 5.0) == pytest.approx(float(step))
    assert step.at(80.0, 0.0) == pytest.approx(2.0 + 32e6 / 80e6)
    # A float that is not a SimTime is compute only; other arithmetic drops the parts.
    assert as_sim_time(1.5).at(1.0, 1000.0) == 1.5
    assert type(step * 2) is float
    import pickle
    again = pickle.loads(pickle.dumps(step))
    assert (float(again), again.messages, again.bits, again.link_seconds) == \
        (float(step), step.messages, step.bits, step.link_seconds)
