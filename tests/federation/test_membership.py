"""splitlora.federation.membership: drops, the floor of min_clients, renormalised weights."""
import pytest

from splitlora.aggregate import fedavg
from splitlora.federation.membership import Membership
from splitlora.transport import TransportError


def test_drop_and_min_clients():
    dropped = []
    m = Membership(4, min_clients=2, names=["a", "b", "c", "d"], on_drop=lambda c, r: dropped.append((c, r)))
    assert m.training() == [0, 1, 2, 3]
    m.drop(1, 3, "disconnected")
    m.drop(1, 4, "again")  # already out: nothing more happens
    assert m.training() == [0, 2, 3] and dropped == [(1, "disconnected")]
    assert m.events() == [{"client": "client1", "name": "b", "step": 3, "reason": "disconnected"}]
    assert m.events() == []
    m.drop(3, 5, "timeout")
    with pytest.raises(TransportError, match="only 1 client.*min_clients=2"):
        m.drop(0, 6, "corrupt")


def test_fedavg_over_the_clients_that_finished_is_renormalised():
    import torch

    m = Membership(3, min_clients=1)
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}]
    m.drop(1, 0, "gone")
    finished = m.training()
    avg = fedavg([states[c] for c in finished], m.weights([10, 20, 30], finished))
    assert avg["w"].item() == pytest.approx((10 * 1 + 30 * 4) / 40)


def test_bad_min_clients():
    with pytest.raises(ValueError, match="min_clients"):
        Membership(2, min_clients=3)


def test_round_start_admits_joiners_and_waits_for_min_clients_at_most_wait_s(tmp_path):
    """SplitLoRA's round start in a federation server: clients handed over by `admit` join with
    their sample count as FedAvg weight (and are sent the global adapters when sampled); with
    fewer than min_clients in the run it waits wait_s, then fails saying so."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    from trainer_testutil import tiny_config

    from splitlora.strategies import make_strategy
    from splitlora.trainer import build

    built = build(tiny_config(tmp_path, "train.clients=3"), log=lambda *_: None)
    strategy = make_strategy(built.setup)
    calls = []
    m2 = Membership(3, min_clients=3, active=[0, 2], wait_s=5.0)

    def admit(step):
        calls.append(step)
        if len(calls) >= 4:
            m2.rejoin(1, "b", step)
            return {1: 42}
        return {}

    m2.admit = admit
    strategy._admit(6, m2)
    assert built.setup.client_weights[1] == 42.0 and 1 not in strategy._fresh and m2.training() == [0, 1, 2]
    assert m2.joins() == [{"client": "client1", "name": "b", "step": 6}]
    m3 = Membership(3, min_clients=3, active=[0], wait_s=0.5, names=["a", "b", "c"])
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"only 1 client\(s\) remain \(a\) at step 8.*wait_s=0.5 s.*min_clients=3"):
        strategy._admit(8, m3)
    assert 0.4 < time.monotonic() - t0 < 5


def test_drop_below_min_clients_waits_instead_of_failing_when_clients_may_return():
    m = Membership(2, min_clients=2, wait_s=10)
    m.drop(0, 1, "gone")  # no error: the next round's start waits for it to come back
    assert m.training() == [1]


def test_u_shape_server_step_without_a_client_that_failed_in_its_tail_equals_the_step_without_it(tmp_path):
    """A U-shaped federation server whose client fails between receiving the activations at
    server_end and sending its gradient (splitfed._u_server_finish): its rows get no gradient and
    the server's update is over the clients that finished. That is the step the other two clients
    alone would have made: the same server adapters and the same cut gradients for them (fp32 at
    the cut, no dropout; the clients' rows are batched with different padding: rtol 1e-5)."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    from trainer_testutil import tiny_config

    from splitlora.adapters import adapter_state
    from splitlora.strategies import make_strategy
    from splitlora.trainer import build

    overrides = ["train.clients=3", "train.u_shape=true", "model.server_end=2", "codec.bits=32",
                 "lora.client.dropout=0.0", "lora.server.dropout=0.0"]

    def server_step(folder, group, failing=None):
        built = build(tiny_config(tmp_path / folder, *overrides), log=lambda *_: None)
        s = make_strategy(built.setup)
        members = Membership(3, min_clients=1, names=["a", "b", "c"])
        s._begin_step(group)
        for c in group:
            s._send_up(c, 0, *s._client_forward(c, 0))
        received, metas = s._server_receive(0, group)
        h_all, sizes, out, _ = s._u_server_down(0, group, received, metas, members)
        for c in group:
            if c != failing:  # the failing client never sends its gradient back
                s._u_client_tail(c, 0)
        futures, finished = s._u_server_finish(0, group, received, h_all, sizes, out, members)
        cut_grads = {c: f.result() for c, f in futures.items()}
        return s, members, finished, cut_grads

    s, members, finished, got = server_step("dropped", [0, 1, 2], failing=1)
    assert finished == [0, 2] and members.training() == [0, 2]
    assert [(e["client"], e["step"]) for e in members.events()] == [("client1", 0)]
    ref, _, ref_finished, want = server_step("reference", [0, 2])
    assert ref_finished == [0, 2] and got.keys() == want.keys() == {0, 2}

    def server_grads(strategy):  # kept after the optimizer step (zeroed at the next step's start)
        return {n: p.grad for n, p in strategy.server.named_parameters() if p.requires_grad}

    # The gradients themselves (the optimizer, Adam, would hide a wrong scale), and the update.
    got_grads, want_grads = server_grads(s), server_grads(ref)
    assert got_grads.keys() == want_grads.keys() and all(g is not None for g in got_grads.values())
    for k in got_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    got_server, want_server = adapter_state(s.server), adapter_state(ref.server)
    for k in got_server:
        torch.testing.assert_close(got_server[k], want_server[k], rtol=0, atol=1e-6, msg=k)
    for c in (0, 2):  # the cut gradient each finished client gets
        decode = s.grad_down[c].decode
        torch.testing.assert_close(decode(got[c], torch.float32, s.device), decode(want[c], torch.float32, s.device),
                                   rtol=1e-5, atol=1e-7)
