"""FedCyBGD: block schedule, server update, per-client bytes and memory, downloads, resume, CLI."""
import json
from pathlib import Path

import pytest
import torch

from splitlora.aggregate import fedavg
from splitlora.strategies import make_strategy
from splitlora.strategies.fedcybgd import block_schedule, cycle_order
from splitlora.trainer import build, evaluate, load_run, train
from splitlora.wire import pack_tensors, unpack_tensors
from trainer_testutil import TINY_MODEL, tiny_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fedcybgd.yaml"


def _fedcybgd(tmp_path, *overrides):
    return tiny_config(tmp_path, "strategy=fedcybgd", "train.lr=1e-2", "train.aggregate_every=2", *overrides)


class _Spy:
    """Records every packet the strategy sends: (src, dst, round, packet)."""

    def __init__(self, transport):
        self.sent = []
        original = transport._send

        def spy(src, dst, kind, step, packet):
            assert kind == "adapters"
            self.sent.append((src, dst, transport.round_index, packet))
            original(src, dst, kind, step, packet)

        transport._send = spy

    def packets(self, src, dst, round_index):
        return [p for s, d, r, p in self.sent if s == src and d == dst and r == round_index]


def _start(cfg):
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    return built, strategy, _Spy(built.setup.transport)


def _run_round(built, strategy, round_index):
    every = built.cfg.train.aggregate_every
    losses = []
    for step in range(round_index * every, (round_index + 1) * every):
        built.setup.transport.set_round(round_index)
        losses.append(strategy.train_step(step).loss)
    strategy.end_round((round_index + 1) * every - 1)
    return losses


def _global(strategy):
    return {k: v.detach().clone() for k, v in strategy.model.named_parameters()}


def test_schedule_cycles_over_blocks_and_rotates_clients():
    # 2 clients, 5 blocks, 1 block each: each round trains the next 2 blocks of the cycle.
    rounds = [block_schedule(r, 2, 5, 1, "ascending", 0) for r in range(5)]
    assert rounds[:3] == [[[0], [1]], [[3], [2]], [[4], [0]]]
    visited = sorted(b for r in rounds for c in r for b in c)
    assert visited == sorted(list(range(5)) * 2)  # every block once per cycle
    assert block_schedule(0, 2, 5, 1, "descending", 0) == [[4], [3]]
    assert block_schedule(1, 2, 4, 2, "ascending", 0) == [[2, 3], [0, 1]]  # chunks rotate over clients
    perms = [cycle_order(c, 6, "random", 3) for c in range(3)]
    assert all(sorted(p) == list(range(6)) for p in perms) and perms[0] != perms[1]
    assert cycle_order(1, 6, "random", 3) == perms[1]  # reproducible (resume)
    with pytest.raises(ValueError, match="blocks_per_client"):
        block_schedule(0, 2, 3, 4, "ascending", 0)


def test_fedcybgd_learns(tmp_path):
    cfg = _fedcybgd(tmp_path, "fedcybgd.blocks=all", "train.steps=16", "train.aggregate_every=4")
    built, strategy, _ = _start(cfg)
    losses = [l for r in range(4) for l in _run_round(built, strategy, r)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    result = evaluate(strategy, built, generate=False)
    assert result["eval_loss"] == pytest.approx(torch.log(torch.tensor(result["eval_ppl"])).item(), rel=1e-6)


def test_round_trains_one_block_per_client_and_server_keeps_the_uploads(tmp_path):
    built, strategy, spy = _start(_fedcybgd(tmp_path))
    blocks = strategy.blocks
    assert [b.name for b in blocks] == ["layer.0", "layer.1", "layer.2"]
    for r in range(2):
        before = _global(strategy)
        assignment = strategy.assignment(r)
        assert all(len(a) == 1 for a in assignment) and len({a[0] for a in assignment}) == 2
        _run_round(built, strategy, r)
        after = _global(strategy)
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        for c, (b,) in enumerate(assignment):
            (packet,) = spy.packets(f"client{c}", "server", r)
            upload = unpack_tensors(packet)
            # A client uploads exactly its block, which changed, and the server now holds it as sent.
            assert set(upload) == set(blocks[b].params)
            assert any(not torch.equal(upload[k], before[k]) for k in upload)
            for k, v in upload.items():
                assert torch.equal(after[k], v), k
            # Bytes up = the block's serialized size.
            assert packet.numel() == pack_tensors({k: before[k] for k in blocks[b].params}).numel()
        assert changed <= {k for (b,) in assignment for k in blocks[b].params}
        # Full download: every client now holds the server's model exactly.
        assert all(h == (strategy.version[b], True) for row in strategy.held for b, h in enumerate(row))
        assert not strategy.snapshots
        ledger = built.setup.transport.ledger
        for c in range(2):
            (other,) = [a[0] for i, a in enumerate(assignment) if i != c]
            expected = pack_tensors({k: after[k] for k in blocks[other].params}).numel()
            assert ledger.round_total(r, client=f"client{c}", direction="down") == expected
            assert ledger.round_total(r, client=f"client{c}", direction="up") == \
                pack_tensors({k: after[k] for k in blocks[assignment[c][0]].params}).numel()
    # No cut: nothing but blocks crossed the network.
    assert ledger.total() == ledger.total(kind="adapters")


def test_memory_is_one_block_against_the_full_model(tmp_path):
    built, strategy, _ = _start(_fedcybgd(tmp_path, "train.aggregate_every=1"))
    result = strategy.train_step(0)
    layer = strategy.blocks[strategy.assignment(0)[0][0]]
    params = dict(strategy.model.named_parameters())
    block_params = sum(params[k].numel() for k in layer.params)
    e = result.extra
    assert e["trainable_params"] == block_params
    # AdamW: two moments per parameter (plus a step counter per tensor), for that block only.
    assert 2 * 4 * block_params <= e["optimizer_state_bytes"] <= 2 * 4 * block_params + 8 * len(layer.params)
    assert e["full_model_trainable_params"] == sum(p.numel() for p in strategy.model.parameters())
    assert e["full_model_optimizer_state_bytes"] == 8 * e["full_model_trainable_params"]
    # Full-model federated fine-tuning holds several times more training state per client.
    assert e["full_model_training_state_bytes"] > 3 * e["training_state_bytes"]
    report = strategy.memory_report()
    assert len(report["clients"]) == 2 and report["full_model"]["trainable_params"] == e["full_model_trainable_params"]
    # Bytes per client per round: one block up (its safetensors packet), against the whole model
    # that full-model federated fine-tuning would upload.
    strategy.end_round(0)
    report = strategy.memory_report()
    whole = sum(p.numel() * p.element_size() for p in strategy.model.parameters())
    assert report["full_model"]["round_bytes_per_direction"] == whole
    for c, entry in enumerate(report["clients"]):
        trained = strategy.blocks[entry["blocks"][0]]
        block_bytes = sum(params[k].numel() * params[k].element_size() for k in trained.params)
        assert block_bytes < entry["last_round_up_bytes"] < block_bytes + 4096  # plus the packet header
        assert entry["last_round_up_bytes"] < whole / 2
    # Time model: training the lowest layer costs a backward through everything above it.
    assert strategy._flops([0], 4, 16) > strategy._flops([2], 4, 16) > 0


def test_clients_training_the_same_block_are_averaged(tmp_path):
    # 4 clients, 3 blocks: two clients train one block in the same round; the server averages them.
    built, strategy, spy = _start(_fedcybgd(tmp_path, "train.clients=4", "data.partition=dirichlet",
                                            "data.dirichlet_alpha=0.3"))
    assignment = strategy.assignment(0)
    shared = [b for b in range(3) if sum(a == [b] for a in assignment) == 2]
    assert shared
    _run_round(built, strategy, 0)
    b = shared[0]
    cs = [c for c, a in enumerate(assignment) if a == [b]]
    uploads = [unpack_tensors(spy.packets(f"client{c}", "server", 0)[0]) for c in cs]
    expected = fedavg(uploads, [built.setup.client_weights[c] for c in cs])
    params = dict(strategy.model.named_parameters())
    for k, v in expected.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0)
    # Both trainers got the average back.
    assert all(strategy.held[c][b] == (strategy.version[b], True) for c in cs)


@pytest.mark.parametrize("mode", ["subset", "quantized"])
def test_compressed_downloads_are_smaller_and_training_starts_from_exact_blocks(tmp_path, mode):
    def down_bytes(m):
        built, strategy, _ = _start(_fedcybgd(tmp_path, "train.clients=3", f"fedcybgd.download={m}",
                                              "fedcybgd.download_bits=4", "fedcybgd.download_group_size=32"))
        for r in range(4):
            _run_round(built, strategy, r)
            following = strategy.assignment(r + 1)
            for c in range(3):
                for b in following[c]:
                    assert strategy.held[c][b] == (strategy.version[b], True)  # the next block to train is exact
        return built.setup.transport.ledger.total(direction="down"), strategy

    full, _ = down_bytes("full")
    got, strategy = down_bytes(mode)
    assert got < full
    lagging = [(c, b) for c, row in enumerate(strategy.held) for b, h in enumerate(row)
               if h != (strategy.version[b], True)]
    assert lagging  # some client holds a stale (subset) or quantized copy of some block ...
    c, b = lagging[0]
    copy = strategy.client_block(c, b)
    params = dict(strategy.model.named_parameters())
    differs = [k for k in copy if not torch.equal(copy[k], params[k])]
    assert differs  # ... which differs from the server's block
    if mode == "quantized":
        assert strategy.held[c][b][0] == strategy.version[b]  # current version, quantized
        k = max(differs, key=lambda k: params[k].numel())
        err = (copy[k] - params[k]).abs().max() / params[k].abs().max()
        assert 0 < err < 0.2  # 4-bit absmax groups: within half a step of the group's scale


def test_resume_equals_uninterrupted_and_export_model(tmp_path):
    extra = ["strategy=fedcybgd", "train.lr=1e-2", "train.steps=6", "train.aggregate_every=2", "train.clients=3",
             "fedcybgd.order=random", "fedcybgd.download=quantized", "fedcybgd.blocks=all"]
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(tiny_config(tmp_path, *extra, name="full"), **quiet)
    train(tiny_config(tmp_path, *extra, "train.steps=4", name="resumed"), **quiet)
    resumed = train(tiny_config(tmp_path, *extra, "resume=true", name="resumed"), **quiet)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert resumed["bytes_total"] == full["bytes_total"] > 0
    (_, a, _), (_, b, _) = (load_run(tmp_path / n, log=lambda *_: None) for n in ("full", "resumed"))
    for (k, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(x, y), k
    assert a.held == b.held and a.snapshots.keys() == b.snapshots.keys() and a.snapshots
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "step"]
    assert steps == list(range(6))

    # The trained model as a transformers folder gives the strategy's own logits.
    from transformers import AutoModelForCausalLM

    a.export_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    built = load_run(tmp_path / "full", log=lambda *_: None)[0]
    batch = built.eval_data.batch(list(range(4)))
    a.train(False)
    with torch.no_grad():
        expected = a.logits_fn()(batch["input_ids"], batch["attention_mask"])
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cli_trains_the_shipped_config(tmp_path, capsys):
    from splitlora.cli import main

    out = tmp_path / "cli"
    args = ["train", "--config", str(CONFIG), "--no-progress", *TINY_MODEL, f"output_dir={out}",
            "data.synthetic_examples=60", "data.num_eval=8", "train.clients=2", "train.batch_size=2", "train.steps=4",
            "train.aggregate_every=2", "eval.generate=false", "model.cut_layer=1"]
    assert main(args) == 0
    assert "fedcybgd" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "fedcybgd" and summary["eval_loss"] > 0
    assert summary["bytes_by_kind"]["adapters"] == summary["bytes_total"] > 0
    assert summary["codec"] == "no cut"
    # A full-parameter run hands over the fine-tuned model, which reloads to the run's own logits.
    from transformers import AutoModelForCausalLM

    from splitlora.trainer import load_run

    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    built, strategy, _ = load_run(out, log=lambda *_: None)
    batch = built.eval_data.batch(list(range(2)))
    strategy.train(False)
    with torch.no_grad():
        expected = strategy.logits_fn()(batch["input_ids"], batch["attention_mask"])
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # Per-step memory of a client (one block) next to full-model federated fine-tuning's.
    step_rows = [r for r in steps if r["type"] == "step"]
    assert all(0 < r["trainable_params"] < r["full_model_trainable_params"] for r in step_rows)


def test_state_mid_round_restores_the_private_blocks_and_optimizers(tmp_path):
    cfg = _fedcybgd(tmp_path, "train.aggregate_every=3", "fedcybgd.download=subset")
    built, a, _ = _start(cfg)
    _run_round(built, a, 0)
    a.train_step(3)
    state = a.state_dict()
    loaders = [l.state_dict() for l in built.setup.loaders]
    torch_rng = torch.get_rng_state()
    a.train_step(4)
    expected = {c: {k: p.detach().clone() for k, p in w.params.items()} for c, w in enumerate(a._active)}

    built2, b, _ = _start(cfg)
    b.load_state_dict(state)
    for loader, s in zip(built2.setup.loaders, loaders):
        loader.load_state_dict(s)
    torch.set_rng_state(torch_rng)
    b.train_step(4)
    for c, w in enumerate(b._active):
        for k, p in w.params.items():
            assert torch.equal(p, expected[c][k]), k


@pytest.mark.parametrize("override, key", [
    ("fedcybgd.order=sideways", "fedcybgd.order"),
    ("fedcybgd.blocks_per_client=0", "fedcybgd.blocks_per_client"),
    ("fedcybgd.blocks=heads", "fedcybgd.blocks"),
    ("fedcybgd.download=some", "fedcybgd.download"),
    ("fedcybgd.download_fraction=0", "fedcybgd.download_fraction"),
    ("fedcybgd.download_fraction=1.5", "fedcybgd.download_fraction"),
    ("fedcybgd.download_bits=3", "fedcybgd.download_bits"),
    ("fedcybgd.download_group_size=48", "fedcybgd.download_group_size"),
    ("fedcybgd.oder=random", "fedcybgd.oder"),
])
def test_config_errors_name_the_key(override, key):
    from splitlora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(CONFIG, [override])


def test_more_blocks_per_client_than_blocks_is_an_error(tmp_path):
    built = build(_fedcybgd(tmp_path, "fedcybgd.blocks_per_client=4"), log=lambda *_: None)
    with pytest.raises(ValueError, match="blocks_per_client must be in \\[1, 3\\]"):
        make_strategy(built.setup)
