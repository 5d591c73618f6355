"""The trainer's strategies: equivalences, aggregation, accounting, resume, U-shape, export."""
import json

import pytest
import torch

from splitlora.adapters import adapter_state
from splitlora.strategies import make_strategy
from splitlora.timemodel import SimTime
from splitlora.trainer import build, evaluate, train
from splitlora.wire import unpack_tensors
from trainer_testutil import tiny_config


def _run_steps(cfg, steps):
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    losses = []
    for step in range(steps):
        built.setup.transport.set_round(step // cfg.train.aggregate_every)
        losses.append(strategy.train_step(step).loss)
        if strategy.aggregates and (step + 1) % cfg.train.aggregate_every == 0:
            strategy.end_round(step)
    return built, strategy, losses


def _whole_model_adapters(strategy):
    return strategy.export_state()[1]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_client_uncompressed_splitlora_equals_centralized(tmp_path, optimizer):
    # 1 client, no compression, no aggregation inside the window, no clipping: SplitLoRA's
    # client+server adapters must follow centralized LoRA on the whole (unsplit) model.
    common = ["train.clients=1", "codec.bits=32", "train.aggregate_every=100", "train.max_grad_norm=null",
              f"train.optimizer={optimizer}", "train.lr=0.01",
              "lora.server.target_modules=[c_attn,c_proj]"]
    _, sfl, sfl_losses = _run_steps(tiny_config(tmp_path, "strategy=splitlora", *common), 5)
    _, cen, cen_losses = _run_steps(tiny_config(tmp_path, "strategy=centralized", *common), 5)
    a, b = _whole_model_adapters(sfl), _whole_model_adapters(cen)
    assert set(a) == set(b) and len(a) > 0
    # The adapters moved away from their initial values (B starts at zero) ...
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-4
    # ... and the two runs agree to float32 round-off.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert sfl_losses == pytest.approx(cen_losses, rel=1e-5)


def test_fedavg_round_makes_clients_equal_and_is_weighted_mean(tmp_path):
    cfg = tiny_config(tmp_path, "train.clients=3", "train.aggregate_every=2")
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    for step in range(2):
        strategy.train_step(step)
    before = [adapter_state(p) for p in strategy.parts]
    assert not torch.equal(before[0][next(iter(before[0]))], before[1][next(iter(before[1]))])
    strategy.end_round(1)
    after = [adapter_state(p) for p in strategy.parts]
    w = torch.tensor(built.setup.client_weights, dtype=torch.float64)
    for key in before[0]:
        expected = sum(float(wi) * b[key].double() for wi, b in zip(w / w.sum(), before))
        for a in after:
            torch.testing.assert_close(a[key].double(), expected, rtol=1e-6, atol=1e-7)
    ledger = built.setup.transport.ledger
    assert ledger.total(kind="adapters", direction="up") == ledger.total(kind="adapters", direction="down") > 0


def test_accounting_matches_codec_packet_sizes(tmp_path):
    from splitlora.codec import packed_size

    # Fixed shapes (every batch padded to the training set's longest): one packet size.
    cfg = tiny_config(tmp_path, "codec.bits=4", "codec.group_size=32", "train.aggregate_every=100",
                      "data.pad_to=dataset")
    built, strategy, _ = _run_steps(cfg, 2)
    s = built.setup
    hidden = 32
    expected_per_message = packed_size((cfg.train.batch_size, s.seq_len, hidden), bits=4, group_size=32)
    ledger = s.transport.ledger
    n_messages = cfg.train.clients * 2  # clients x steps
    assert ledger.total(kind="activations") == n_messages * expected_per_message
    assert ledger.total(kind="gradients") == n_messages * expected_per_message
    # int4 is far smaller than the fp32 exchange of the same tensors.
    fp32 = n_messages * cfg.train.batch_size * s.seq_len * hidden * 4
    assert ledger.total(kind="activations") < fp32 / 6


def test_server_batches_all_clients_in_one_pass(tmp_path):
    cfg = tiny_config(tmp_path, "train.clients=3")
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    calls = []
    handle = strategy.server.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    strategy.train_step(0)
    handle.remove()
    assert calls == [3 * cfg.train.batch_size]


def test_u_shape_keeps_labels_on_the_client(tmp_path):
    cfg = tiny_config(tmp_path, "train.u_shape=true", "model.cut_layer=1", "model.server_end=2")
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    sent = []
    transport = built.setup.transport
    original = transport._send

    def spy(src, dst, kind, step, packet):
        sent.append((src, dst, kind, packet))
        original(src, dst, kind, step, packet)

    transport._send = spy
    losses = [strategy.train_step(step).loss for step in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    metas = [unpack_tensors(p) for src, dst, kind, p in sent if kind == "labels"]
    assert metas and all(set(m) == {"attention_mask"} for m in metas)
    # Activations go both ways (up at the first cut, down at the second), gradients too.
    kinds = {(src == "server", kind) for src, dst, kind, _ in sent}
    assert {(False, "activations"), (True, "activations"), (False, "gradients"), (True, "gradients")} <= kinds
    # The client tail (LM head side) has adapters and they train.
    tail_state = adapter_state(strategy.parts[0]["tail"])
    assert tail_state and any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in tail_state.items())


def test_u_shape_one_client_matches_plain_split(tmp_path):
    # Where the head sits does not change the maths: 1 client, no compression.
    common = ["train.clients=1", "codec.bits=32", "train.max_grad_norm=null", "train.aggregate_every=100",
              "lora.client.target_modules=[c_attn]", "lora.server.target_modules=[c_attn]"]
    _, plain, plain_losses = _run_steps(tiny_config(tmp_path, *common), 3)
    _, u, u_losses = _run_steps(tiny_config(tmp_path, "train.u_shape=true", "model.server_end=2", *common), 3)
    assert plain_losses[0] == pytest.approx(u_losses[0], rel=1e-5)
    a, b = _whole_model_adapters(plain), _whole_model_adapters(u)
    assert set(a) == set(b)
    # The server/tail boundary moves layer 2's adapters from server to client: different learning-rate
    # schedules do not apply here (same optimizer settings), so values must agree.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("strategy", ["splitlora", "sl", "fedlora", "centralized"])
def test_every_strategy_learns(tmp_path, strategy):
    # LoRA on the LM head lets a random tiny model learn in a few steps.
    cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.lr=0.03", "train.steps=24",
                      "train.aggregate_every=4", "lora.client.r=4", "lora.server.r=4",
                      "lora.server.target_modules=[c_attn,lm_head]")
    built, strat, losses = _run_steps(cfg, 24)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    result = evaluate(strat, built, generate=False)
    assert result["eval_loss"] == pytest.approx(torch.log(torch.tensor(result["eval_ppl"])).item(), rel=1e-6)


def test_lr_multiplier_schedules():
    from types import SimpleNamespace

    from splitlora.strategies.base import lr_multiplier

    def t(schedule, warmup=2, steps=10):
        return SimpleNamespace(lr_schedule=schedule, warmup_steps=warmup, steps=steps)

    for schedule in ("constant", "linear", "cosine"):  # the same warmup for all
        assert [lr_multiplier(k, t(schedule)) for k in (0, 1)] == [0.5, 1.0]
    assert [lr_multiplier(k, t("constant")) for k in (2, 9, 50)] == [1.0, 1.0, 1.0]
    # Linear: 8 steps after the warmup, the last one (step 9) at 0.
    assert [lr_multiplier(k, t("linear")) for k in range(2, 10)] == pytest.approx([7 / 8, 6 / 8, 5 / 8, 4 / 8,
                                                                                3 / 8, 2 / 8, 1 / 8, 0.0])
    # Cosine: half-way down at the middle of the decay, 0 at the end, never below 0 after it.
    assert lr_multiplier(5, t("cosine")) == pytest.approx(0.5)
    assert lr_multiplier(9, t("cosine")) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(20, t("cosine")) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(0, t("linear", warmup=0, steps=4)) == pytest.approx(0.75)


@pytest.mark.parametrize("strategy", ["splitlora", "sl", "fedlora", "centralized"])
def test_every_party_follows_the_global_lr_schedule(tmp_path, strategy):
    """The learning rate of every optimizer (each client's, the server's) after global step k is
    lr x lr_multiplier(k + 1), whatever the number of updates a party makes per step (vanilla SL's
    server updates once per client)."""
    from splitlora.strategies.base import Side, lr_multiplier

    cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.lr_schedule=linear", "train.warmup_steps=1",
                      "train.steps=5", "train.clients=3")
    built = build(cfg, log=lambda *_: None)
    strat = make_strategy(built.setup)
    sides = [v for v in vars(strat).values() if isinstance(v, Side)]
    sides += [x for v in vars(strat).values() if isinstance(v, list) for x in v if isinstance(x, Side)]
    assert sides
    for step in range(4):
        built.setup.transport.set_round(step // cfg.train.aggregate_every)
        strat.train_step(step)
        want = cfg.train.lr * lr_multiplier(step + 1, cfg.train)
        for side in sides:
            assert side.optimizer.param_groups[0]["lr"] == pytest.approx(want), (step, side)


@pytest.mark.parametrize("strategy, extra", [
    ("splitlora", ["codec.bits=8"]), ("sl", []), ("fedlora", []), ("centralized", []),
    ("splitlora", ["train.u_shape=true", "model.server_end=2"]), ("fedcybgd", ["fedcybgd.blocks=all"]),
])
def test_recorded_link_parts_reprice_to_another_network(tmp_path, strategy, extra):
    """The simulated time re-priced from one run's recorded link parts (what bench.report does)
    equals what a run on the other network simulates: the time model does not change training,
    and with alike clients the critical path is the same."""
    runs = {}
    for name, net in (("slow", ["network.bandwidth_mbps=50", "network.latency_ms=20"]),
                      ("fast", ["network.bandwidth_mbps=4000", "network.latency_ms=0.5"])):
        cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.eval_every=3", *extra, *net, name=name)
        train(cfg, progress=False, log=lambda *_: None)
        runs[name] = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    slow, fast = ([r for r in runs[k] if r["type"] in ("step", "eval")] for k in ("slow", "fast"))
    assert [(r["type"], r["step"]) for r in slow] == [(r["type"], r["step"]) for r in fast]
    for a, b in zip(slow, fast):
        repriced = SimTime(a["sim_time_s"], messages=a["sim_link_messages"], bits=a["sim_link_bits"],
                           link_seconds=a["sim_link_s"]).at(4000.0, 0.5)
        assert repriced == pytest.approx(b["sim_time_s"], rel=1e-9, abs=1e-12), (a, b)
        assert (a["sim_link_messages"], a["sim_link_bits"]) == (b["sim_link_messages"], b["sim_link_bits"])
    if strategy != "centralized":  # centralized sends nothing
        assert slow[-1]["sim_link_messages"] > 0 and slow[-1]["sim_link_s"] > 0.5 * slow[-1]["sim_time_s"]
    else:
        assert slow[-1]["sim_link_messages"] == 0 and slow[-1]["sim_time_s"] == fast[-1]["sim_time_s"]


@pytest.mark.parametrize("strategy, extra", [
    ("centralized", []), ("fedlora", []), ("splitlora", ["codec.bits=4"]), ("sl", []),
    ("splitlora", ["train.u_shape=true", "model.server_end=2"]),
])
def test_exact_export_computes_what_logits_fn_computes(tmp_path, strategy, extra):
    # The trainer generates with the exported whole model of these strategies (a transformers
    # model, decoded with its KV cache): it must be the model that logits_fn evaluates, at a
    # round's end and mid-round (FedAvg of the client adapters), LM head adapter included.
    from splitlora.trainer import _generation_model

    cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.lr=0.03", "lora.server.target_modules=[c_attn,lm_head]",
                      *extra)
    built, strat, _ = _run_steps(cfg, 4)  # aggregate_every=3: step 4 is inside the second round
    assert strat.exact_export
    state = strat.export_state()[1]
    assert max(float(v.abs().max()) for k, v in state.items() if k.endswith("lora_B")) > 1e-3  # trained
    strat.train(False)
    whole = _generation_model(strat, built)
    batch = built.eval_data.batch(range(8), trim=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out = strat.logits_fn()(batch["input_ids"], batch["attention_mask"])
        expected = getattr(out, "logits", out)
        got = whole(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    # The generation model holds new adapters but the base model's weights, not a copy of them.
    base = {id(p) for p in built.setup.base_model.parameters()}
    frozen = [p for p in whole.parameters() if not p.requires_grad]
    assert frozen and all(id(p) in base for n, p in whole.named_parameters() if "lora_" not in n)
    assert not any(id(p) in base for n, p in whole.named_parameters() if "lora_" in n)


def test_whole_model_on_another_device_is_a_copy_there(tmp_path):
    """The base model stays in host memory; a whole model wanted elsewhere (a GPU; here the meta
    device, which every machine has) gets its own weights there and leaves the base model as is."""
    from splitlora.adapters import whole_model_with_adapters

    built, strat, _ = _run_steps(tiny_config(tmp_path), 1)
    plans, state = strat.export_state()
    base = built.setup.base_model
    whole = whole_model_with_adapters(base, plans, state, device="meta")
    assert all(p.is_meta for p in whole.parameters())
    assert all(p.device.type == "cpu" for p in base.parameters())
    shapes = {n: p.shape for n, p in base.named_parameters()}
    assert {n: p.shape for n, p in whole.named_parameters() if n in shapes} == shapes
    assert sum("lora_" in n for n, _ in whole.named_parameters()) == len(state)


@pytest.mark.parametrize("strategy", ["centralized", "hsplitlora", "fedcybgd"])
def test_training_leaves_the_base_model_as_loaded(tmp_path, strategy):
    """The base model's weights are shared (centralized's model, exports) or read (HSplitLoRA's
    deltas, FedCyBGD's copy), never trained: after training they equal a fresh load's."""
    extra = ["fedcybgd.blocks=all"] if strategy == "fedcybgd" else []
    cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.lr=0.03", *extra)
    built = build(cfg, log=lambda *_: None)
    as_loaded = {k: v.clone() for k, v in built.setup.base_model.state_dict().items()}
    strat = make_strategy(built.setup)
    for step in range(6):
        built.setup.transport.set_round(step // cfg.train.aggregate_every)
        strat.train_step(step)
        if (step + 1) % cfg.train.aggregate_every == 0:
            strat.end_round(step)
    assert not any(p.requires_grad for p in built.setup.base_model.parameters())
    for name, value in built.setup.base_model.state_dict().items():
        torch.testing.assert_close(value, as_loaded[name], rtol=0, atol=0, msg=name)
    # ...while the strategy did train (so an unchanged base model is not an idle run's).
    if strategy == "fedcybgd":
        trained = strat.model.state_dict()
        assert any(not torch.equal(trained[k], v) for k, v in as_loaded.items())
    else:
        state = strat.export_state()[1]
        assert max(float(v.abs().max()) for k, v in state.items() if k.endswith("lora_B")) > 0
    if strategy == "centralized":  # its model trains adapters over the shared base weights
        shared = {id(p) for p in built.setup.base_model.parameters()}
        assert any(id(p) in shared for p in strat.model.parameters())


def test_client_processes_keep_the_server_layers_off_their_device():
    from torch import nn

    from splitlora.trainer import segments_on_device

    client, server, tail = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)
    assert segments_on_device(client, server, None, "client1") == [client]
    assert segments_on_device(client, server, tail, "client0") == [client, tail]
    assert segments_on_device(client, server, None, "server") == [client, server]
    assert segments_on_device(client, server, tail, None) == [client, server, tail]


def test_a_client_process_lets_the_whole_model_go(tmp_path):
    cfg = tiny_config(tmp_path)
    client = build(cfg, log=lambda *_: None, role="client1").setup
    assert client.base_model is None
    # ...and the server's layers: shapes and dtypes only (meta tensors), no weights.
    assert all(p.is_meta for p in client.server.parameters())
    assert not any(p.is_meta for p in client.client.parameters())
    assert build(cfg, log=lambda *_: None, role="server").setup.base_model is not None


@pytest.mark.parametrize("strategy, extra", [
    ("splitlora", []), ("centralized", []), ("fedlora", []), ("sl", []),
    ("splitlora", ["train.u_shape=true", "model.server_end=2"]), ("hsplitlora", []),
    ("fedcybgd", ["fedcybgd.blocks=all"]),
])
def test_batches_padded_to_their_own_length_train_the_same(tmp_path, strategy, extra):
    """data.pad_to=batch (each batch as long as its longest sequence; the server pads a group of
    clients to the longest of them) computes what data.pad_to=dataset does: right padding under
    causal attention changes no real position. It sends fewer bytes and counts fewer flops."""
    no_dropout = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0"]
    results = {}
    for pad in ("batch", "dataset"):
        cfg = tiny_config(tmp_path, f"strategy={strategy}", "codec.bits=32", f"data.pad_to={pad}", *no_dropout,
                          *extra, name=pad)
        built = build(cfg, log=lambda *_: None)
        strat = make_strategy(built.setup)
        losses, sims = [], []
        for step in range(4):
            built.setup.transport.set_round(step // cfg.train.aggregate_every)
            r = strat.train_step(step)
            losses.append(r.loss)
            sims.append(r.sim_time_s)
            if strat.aggregates and (step + 1) % cfg.train.aggregate_every == 0:
                strat.end_round(step)
        results[pad] = (losses, sims, built.setup.transport.ledger.total(kind="activations"),
                        strat.export_state()[1] if strategy not in ("hsplitlora", "fedcybgd") else {})
    (l_b, s_b, bytes_b, st_b), (l_d, s_d, bytes_d, st_d) = results["batch"], results["dataset"]
    assert l_b == pytest.approx(l_d, rel=1e-5, abs=1e-6)
    for k in st_d:
        torch.testing.assert_close(st_b[k], st_d[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sum(s_b) < sum(s_d)
    if strategy not in ("centralized", "fedlora", "fedcybgd"):
        assert 0 < bytes_b < bytes_d


@pytest.mark.parametrize("strategy", ["splitlora", "sl", "fedlora", "centralized", "hsplitlora"])
def test_memory_per_side(tmp_path, strategy):
    """Per side: the weights that side holds, and activations measured on its forward. The
    server's forward saves at least the log-probabilities of its loss (rows x (T-1) x vocab, fp32)."""
    cfg = tiny_config(tmp_path, f"strategy={strategy}", "data.pad_to=dataset")
    built, strat, _ = _run_steps(cfg, 2)
    mem = strat.memory_per_side()
    s = built.setup
    vocab = s.server.config.vocab_size
    if strategy in ("splitlora", "sl", "hsplitlora"):
        client_weights = sum(p.numel() * p.element_size() for p in strat.parts[0].parameters())
        assert mem["client"]["weights_bytes"] == client_weights
        assert mem["server"]["weights_bytes"] == sum(p.numel() * p.element_size() for p in strat.server.parameters())
        rows = cfg.train.batch_size * (cfg.train.clients if strategy != "sl" else 1)
        assert mem["server"]["activation_bytes"] >= rows * (s.seq_len - 1) * vocab * 4
        assert 0 < mem["client"]["activation_bytes"] < mem["server"]["activation_bytes"]
    elif strategy == "fedlora":
        assert mem["server"] is None
        assert mem["client"]["weights_bytes"] == sum(p.numel() * p.element_size() for p in strat.models[0].parameters())
        assert mem["client"]["activation_bytes"] >= cfg.train.batch_size * (s.seq_len - 1) * vocab * 4
    else:
        assert mem["client"] is None
        rows = cfg.train.batch_size * cfg.train.clients
        assert mem["server"]["activation_bytes"] >= rows * (s.seq_len - 1) * vocab * 4
    for side in (m for m in mem.values() if m is not None):
        assert side["optimizer_bytes"] >= 2 * side["gradient_bytes"] > 0  # AdamW's two moments
        assert side["total_bytes"] == sum(side[k] for k in ("weights_bytes", "gradient_bytes", "optimizer_bytes",
                                                            "activation_bytes"))


def test_sl_hands_adapters_from_client_to_client(tmp_path):
    cfg = tiny_config(tmp_path, "strategy=sl", "train.clients=3")
    built, _, _ = _run_steps(cfg, 2)
    ledger = built.setup.transport.ledger
    # every client hands off once per step (up to the server, down to the next client)
    assert ledger.total(kind="adapters", direction="up") > 0
    for c in range(3):
        assert ledger.total(client=f"client{c}", kind="adapters", direction="up") > 0
        assert ledger.total(client=f"client{c}", kind="activations") > 0


def test_resume_equals_uninterrupted(tmp_path):
    extra = ["codec.bits=4", "codec.error_feedback=true", "codec.stochastic=true", "lora.client.dropout=0.1",
             "train.steps=6", "train.aggregate_every=2"]
    full = train(tiny_config(tmp_path, *extra, name="full"), progress=False, log=lambda *_: None)

    # Same run, stopped after 4 steps (2 rounds, checkpointed), then resumed to 6.
    stopped_cfg = tiny_config(tmp_path, *extra, "train.steps=4", name="resumed")
    train(stopped_cfg, progress=False, log=lambda *_: None)
    # The stopped run ended at step 4 and wrote its final checkpoint there; resume to step 6.
    resumed = train(tiny_config(tmp_path, *extra, "resume=true", name="resumed"), progress=False,
                    log=lambda *_: None)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert resumed["bytes_total"] == full["bytes_total"]
    assert resumed["memory_per_side"] == full["memory_per_side"]  # the peaks before the stop are kept
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "step"]
    assert steps == list(range(6))


def test_run_folder_and_peft_export(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = tiny_config(tmp_path, "eval.generate=true", "lora.server.target_modules=[c_attn,c_proj]")
    summary = train(cfg, progress=False, log=lambda *_: None)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/latest"):
        assert (out / name).exists(), name
    assert summary["bytes_total"] == sum(summary["bytes_by_kind"].values())
    assert 0 <= summary["bleu"] <= 100
    # Every decoded output is in generations.jsonl (the summary keeps a few samples), and they
    # reproduce the recorded BLEU.
    from splitlora.evaluate import corpus_bleu

    outputs = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert len(outputs) == cfg.eval.max_sources and "outputs" not in summary
    assert outputs[:len(summary["samples"])] == summary["samples"]
    assert corpus_bleu([o["hypothesis"] for o in outputs], [o["references"] for o in outputs]) == \
        pytest.approx(summary["bleu"], abs=1e-9)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"step", "round", "eval"}
    sim = [r["sim_time_s"] for r in records if r["type"] == "step"]
    assert all(b > a for a, b in zip(sim, sim[1:]))
    # An evaluation carries the training time so far (evaluations excluded) and its own duration.
    last_step = [r for r in records if r["type"] == "step"][-1]
    final_eval = [r for r in records if r["type"] == "eval"][-1]
    assert final_eval["wall_time_s"] == last_step["wall_time_s"] and final_eval["eval_time_s"] > 0

    # The exported adapter on the whole model gives the strategy's own logits.
    from splitlora.trainer import load_run

    built, strategy, step = load_run(out, log=lambda *_: None)
    assert step == cfg.train.steps
    base = built.setup.base_model
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    batch = built.eval_data.batch(list(range(4)))
    strategy.train(False)
    with torch.no_grad():
        expected = strategy.logits_fn()(batch["input_ids"], batch["attention_mask"])
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_background_encoding_changes_nothing(tmp_path):
    # Overlapping compression with compute must not change a bit: same packets, same adapters.
    extra = ["codec.bits=4", "codec.error_feedback=true", "codec.stochastic=true", "train.clients=3"]
    _, on, on_losses = _run_steps(tiny_config(tmp_path, *extra, "codec.overlap=true"), 4)
    _, off, off_losses = _run_steps(tiny_config(tmp_path, *extra, "codec.overlap=false"), 4)
    assert on_losses == off_losses
    a, b = _whole_model_adapters(on), _whole_model_adapters(off)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert on.transport.ledger.summary() == off.transport.ledger.summary()


def test_dirichlet_partition_weights_fedavg_by_samples(tmp_path):
    cfg = tiny_config(tmp_path, "data.partition=dirichlet", "data.dirichlet_alpha=0.1", "train.clients=3",
                      "data.synthetic_examples=90")
    built = build(cfg, log=lambda *_: None)
    weights = built.setup.client_weights
    assert sum(weights) == len(built.train_data) and len(set(weights)) > 1  # skewed shards
    assert [len(l) for l in built.setup.loaders] == [int(w) for w in weights]


def test_training_steps_run_in_train_mode(tmp_path, monkeypatch):
    # Models load in eval mode; a training step must see every module in train mode (LoRA dropout on).
    from splitlora.strategies.splitfed import SplitLoRA

    seen = []
    original = SplitLoRA.train_step

    def spy(self, step):
        modules = list(self.server.modules()) + [m for p in self.parts for m in p.modules()]
        seen.append(all(m.training for m in modules))
        return original(self, step)

    monkeypatch.setattr(SplitLoRA, "train_step", spy)
    train(tiny_config(tmp_path, "train.steps=2", "train.aggregate_every=1"), progress=False, log=lambda *_: None)
    assert seen == [True, True]


def test_evaluation_is_told_the_run_device(tmp_path, monkeypatch):
    """A split strategy's logits_fn is a closure without parameters, so evaluate_loss cannot read
    the device off it: the trainer passes the run's device to both evaluations (on CUDA the token
    ids otherwise stayed on the host and the first evaluation failed; a GPU test runs it for real)."""
    import splitlora.evaluate as ev

    built = build(tiny_config(tmp_path, "strategy=splitlora", "eval.generate=true"), log=lambda *_: None)
    strategy = make_strategy(built.setup)
    assert not isinstance(strategy.logits_fn(), torch.nn.Module)  # what makes the device necessary
    seen = {}
    for name in ("evaluate_loss", "evaluate_generation"):
        real = getattr(ev, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = kwargs.get("device")
            return _real(*args, **kwargs)

        monkeypatch.setattr(ev, name, spy)
    evaluate(strategy, built, generate=True)
    assert seen == {"evaluate_loss": built.device, "evaluate_generation": built.device}


def test_a_client_process_reads_only_its_layers_of_a_saved_model(tmp_path, monkeypatch):
    """With a saved model, a client process loads its embeddings and bottom layers and nothing else
    (models.load_bottom_layers; the whole model is never built), and trains the same client segment
    as a process that loaded everything."""
    import splitlora.models as models

    built = build(tiny_config(tmp_path, name="save"), log=lambda *_: None)
    folder, words = tmp_path / "model", tmp_path / "words.json"
    built.setup.base_model.save_pretrained(folder)
    built.tokenizer.save(words)
    saved = ["model.config=null", f"model.path={folder}", f"data.tokenizer={words}"]
    whole = build(tiny_config(tmp_path, *saved, name="whole"), log=lambda *_: None, role="server").setup

    def whole_model_load(**_):
        raise AssertionError("a client process loaded the whole model")

    monkeypatch.setattr(models, "load_causal_lm", whole_model_load)
    client = build(tiny_config(tmp_path, *saved, name="client"), log=lambda *_: None, role="client1").setup
    assert client.base_model is None
    assert all(p.is_meta for p in client.server.parameters())
    a, b = client.client.state_dict(), whole.client.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: p.shape for n, p in client.server.named_parameters()} == \
        {n: p.shape for n, p in whole.server.named_parameters()}


@pytest.mark.parametrize("strategy", ["splitlora", "sl"])
def test_u_shape_default_server_end_is_the_explicit_one(tmp_path, strategy):
    """model.server_end null means num_layers - 1 (config.validate_model_layers): the run, its
    simulated flops included, equals one that names it (it used to fail computing the tail's flops)."""
    runs = {}
    for name, end in (("default", []), ("explicit", ["model.server_end=2"])):  # the tiny model has 3 layers
        cfg = tiny_config(tmp_path, f"strategy={strategy}", "train.u_shape=true", *end, name=name)
        train(cfg, progress=False, log=lambda *_: None)
        runs[name] = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if json.loads(l)["type"] == "step"]
    assert len(runs["default"]) == 6
    for a, b in zip(runs["default"], runs["explicit"]):
        assert (a["loss"], a["sim_client_flops"], a["sim_server_flops"]) == (b["loss"], b["sim_client_flops"],
                                                                            b["sim_server_flops"])
