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
