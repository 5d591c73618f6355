"""federation.clients_per_round: the seeded per-round sample, its config checks, and the
in-process simulation (transport=local) training and averaging over the sampled clients only."""
import json
import sys
from pathlib import Path

import pytest
import torch

from splitlora.adapters import adapter_state
from splitlora.config import ConfigError, load_config
from splitlora.federation.membership import sample_clients, sample_size
from splitlora.strategies import make_strategy
from splitlora.trainer import build, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_testutil import TINY_MODEL, tiny_config  # noqa: E402


def test_sample_size_counts_and_fractions():
    assert sample_size(None, 5) == 5
    assert sample_size(2, 5) == 2
    assert sample_size(4, 3) == 3  # fewer available (drop-outs) than the count: all of them
    assert sample_size(0.5, 5) == 3  # ceil
    assert sample_size(0.4, 5) == 2
    assert sample_size(0.01, 5) == 1  # at least one
    assert sample_size(1.0, 5) == 5


def test_sample_is_seeded_by_seed_and_round_alone():
    draws = [sample_clients(range(8), 3, seed=7, round_index=r) for r in range(20)]
    assert draws == [sample_clients(list(range(8)), 3, seed=7, round_index=r) for r in range(20)]
    assert all(len(d) == 3 and d == sorted(d) and len(set(d)) == 3 for d in draws)
    assert len({tuple(d) for d in draws}) > 5  # rounds differ
    assert draws != [sample_clients(range(8), 3, seed=8, round_index=r) for r in range(20)]
    assert sample_clients([3, 1, 2], None, seed=0, round_index=4) == [1, 2, 3]
    assert sample_clients([5, 9], 1.0, seed=0, round_index=4) == [5, 9]
    assert set(sample_clients([2, 5, 9], 2, seed=1, round_index=0)) <= {2, 5, 9}


@pytest.mark.parametrize("value, message", [
    (0, "must be a count >= 1"), (-1, "must be a count >= 1"), (3, "more than train.clients"),
    (1.5, r"fraction must be in \(0, 1\]"), (0.0, r"fraction must be in \(0, 1\]"),
    ("half", "expected an integer or a number or null"),
])
def test_bad_clients_per_round_is_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY_MODEL + ["train.clients=2", f"federation.clients_per_round={json.dumps(value)}"])


def test_clients_per_round_needs_a_sampling_strategy():
    with pytest.raises(ConfigError, match="strategy=sl does not sample clients"):
        load_config(None, TINY_MODEL + ["strategy=sl", "train.clients=2", "federation.clients_per_round=1"])


@pytest.mark.parametrize("overrides, message", [
    (["federation.start_clients=0"], "start_clients: must be >= 1"),
    (["federation.start_clients=3"], "more than train.clients"),
    (["federation.min_clients=2", "federation.start_clients=1"], "fewer than federation.min_clients"),
])
def test_bad_start_clients_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY_MODEL + ["train.clients=2", *overrides])


def test_config_types():
    assert load_config(None, TINY_MODEL + ["train.clients=4", "federation.clients_per_round=2"]
                       ).federation.clients_per_round == 2
    cfg = load_config(None, TINY_MODEL + ["train.clients=4", "federation.clients_per_round=0.5"])
    assert cfg.federation.clients_per_round == 0.5 and isinstance(cfg.federation.clients_per_round, float)


def _records(out: Path, kind: str) -> list:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_sampling_everyone_equals_no_sampling(tmp_path):
    """clients_per_round covering every client takes the same path as today's run: equal adapters,
    losses and byte counts; the rounds' records name the clients."""
    runs = {}
    for name, extra in (("plain", []), ("all", ["federation.clients_per_round=3"])):
        cfg = tiny_config(tmp_path, "train.clients=3", "train.steps=4", "train.aggregate_every=2", name=name, *extra)
        summary = train(cfg, progress=False, log=lambda *_: None)
        runs[name] = (summary, _records(Path(cfg.output_dir), "step"), _records(Path(cfg.output_dir), "round"))
    (_, steps0, rounds0), (_, steps1, rounds1) = runs["plain"], runs["all"]
    assert [r["loss"] for r in steps0] == [r["loss"] for r in steps1]
    assert [r["bytes"] for r in rounds0] == [r["bytes"] for r in rounds1]
    assert all("clients" not in r for r in rounds0)
    assert [r["clients"] for r in rounds1] == [["client0", "client1", "client2"]] * 2
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "all" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_is_over_the_sampled_clients_only(tmp_path):
    """One round with 2 of 4 clients sampled: only they train (the others' adapters and batches do
    not move), and the average every client gets is the sampled clients' FedAvg with their weights
    renormalised."""
    cfg = tiny_config(tmp_path, "train.clients=4", "train.aggregate_every=2", "federation.clients_per_round=2",
                      "seed=3")
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    start = [adapter_state(p) for p in strategy.parts]
    for step in range(2):
        strategy.train_step(step)
    sample = strategy.round_clients
    assert sample == sample_clients(range(4), 2, seed=3, round_index=0) and len(sample) == 2
    before = [adapter_state(p) for p in strategy.parts]
    key = next(iter(start[0]))
    for c in range(4):
        moved = not torch.equal(before[c][key], start[c][key])
        assert moved == (c in sample), c
    strategy.end_round(1)
    w = torch.tensor([built.setup.client_weights[c] for c in sample], dtype=torch.float64)
    for k in before[0]:
        expected = sum(float(wi) * before[c][k].double() for wi, c in zip(w / w.sum(), sample))
        for p in strategy.parts:
            torch.testing.assert_close(adapter_state(p)[k].double(), expected, rtol=1e-6, atol=1e-7)
    ledger = built.setup.transport.ledger
    up = {c: ledger.total(client=f"client{c}", kind="adapters", direction="up") for c in range(4)}
    assert all((up[c] > 0) == (c in sample) for c in range(4))


def test_sampled_run_is_reproducible_and_recorded(tmp_path):
    """A run with a sample per round: the sample is recorded on each round's record, drawn again the
    same by a second run, and a client left out then sampled receives the global adapters first."""
    records = []
    for name in ("one", "two"):
        cfg = tiny_config(tmp_path, "train.clients=3", "train.steps=8", "train.aggregate_every=2",
                          "federation.clients_per_round=1", name=name)
        train(cfg, progress=False, log=lambda *_: None)
        records.append((_records(Path(cfg.output_dir), "round"), _records(Path(cfg.output_dir), "step")))
    (rounds, steps), (rounds2, steps2) = records
    samples = [r["clients"] for r in rounds]
    assert samples == [[f"client{c}" for c in sample_clients(range(3), 1, seed=0, round_index=r)] for r in range(4)]
    assert samples == [r["clients"] for r in rounds2] and [r["loss"] for r in steps] == [r["loss"] for r in steps2]
    for r, rec in enumerate(rounds):
        (trained,) = rec["clients"]
        for client, b in rec["bytes"].items():
            assert (b["up"]["activations"] > 0) == (client == trained)
            assert (b["up"]["adapters"] > 0) == (client == trained)
        # The round's client gets the global adapters before it trains unless it trained the round before.
        fresh = r == 0 or rounds[r - 1]["clients"] == rec["clients"]
        expected_down = 1 if fresh else 2
        assert rec["bytes"][trained]["down"]["adapters"] == expected_down * rec["bytes"][trained]["up"]["adapters"]


def test_resumed_sampled_run_equals_the_uninterrupted_one(tmp_path):
    """The sample depends on (seed, round) alone and who holds the global adapters is
    checkpointed: a sampled run stopped after 4 steps and resumed ends as the uninterrupted one."""
    # seed 2 samples clients 2, 0, 1, 1: round 2's client (1) lacks the global adapters after the
    # resume, which only the checkpointed record says.
    extra = ["train.clients=3", "train.steps=8", "train.aggregate_every=2", "federation.clients_per_round=1", "seed=2"]
    assert [sample_clients(range(3), 1, seed=2, round_index=r) for r in range(4)] == [[2], [0], [1], [1]]
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(tiny_config(tmp_path, *extra, name="full"), **quiet)
    train(tiny_config(tmp_path, *extra, "train.steps=4", name="resumed"), **quiet)
    resumed = train(tiny_config(tmp_path, *extra, "resume=true", name="resumed"), **quiet)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert resumed["bytes_total"] == full["bytes_total"] > 0
    for kind in ("round", "step"):
        a, b = _records(tmp_path / "full", kind), _records(tmp_path / "resumed", kind)
        assert [r.get("clients") for r in a] == [r.get("clients") for r in b]
        assert [r["bytes"] for r in a] == [r["bytes"] for r in b]
