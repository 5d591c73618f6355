"""HSplitLoRA: budgets, importance, reconfiguration, noise-free fold, learning, resume, CLI."""
import copy
import math
import json
from pathlib import Path

import pytest
import torch

from splitlora.adapters import adapter_state
from splitlora.aggregate import lora_scalings
from splitlora.hetero import (AdaptedWeight, DeviceProfile, ImportanceTracker, SegmentCost, allocate_ranks,
                              configure_clients, low_rank_factors, ranking_change)
from splitlora.strategies import make_strategy
from splitlora.trainer import build, train
from splitlora_kernels.layers import FusedLoRALinear, lora_modules
from trainer_testutil import TINY_MODEL, tiny_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "hsplitlora.yaml"
DEVICES = "hsplitlora.devices={big: {tflops: 4.0, memory_gib: 8}, small: {count: 2, tflops: 1.0, memory_gib: 2}}"
QUIET = dict(progress=False, log=lambda *_: None)


def _hsplit(tmp_path, *overrides, name="run"):
    return tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", DEVICES, "lora.client.r=4",
                       "lora.client.target_modules=[c_attn,c_proj,c_fc]", *overrides, name=name)


def _start(cfg):
    built = build(cfg, log=lambda *_: None)
    return built, make_strategy(built.setup)


def _steps(built, strategy, steps, start=0):
    every = built.cfg.train.aggregate_every
    losses = []
    for step in range(start, start + steps):
        built.setup.transport.set_round(step // every)
        losses.append(strategy.train_step(step).loss)
        if (step + 1) % every == 0:
            strategy.end_round(step)
    return losses


def _cost(**changes):
    fields = dict(cut_layer=1, weights=(AdaptedWeight("q", 64, 192), AdaptedWeight("o", 64, 64),
                                        AdaptedWeight("fc", 64, 256)),
                  frozen_bytes=4_000_000, matmul_params=1_000_000, layers=1, batch=4, seq_len=64, hidden=64,
                  heads=2, element_bytes=4, optimizer_states=2, up_bytes=70_000, down_bytes=70_000)
    fields.update(changes)
    return SegmentCost(**fields)


# ------------------------------------------------------------------------------------ configuration

def test_configuration_gives_weaker_clients_lower_ranks_within_their_budgets():
    cost = _cost()
    names = cost.names
    importance = {"q": 3.0, "o": 1.0, "fc": 2.0}
    # The memory at rank 8 everywhere vs rank 1: a budget halfway allows only part of the rank.
    low, high = (cost.memory_bytes({m: r for m in names}) for r in (1, 8))
    tight = (low + high) / 2 / 2**30
    devices = [DeviceProfile("big", 4.0, 1.0, 100.0, 10.0), DeviceProfile("mid", 2.0, 1.0, 100.0, 10.0),
               DeviceProfile("tight", 4.0, tight, 100.0, 10.0)]
    plans = configure_clients(devices, [cost] * 3, importance, reference_total=8 * 3, min_rank=1, max_rank=16)
    big, mid, squeezed = plans
    assert big.total_rank == 24 and mid.total_rank == 12  # half the compute: half the rank budget
    assert squeezed.total_rank < big.total_rank and squeezed.memory_bytes <= tight * 2**30 < big.memory_bytes
    assert all(p.fits for p in plans)
    # Ranks follow importance: q > fc > o.
    for p in plans:
        assert p.ranks["q"] >= p.ranks["fc"] >= p.ranks["o"] >= 1
    assert big.ranks["q"] > big.ranks["o"]
    # The estimates are the cost model's.
    assert mid.step_time_s == pytest.approx(cost.step_time_s(mid.ranks, devices[1]))

    # A per-step deadline: the client on the slower link (same compute) has less time left for its
    # compute, so its ranks are lowered until its estimate fits.
    fast = DeviceProfile("fast", 1e-3, None, 100.0, 0.0)
    full = allocate_ranks(importance, names, 24, 1, 16)
    deadline = cost.step_time_s(full, fast)
    spare = deadline - cost.step_time_s({m: 1 for m in names}, fast)
    slow = DeviceProfile("slow", 1e-3, None, 100.0, spare / 2 / 2 * 1e3)  # two transfers, latency in ms
    fast_plan, slow_plan = configure_clients([fast, slow], [cost] * 2, importance, reference_total=24,
                                             min_rank=1, max_rank=16, step_time_s=deadline)
    assert fast_plan.total_rank == 24 and 3 < slow_plan.total_rank < 24
    assert slow_plan.fits and slow_plan.step_time_s <= deadline
    assert cost.step_time_s(allocate_ranks(importance, names, slow_plan.total_rank + 1, 1, 16), slow) > deadline
    # Even at rank 1 everywhere it does not fit: minimum ranks, reported as not fitting.
    (hopeless,) = configure_clients([slow], [cost], importance, reference_total=24, min_rank=1, max_rank=16,
                                    step_time_s=spare / 2)
    assert hopeless.total_rank == 3 and not hopeless.fits and "DOES NOT FIT" in hopeless.describe()


def test_allocate_ranks_is_proportional_capped_and_exact():
    ranks = allocate_ranks({"a": 6.0, "b": 3.0, "c": 1.0}, ["a", "b", "c"], 23, 1, 8)
    assert sum(ranks.values()) == 23 and ranks == {"a": 8, "b": 8, "c": 7}  # a capped, the rest shared
    ranks = allocate_ranks({"a": 6.0, "b": 3.0, "c": 1.0}, ["a", "b", "c"], 13, 1, 16)
    assert sum(ranks.values()) == 13 and ranks["a"] > ranks["b"] > ranks["c"] >= 1
    assert allocate_ranks({}, ["a", "b"], 7, 2, 8) in ({"a": 4, "b": 3}, {"a": 3, "b": 4})
    assert allocate_ranks({"a": 1.0}, ["a", "b"], 100, 1, 4) == {"a": 4, "b": 4}  # clamped to the bounds


# ------------------------------------------------------------------------------------ importance

def test_importance_ranks_the_module_with_larger_gradients_higher():
    torch.manual_seed(0)
    layers = {name: FusedLoRALinear(16, 16, r=4, lora_alpha=8) for name in ("small", "large")}
    with torch.no_grad():
        layers["small"].lora_B.normal_()  # B = 0 gives A no gradient
        layers["large"].load_state_dict(layers["small"].state_dict())  # the same module twice
    tracker = ImportanceTracker(beta=0.5)
    x = torch.randn(8, 16)
    for _ in range(3):
        for m in layers.values():
            m.zero_grad()
        (layers["small"](x).pow(2).sum() + 10.0 * layers["large"](x).pow(2).sum()).backward()
        tracker.observe(layers)
    assert tracker.scores["large"] == pytest.approx(10.0 * tracker.scores["small"], rel=1e-5)
    assert tracker.scores["small"] > 0


def test_ranking_change_is_kendall_distance():
    a = {"x": 3.0, "y": 2.0, "z": 1.0}
    assert ranking_change(a, a) == 0.0
    assert ranking_change(a, {"x": 1.0, "y": 2.0, "z": 3.0}) == 1.0
    assert ranking_change(a, {"x": 3.0, "y": 1.0, "z": 2.0}) == pytest.approx(1 / 3)
    assert ranking_change({"x": 1.0, "y": 1.0, "z": 1.0}, a) == 0.5  # from uniform: every pair half


@pytest.mark.parametrize("threshold, reconfigured", [(1.0, False), (0.0, True)])
def test_reconfiguration_only_past_the_threshold(tmp_path, threshold, reconfigured, capsys):
    cfg = _hsplit(tmp_path, f"hsplitlora.reconfigure_threshold={threshold}", "hsplitlora.importance_every=2",
                  "train.aggregate_every=2")
    built, strategy = _start(cfg)
    initial = [dict(p.ranks) for p in strategy.plans]
    assert "initial configuration" in capsys.readouterr().out
    _steps(built, strategy, 2)
    # Not an importance round yet: nothing checked, nothing changed.
    assert strategy.last_change is None and strategy.reconfigurations == 0
    _steps(built, strategy, 2, start=2)
    assert strategy.last_change == pytest.approx(0.5)  # from uniform importance to a strict order
    assert strategy.reconfigurations == int(reconfigured)
    assert ("reconfigured" in capsys.readouterr().out) == reconfigured
    if not reconfigured:
        assert [p.ranks for p in strategy.plans] == initial
    else:
        # The strongest client's ranks now follow the importance.
        big = strategy.plans[0]
        order = sorted(big.ranks, key=lambda m: strategy.importance[m])
        assert big.ranks[order[-1]] > big.ranks[order[0]]
    for c, p in enumerate(strategy.plans):
        assert {n: m.r for n, m in lora_modules(strategy.parts[c]).items()} == p.ranks


def test_gradient_importance_moves_with_one_step_rounds(tmp_path):
    # One step per round: every step starts from B = 0, where only the gradient measure sees anything.
    cfg = _hsplit(tmp_path, "hsplitlora.importance=gradient", "train.aggregate_every=1",
                  "hsplitlora.reconfigure_threshold=0.0")
    built, strategy = _start(cfg)
    _steps(built, strategy, 1)
    assert len(set(strategy.importance.values())) == len(strategy.importance) and strategy.reconfigurations == 1


# ------------------------------------------------------------------------------------ aggregation

def _client_weight_update(strategy, states, scalings):
    """base-layout sum_i w_i s_i B_i A_i per module (float64)."""
    w = torch.tensor(strategy.setup.client_weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for name, module in lora_modules(strategy.parts[0]).items():
        delta = sum(float(w[i]) * scalings[i][name] * (s[f"{name}.lora_B"].double() @ s[f"{name}.lora_A"].double())
                    for i, s in enumerate(states))
        out[name] = delta.t() if module.fan_in_fan_out else delta
    return out


@pytest.mark.parametrize("aggregation", ["stacked", "zero_pad"])
def test_round_folds_exactly_the_weighted_mean_of_the_updates(tmp_path, aggregation):
    cfg = _hsplit(tmp_path, f"hsplitlora.aggregation={aggregation}", "train.aggregate_every=2")
    built, strategy = _start(cfg)
    assert len({p.total_rank for p in strategy.plans}) > 1  # unequal ranks
    for step in range(2):
        strategy.train_step(step)
    states = [adapter_state(p) for p in strategy.parts]
    scalings = [lora_scalings(p) for p in strategy.parts]
    modules = lora_modules(strategy.parts[0])
    before = {n: m.weight.detach().double().clone() for n, m in modules.items()}
    update = _client_weight_update(strategy, states, scalings)
    assert all(float(u.abs().max()) > 1e-5 for u in update.values())
    strategy.end_round(1)
    after = {n: m.weight.detach().double() for n, m in modules.items()}
    if aggregation == "stacked":
        for n in modules:
            torch.testing.assert_close(after[n], before[n] + update[n], rtol=0, atol=1e-6, msg=n)
        # Every client restarted at its own ranks with B = 0: the global model is the folded base.
        for part in strategy.parts:
            assert all(float(m.lora_B.detach().abs().max()) == 0 for m in lora_modules(part).values())
    else:
        # HetLoRA keeps the adapters: the base is untouched, and the global update (zero-padded
        # averages of A and B) is not the weighted mean of the clients' updates.
        for n in modules:
            assert torch.equal(after[n], before[n])
        glob = strategy._preview()
        for n, module in modules.items():
            a, b, scaling = glob[strategy._whole[n]]
            got = scaling * (b.double() @ a.double())
            got = got.t() if module.fan_in_fan_out else got
            assert float((got - update[n]).norm() / update[n].norm()) > 1e-2, n
    # Both directions of the round were accounted as adapters.
    ledger = built.setup.transport.ledger
    assert ledger.total(kind="adapters", direction="up") > 0 and ledger.total(kind="adapters", direction="down") > 0


def test_low_rank_factors_are_exact_at_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g,
                                                                               dtype=torch.float64)
    a, b = low_rank_factors(delta)
    assert a.shape == (3, 12) and b.shape == (20, 3)
    torch.testing.assert_close(b @ a, delta, rtol=1e-10, atol=1e-10)
    a2, b2 = low_rank_factors(delta, 2)
    assert a2.shape[0] == 2


# ------------------------------------------------------------------------------------ training

def test_hsplitlora_learns_and_reports_its_configuration(tmp_path):
    cfg = _hsplit(tmp_path, "train.aggregate_every=3", "hsplitlora.min_rank=1")
    built, strategy = _start(cfg)
    losses = _steps(built, strategy, 15)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    result = strategy.train_step(15)
    assert result.extra["client0_rank"] > result.extra["client1_rank"] == result.extra["client2_rank"]
    assert result.extra["client1_fits"] == 1.0 and result.extra["client1_est_memory_gib"] > 0
    report = strategy.memory_report()
    assert [c["device"] for c in report["clients"]] == ["big", "small", "small"]
    # The planner's activation estimate (Korthikanti et al.'s per-layer count) against what the
    # client's forward really kept for its backward: conservative, and of the same order.
    for c in report["clients"]:
        assert 0.3 * c["est_activation_bytes"] < c["measured_activation_bytes"] < c["est_activation_bytes"]
    assert result.extra["client0_activation_bytes"] == report["clients"][0]["measured_activation_bytes"]
    assert report["clients"][0]["trainable_params"] > report["clients"][1]["trainable_params"]


@pytest.mark.parametrize("cuts", [False, True], ids=["one-cut", "two-cuts"])
def test_resume_equals_uninterrupted(tmp_path, cuts):
    extra = ["codec.bits=4", "codec.error_feedback=true", "codec.stochastic=true", "lora.client.dropout=0.1",
             "train.steps=6", "train.aggregate_every=2", "hsplitlora.reconfigure_threshold=0.0",
             *(CUTS if cuts else [])]
    full = train(_hsplit(tmp_path, *extra, name="full"), **QUIET)
    train(_hsplit(tmp_path, *extra, "train.steps=4", name="resumed"), **QUIET)
    resumed = train(_hsplit(tmp_path, *extra, "resume=true", name="resumed"), **QUIET)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert resumed["bytes_total"] == full["bytes_total"]
    assert resumed["trainable_params"] == full["trainable_params"]
    assert [c["cut_layer"] for c in full["trainable_params"]["clients"]] == ([2, 1, 1] if cuts else [1, 1, 1])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    records = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(6))
    assert all("client0_rank" in r for r in records if r["type"] == "step")
    if cuts:
        _assert_export_gives_the_runs_logits(tmp_path / "full")


def _assert_export_gives_the_runs_logits(out):
    """The exported adapter (the folded update by SVD, plus the server's) on the whole model gives
    the run's own logits."""
    peft = pytest.importorskip("peft")
    from splitlora.trainer import load_run

    built, strategy, _ = load_run(out, log=lambda *_: None)
    model = peft.PeftModel.from_pretrained(built.setup.base_model, str(out / "adapter")).eval()
    batch = built.eval_data.batch(list(range(2)))
    strategy.train(False)
    with torch.no_grad():
        expected = strategy.logits_fn()(batch["input_ids"], batch["attention_mask"])
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cli_trains_the_shipped_config_and_exports_the_folded_update(tmp_path, capsys):
    from splitlora.cli import main

    out = tmp_path / "cli"
    args = ["train", "--config", str(CONFIG), "--no-progress", *TINY_MODEL, f"output_dir={out}",
            "data.synthetic_examples=60", "data.num_eval=8", "train.clients=2", "train.batch_size=2",
            "train.steps=4", "train.aggregate_every=2", "eval.generate=false", "model.cut_layer=1",
            "hsplitlora.devices={fast: {tflops: 1.0e-3}, slow: {tflops: 1.0e-6}}", "network.latency_ms=0",
            "hsplitlora.max_cut_layer=2", "hsplitlora.step_time_s=15"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "hsplitlora, round 0: initial configuration" in printed and "client1 [slow] cut 1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "hsplitlora" and summary["eval_loss"] > 0
    clients = summary["trainable_params"]["clients"]
    assert [c["cut_layer"] for c in clients] == [2, 1] and clients[0]["total_rank"] > clients[1]["total_rank"]

    _assert_export_gives_the_runs_logits(out)


@pytest.mark.parametrize("override, key", [
    ("hsplitlora.aggregation=mean", "hsplitlora.aggregation"),
    ("hsplitlora.min_rank=0", "hsplitlora.min_rank"),
    ("hsplitlora.max_rank=0", "hsplitlora.max_rank"),
    ("hsplitlora.reconfigure_threshold=1.5", "hsplitlora.reconfigure_threshold"),
    ("hsplitlora.importance_beta=1.0", "hsplitlora.importance_beta"),
    ("hsplitlora.importance_every=0", "hsplitlora.importance_every"),
    ("hsplitlora.step_time_s=0", "hsplitlora.step_time_s"),
    ("hsplitlora.devices.phone.count=3", "hsplitlora.devices"),
    ("hsplitlora.devices.phone.tflops=-1", "hsplitlora.devices.phone.tflops"),
    ("hsplitlora.devices.phone.ram=4", "hsplitlora.devices.phone.ram"),
    ("hsplitlora.rank=4", "hsplitlora.rank"),
    ("hsplitlora.configuration=strongest", "hsplitlora.configuration"),
    ("hsplitlora.server_adapters=each", "hsplitlora.server_adapters"),
    ("hsplitlora.server_adapters=per_client hsplitlora.aggregation=zero_pad hsplitlora.min_cut_layer=2",
     "hsplitlora.server_adapters: per_client needs hsplitlora.aggregation=stacked"),
    ("hsplitlora.restart=hot", "hsplitlora.restart"),
    ("hsplitlora.restart=warm hsplitlora.aggregation=zero_pad hsplitlora.min_cut_layer=2",
     "hsplitlora.restart: warm restarts the adapters after a stacked fold"),
])
def test_config_errors_name_the_key(override, key):
    from splitlora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(CONFIG, override.split(" "))


# ------------------------------------------------------------------------------------ clients at different cuts

# Clients 0 (fast) and 1, 2 (slow): under the deadline only the fast one can hold two layers.
CUTS = ["hsplitlora.devices={fast: {tflops: 1.0e-3}, slow: {count: 2, tflops: 1.0e-6}}", "network.latency_ms=0",
        "network.bandwidth_mbps=1.0e6", "hsplitlora.min_cut_layer=1", "hsplitlora.max_cut_layer=2",
        "hsplitlora.step_time_s=30", "lora.client.target_modules=[c_attn,c_proj]",
        "lora.server.target_modules=[c_attn,lm_head]", "train.aggregate_every=2"]


def _through(strategy, part, cut, batch):
    with torch.no_grad():
        return strategy._views[cut](part["head"](batch["input_ids"], batch["attention_mask"]),
                                    batch["attention_mask"])


def test_clients_at_different_cuts_one_server_forward_per_cut_and_exact_fold(tmp_path):
    built, strategy = _start(tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                                         *CUTS))
    assert [p.cut_layer for p in strategy.plans] == [2, 1, 1]  # deeper cut for the stronger client
    assert strategy.parts[0]["head"].layer_range == (0, 2) and strategy.parts[1]["head"].layer_range == (0, 1)
    batch = built.eval_data.batch(list(range(4)))
    # Every path computes the same model (adapters start at B = 0).
    torch.testing.assert_close(_through(strategy, strategy.parts[0], 2, batch),
                               _through(strategy, strategy.parts[1], 1, batch), rtol=1e-5, atol=1e-5)
    rows = {1: [], 2: []}
    hooks = [strategy._views[k].register_forward_hook(lambda m, args, out, k=k: rows[k].append(args[0].shape[0]))
             for k in (1, 2)]
    for step in range(2):
        built.setup.transport.set_round(0)
        result = strategy.train_step(step)
    for h in hooks:
        h.remove()
    assert rows == {1: [8, 8], 2: [4, 4]}  # the two slow clients batched together, once per step
    assert result.extra["client0_cut"] == 2.0 and result.extra["client1_cut"] == 1.0

    # The round: per weight, the weighted mean of the updates of the parties that trained it.
    w = torch.tensor(built.setup.client_weights, dtype=torch.float64)
    states = [adapter_state(p) for p in strategy.parts]
    scalings = [lora_scalings(p) for p in strategy.parts]
    server_scaling = lora_scalings(strategy.server)["h.1.attn.c_attn"]
    srv = lora_modules(strategy.server)["h.1.attn.c_attn"]
    srv_update = server_scaling * (srv.lora_B.detach().double() @ srv.lora_A.detach().double())
    assert float(srv_update.abs().max()) > 1e-6  # trained on the slow clients' activations

    def update(c, name):
        return scalings[c][name] * (states[c][f"{name}.lora_B"].double() @ states[c][f"{name}.lora_A"].double())

    foldable = strategy._foldable
    before = {k: v.detach().double().clone() for k, (v, _) in foldable.items()}
    expected = {
        # Layer 0: every client holds it.
        "transformer.h.0.attn.c_attn": sum(float(w[c]) * update(c, "head.h.0.attn.c_attn") for c in range(3)) / w.sum(),
        # Layer 1, c_attn: the fast client's adapter and the server's, which the slow clients trained.
        "transformer.h.1.attn.c_attn": (float(w[0]) * update(0, "head.h.1.attn.c_attn")
                                        + float(w[1] + w[2]) * srv_update) / w.sum(),
        # Layer 1, c_proj: only the fast client adapts it.
        "transformer.h.1.attn.c_proj": update(0, "head.h.1.attn.c_proj"),
    }
    strategy.end_round(1)
    for full, delta in expected.items():
        got = foldable[full][0].detach().double() - before[full]
        torch.testing.assert_close(got, delta.t(), rtol=0, atol=1e-6, msg=full)  # GPT-2 Conv1D: [in, out]
    assert float(srv.lora_B.detach().abs().max()) == 0  # the server's adapter on a client-held layer restarts
    assert float(lora_modules(strategy.server)["h.2.attn.c_attn"].lora_B.detach().abs().max()) > 0  # kept
    # After the round every path computes the same model again, and so does the global model.
    via_fast = _through(strategy, strategy.parts[0], 2, batch)
    torch.testing.assert_close(via_fast, _through(strategy, strategy.parts[1], 1, batch), rtol=1e-5, atol=1e-5)
    strategy.train(False)
    with torch.no_grad():
        torch.testing.assert_close(strategy.logits_fn()(batch["input_ids"], batch["attention_mask"]), via_fast,
                                   rtol=1e-5, atol=1e-5)


def test_a_deepening_client_downloads_its_new_layer_and_state_restores_the_cuts(tmp_path):
    import dataclasses

    cfg = tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                      "hsplitlora.reconfigure_threshold=0.0", *CUTS)
    built, strategy = _start(cfg)
    losses = _steps(built, strategy, 2)
    ledger = built.setup.transport.ledger
    before = ledger.total(client="client1", kind="adapters", direction="down")
    # No deadline any more: at the next reconfiguration every client takes the deepest cut.
    strategy.hc = dataclasses.replace(strategy.hc, step_time_s=None)
    losses += _steps(built, strategy, 2, start=2)
    assert [p.cut_layer for p in strategy.plans] == [2, 2, 2]
    assert strategy.parts[1]["head"].layer_range == (0, 2)
    layer1 = sum(p.numel() * 4 for n, p in strategy.parts[1]["head"].named_parameters()
                 if n.startswith("h.1.") and "lora_" not in n)
    assert ledger.total(client="client1", kind="adapters", direction="down") - before > layer1
    batch = built.eval_data.batch(list(range(4)))
    torch.testing.assert_close(_through(strategy, strategy.parts[0], 2, batch),
                               _through(strategy, strategy.parts[1], 2, batch), rtol=1e-5, atol=1e-5)

    # A fresh strategy (built at the initial cuts) restored from the state continues identically.
    state = strategy.state_dict()
    loaders = [l.state_dict() for l in built.setup.loaders]
    rng = torch.get_rng_state()
    expected = [strategy.train_step(4).loss for _ in range(1)]
    built2, restored = _start(cfg)
    restored.load_state_dict(state)
    for loader, s in zip(built2.setup.loaders, loaders):
        loader.load_state_dict(s)
    torch.set_rng_state(rng)
    assert [p.cut_layer for p in restored.plans] == [2, 2, 2]
    assert [restored.train_step(4).loss] == expected
    assert sum(losses[-2:]) < sum(losses[:2])


# ------------------------------------------------------------------------------------ per-client server adapters

def _through_as(strategy, part, cut, batch, client):
    """`_through` with the server's adapters of `client` (per-client server adapters)."""
    from splitlora_kernels.multi_layer import adapter_groups

    sizes = [0] * strategy.num_clients
    sizes[client] = batch["input_ids"].shape[0]
    with adapter_groups(strategy._views[cut], sizes):
        return _through(strategy, part, cut, batch)


def test_per_client_server_adapters_run_in_one_launch_and_fold_exactly(tmp_path, monkeypatch):
    from splitlora_kernels import multi_layer
    from splitlora_kernels.multi_layer import MultiLoRALinear

    built, strategy = _start(tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                                         "hsplitlora.server_adapters=per_client", "data.pad_to=dataset", *CUTS))
    assert [p.cut_layer for p in strategy.plans] == [2, 1, 1]
    multis = {n: m for n, m in strategy.server.named_modules() if isinstance(m, MultiLoRALinear)}
    assert set(multis) == {"h.1.attn.c_attn", "h.2.attn.c_attn", "lm_head"}
    # The server ranks follow the clients': lora.server.r (8) scaled by each client's mean rank / 4.
    expected_ranks = [round(8 * p.total_rank / len(p.ranks) / 4) for p in strategy.plans]
    assert all(m.ranks == expected_ranks for m in multis.values()) and expected_ranks[0] > expected_ranks[1]
    # The views share the modules: the cut-2 view runs the same object for layer 2.
    assert strategy._views[2].get_submodule("h.2.attn.c_attn") is multis["h.2.attn.c_attn"]

    # One call of the batched op per module and forward, rows grouped by client (0 rows for the
    # clients of the other cut group).
    calls = []
    real = multi_layer.multi_lora_linear

    def spy(x, weight, lora_as, lora_bs, scalings, offsets, bias=None, **kwargs):
        calls.append((x.shape[0], tuple(b - a for a, b in zip(offsets, offsets[1:]))))
        return real(x, weight, lora_as, lora_bs, scalings, offsets, bias, **kwargs)

    monkeypatch.setattr(multi_layer, "multi_lora_linear", spy)
    built.setup.transport.set_round(0)
    strategy.train_step(0)
    seq = built.setup.seq_len
    assert len(calls) == 3 + 2  # cut-1 group: layers 1, 2 and the head; cut-2 group: layer 2 and the head
    assert sorted(calls) == sorted([(8, (0, 4 * seq, 4 * seq))] * 3 + [(4, (4 * seq, 0, 0))] * 2)
    monkeypatch.undo()
    strategy.train_step(1)

    # The round folds, per server weight, the weighted mean of the per-client updates of the clients
    # whose activations ran through it (every client on the head; the slow ones on layer 1, where
    # the fast client's own adapter stands in for its share).
    w = torch.tensor(built.setup.client_weights, dtype=torch.float64)
    w = w / w.sum()

    def server_update(name, c):
        m = multis[name]
        return m.scaling(c) * (m.lora_B[c].detach().double() @ m.lora_A[c].detach().double())

    client = strategy.parts[0]["head"]
    fast = lora_modules(client)["h.1.attn.c_attn"]
    fast_update = fast.scaling * (fast.lora_B.detach().double() @ fast.lora_A.detach().double())
    assert all(float(server_update(n, c).abs().max()) > 1e-6 for n in multis for c in (1, 2))
    expected = {
        "transformer.h.1.attn.c_attn": float(w[0]) * fast_update + sum(float(w[c]) * server_update("h.1.attn.c_attn", c)
                                                                       for c in (1, 2)),
        "transformer.h.2.attn.c_attn": sum(float(w[c]) * server_update("h.2.attn.c_attn", c) for c in range(3)),
        "lm_head": sum(float(w[c]) * server_update("lm_head", c) for c in range(3)),
    }
    foldable = strategy._foldable
    before = {k: foldable[k][0].detach().double().clone() for k in expected}
    strategy.end_round(1)
    for full, delta in expected.items():
        got = foldable[full][0].detach().double() - before[full]
        torch.testing.assert_close(got, delta if full == "lm_head" else delta.t(), rtol=0, atol=1e-6, msg=full)
    # Every server adapter restarted (B = 0) at its client's rank, and every path and the global
    # model compute the same (folded) model again.
    assert all(float(b.detach().abs().max()) == 0 for m in multis.values() for b in m.lora_B)
    batch = built.eval_data.batch(list(range(4)))
    via_fast = _through_as(strategy, strategy.parts[0], 2, batch, 0)
    torch.testing.assert_close(_through_as(strategy, strategy.parts[1], 1, batch, 1), via_fast, rtol=1e-5, atol=1e-5)
    strategy.train(False)
    with torch.no_grad():
        torch.testing.assert_close(strategy.logits_fn()(batch["input_ids"], batch["attention_mask"]), via_fast,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("server_adapters", ["shared", "per_client"])
def test_warm_restart_keeps_the_model_and_starts_every_adapter_from_the_update(tmp_path, server_adapters):
    # Clients at cuts 2, 1, 1 with unequal ranks: the layer-1 weight restarts in the fast client's
    # adapter and in the server's (shared, or each slow client's), at different ranks.
    built, strategy = _start(tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                                         f"hsplitlora.server_adapters={server_adapters}", "hsplitlora.restart=warm",
                                         "data.pad_to=dataset", *CUTS))
    for step in range(2):
        built.setup.transport.set_round(0)
        strategy.train_step(step)
    batch = built.eval_data.batch(list(range(4)))
    strategy.train(False)
    with torch.no_grad():
        before = strategy.logits_fn()(batch["input_ids"], batch["attention_mask"])
    strategy.train(True)
    strategy.end_round(1)
    strategy.train(False)
    with torch.no_grad():
        after = strategy.logits_fn()(batch["input_ids"], batch["attention_mask"])
    # The same model: the round's exact mean update, now part base and part adapters...
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # ...which every client computes through its own adapters and the server's (its own there,
    # with per-client server adapters), where a fresh restart would leave every B at zero. Layer
    # 1's c_proj weights are client-only targets that the slow clients reach through the server,
    # which has no adapter there: folded whole, their adapters restart fresh.
    for c, part in enumerate(strategy.parts):
        cut = strategy.plans[c].cut_layer
        got = (_through_as(strategy, part, cut, batch, c) if server_adapters == "per_client"
               else _through(strategy, part, cut, batch))
        torch.testing.assert_close(got, after, rtol=1e-5, atol=1e-5, msg=f"client {c}")
        for name, module in lora_modules(part).items():
            folded_whole = name.startswith("head.h.1.") and not name.endswith("c_attn")
            assert (float(module.lora_B.detach().abs().max()) == 0) == folded_whole, (c, name)
    # A restarted adapter starts from the update in its first k ranks (k: the smallest rank
    # restarting on that weight); the ranks beyond start as fresh ones, B = 0.
    fast = lora_modules(strategy.parts[0]["head"])
    slow = lora_modules(strategy.parts[1]["head"])
    k = slow["h.0.attn.c_attn"].lora_A.shape[0]
    wide = fast["h.0.attn.c_attn"]
    assert wide.lora_A.shape[0] > k
    assert float(wide.lora_B.detach()[:, k:].abs().max()) == 0 and float(wide.lora_B.detach()[:, :k].abs().max()) > 0
    # Training carries on from there.
    strategy.train(True)
    built.setup.transport.set_round(1)
    assert math.isfinite(strategy.train_step(2).loss)


def test_per_client_server_adapters_resume_and_export(tmp_path):
    # Server dropout on the per-client adapters too: a resumed run must draw the same masks.
    extra = ["codec.bits=8", "train.steps=6", "hsplitlora.reconfigure_threshold=0.0",
             "hsplitlora.server_adapters=per_client", "lora.server.dropout=0.1", *CUTS]
    full = train(_hsplit(tmp_path, *extra, name="full"), **QUIET)
    train(_hsplit(tmp_path, *extra, "train.steps=4", name="resumed"), **QUIET)
    resumed = train(_hsplit(tmp_path, *extra, "resume=true", name="resumed"), **QUIET)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert resumed["bytes_total"] == full["bytes_total"]
    assert [c["server_rank"] for c in full["trainable_params"]["clients"]] == \
        [c["server_rank"] for c in resumed["trainable_params"]["clients"]]
    _assert_export_gives_the_runs_logits(tmp_path / "full")

    # A state taken mid-round (per-client server adapters trained, not yet folded) restores into a
    # fresh strategy, which then continues identically.
    cfg = _hsplit(tmp_path, *extra, name="state")
    built, strategy = _start(cfg)
    _steps(built, strategy, 3)
    # Deep-copied, as a checkpoint on disk is: optimizer.load_state_dict keeps the very tensors it
    # is given, which the original's next step would otherwise update under the restored one.
    state = copy.deepcopy(strategy.state_dict())
    loaders = [l.state_dict() for l in built.setup.loaders]
    rng = torch.get_rng_state()
    expected = strategy.train_step(3).loss
    built2, restored = _start(cfg)
    restored.load_state_dict(state)
    for loader, s in zip(built2.setup.loaders, loaders):
        loader.load_state_dict(s)
    torch.set_rng_state(rng)
    assert restored.train_step(3).loss == expected
    for name, multi in strategy._multi.items():
        for a, b in zip(multi.lora_A, restored._multi[name].lora_A):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weakest_configuration_gives_every_client_the_most_constrained_plan(tmp_path):
    built, strategy = _start(tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                                         *CUTS))
    per_client = strategy.plans
    _, weakest = _start(tiny_config(tmp_path, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                                    "hsplitlora.configuration=weakest", *CUTS, name="weakest"))
    slow = per_client[1]
    assert per_client[0].total_rank > slow.total_rank
    for c, plan in enumerate(weakest.plans):
        assert (plan.cut_layer, plan.ranks) == (slow.cut_layer, slow.ranks)
        assert plan.device == per_client[c].device
        assert plan.step_time_s == pytest.approx(weakest._costs[slow.cut_layer].step_time_s(
            slow.ranks, weakest.devices[c]))
    assert [p["head"].layer_range for p in weakest.parts] == [(0, 1)] * 3
