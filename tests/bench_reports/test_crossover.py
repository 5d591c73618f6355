"""The time-to-target map (bench.crossover): re-pricing a recorded run for other devices and links,
and the per-party flops and bytes it prices at the real shapes."""
import json

import pytest

from bench import crossover
from splitlora.config import load_config
from splitlora.timemodel import SIM_COMPUTE_KEYS, sim_time_from_record

TINY = ["model.config.n_layer=3", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=96",
        "model.config.activation_function=gelu_pytorch_tanh", "data.synthetic_examples=120", "data.num_eval=16",
        "data.max_length=96", "train.clients=2", "train.batch_size=4", "train.steps=6", "train.aggregate_every=3",
        "train.eval_every=3", "train.log_every=2", "eval.generate=false", "eval.max_sources=2",
        "eval.max_new_tokens=8", "model.cut_layer=1"]


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):  # it trains tiny models (tests/conftest.py)
    yield


def _records(tmp_path, name, overrides):
    from splitlora.trainer import train

    cfg = load_config(None, TINY + [f"output_dir={tmp_path / name}", *overrides])
    train(cfg, progress=False, log=lambda *_: None)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] in ("step", "eval")]


@pytest.mark.parametrize("strategy, extra", [
    ("splitlora", ["codec.bits=8"]), ("fedlora", []), ("centralized", []), ("sl", []),
    ("splitlora", ["train.u_shape=true", "model.server_end=2"]),
])
def test_recorded_run_reprices_to_other_devices_and_links(tmp_path, strategy, extra):
    """A run re-priced from its records for other client and server TFLOPS and another link equals
    a fresh run trained at that setting, step by step (homogeneous clients: exact to rounding)."""
    here = ["network.client_tflops=0.5", "network.server_tflops=35.6", "network.bandwidth_mbps=50",
            "network.latency_ms=20"]
    there = ["network.client_tflops=7", "network.server_tflops=989", "network.bandwidth_mbps=4000",
             "network.latency_ms=0.5"]
    a = _records(tmp_path, "here", [f"strategy={strategy}", *extra, *here])
    b = _records(tmp_path, "there", [f"strategy={strategy}", *extra, *there])
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert all(k in ra for k in SIM_COMPUTE_KEYS)
        assert ra["sim_client_flops"] == rb["sim_client_flops"] and ra["sim_server_flops"] == rb["sim_server_flops"]
        got = sim_time_from_record(ra).at(4000.0, 0.5, client_tflops=7.0, server_tflops=989.0)
        assert got == pytest.approx(rb["sim_time_s"], rel=1e-9, abs=1e-15), (ra, rb)
    last = a[-1]
    if strategy == "centralized":  # one party, listed as the server
        assert last["sim_client_flops"] == 0 and last["sim_server_flops"] > 0
    elif strategy == "fedlora":  # clients train the whole model; the server only averages
        assert last["sim_client_flops"] > 0 and last["sim_server_flops"] == 0
    else:
        assert last["sim_client_flops"] > 0 and last["sim_server_flops"] > 0
    # Compute that no TFLOPS re-prices: none (every party's compute goes through the time model).
    sim = sim_time_from_record(last)
    assert sim.compute_seconds == pytest.approx(sim.client_seconds + sim.server_seconds, rel=1e-9)


def test_flops_per_party_match_a_hand_count_for_one_gpt2_and_one_llama_layer():
    """One layer's forward flops as bench.crossover counts them at the real shapes equal a hand
    count and what the trainer's time model counts for the same layer built by transformers."""
    import torch
    from transformers import GPT2Config, LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from splitlora.timemodel import forward_flops, matmul_params

    rows, seq = 4, 512
    tokens = rows * seq
    # GPT-2 medium: c_attn 1024x3072, attn c_proj 1024x1024, c_fc 1024x4096, mlp c_proj 4096x1024
    # = 12,582,912 weights; attention 4 x tokens x seq x 1024.
    gpt2 = next(s for s in crossover.SHAPES if s.name == "gpt2-medium")
    hand = 2 * tokens * 12_582_912 + 4 * tokens * seq * 1024
    assert crossover.layer_forward_flops(gpt2, rows, seq) == hand == 55_834_574_848
    # LoRA r 8 on c_attn: A 1024x8 and B 8x3072.
    assert crossover.layer_matmul_params(gpt2, 8) - crossover.layer_matmul_params(gpt2, 0) == 8 * 1024 + 8 * 3072
    # Llama-7B: q, k, v, o 4096x4096 each, gate, up 4096x11008, down 11008x4096 = 202,375,168.
    llama = next(s for s in crossover.SHAPES if s.name == "llama-7b")
    assert crossover.layer_forward_flops(llama, rows, seq) == 2 * tokens * 202_375_168 + 4 * tokens * seq * 4096
    # Llama-1B (grouped-query attention): k and v are 2048x512.
    llama1b = next(s for s in crossover.SHAPES if s.name == "llama-1b")
    assert crossover.layer_matmul_params(llama1b) == 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192

    # The same count as the time model's for real layers (small widths, same structure).
    torch.manual_seed(0)
    small_gpt2 = crossover.Shape("g", "g", "gpt2", 1, 64, 256, 64, 100, 1)
    block = GPT2Block(GPT2Config(n_embd=64, n_head=4, n_inner=None, n_layer=1))
    assert matmul_params(block) == crossover.layer_matmul_params(small_gpt2)
    assert forward_flops(block, 2, 16, 1, 64) == crossover.layer_forward_flops(small_gpt2, 2, 16)
    small_llama = crossover.Shape("l", "l", "llama", 1, 64, 176, 16, 100, 1)
    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                          num_key_value_heads=1, num_hidden_layers=1), layer_idx=0)
    assert matmul_params(layer) == crossover.layer_matmul_params(small_llama)
    assert forward_flops(layer, 2, 16, 1, 64) == crossover.layer_forward_flops(small_llama, 2, 16)


def test_step_parts_per_party_and_bytes_at_the_cut():
    """The per-step SimTime of each strategy keeps its flops on the right party, the bytes at the
    cut follow the codec (int8: 8.5 bits a value plus a header), and re-pricing moves only what it
    should: centralized ignores clients and links, fedlora ignores the server."""
    shape = next(s for s in crossover.SHAPES if s.name == "gpt2-medium")
    setting = crossover.Setting()
    f = crossover.party_flops(shape, setting)
    split, _ = crossover.step_and_round("splitlora", shape, setting, bits=8)
    assert split.client_flops == 2 * f["head"] and split.server_flops == 2 * f["server"]
    assert split.messages == 2
    up8, down8 = crossover.cut_bytes(shape, setting, 8)
    up32, down32 = crossover.cut_bytes(shape, setting, 32)
    values = setting.batch * setting.seq * shape.hidden
    assert 4 * values < down32 < 4 * values + 200 and 3.7 < down32 / down8 < 3.77  # safetensors header
    assert split.bits == 8 * (up8 + down8)
    cen, cen_round = crossover.step_and_round("centralized", shape, setting)
    assert cen.at(10, 50, 0.5, 989) == cen.at(1e4, 0.1, 35.6, 989) and float(cen_round) == 0
    fed, fed_round = crossover.step_and_round("fedlora", shape, setting)
    assert fed.at(10, 50, 1.0, 35.6) == fed.at(10, 50, 1.0, 989) == pytest.approx(2 * f["whole_client"] / 1e12)
    assert fed_round.messages == 2
    # A server so fast and links so free that only the clients' part is left: split's clients run
    # cut/layers of the model on a quarter of the tokens; fedlora's the whole model.
    ratio = (crossover.time_to_target("splitlora", shape, setting, 10).at(1e12, 0, 1.0, 1e12)
             / crossover.time_to_target("fedlora", shape, setting, 10).at(1e12, 0, 1.0, 1e12))
    assert ratio == pytest.approx(f["head"] / f["whole_client"], rel=1e-6)


def test_one_command_writes_the_maps_and_the_section(tmp_path):
    """`python -m bench.crossover` from the recorded steps: a map per shape and the section, with the
    boundary where split starts to win and the table of reading; rerunning replaces the section."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept\n")
    args = ["--results", str(results), "--plots", str(tmp_path / "plots")]
    assert crossover.main(args) == 0
    for shape in crossover.SHAPES:
        png = tmp_path / "plots" / f"crossover_{shape.name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    text = results.read_text()
    assert text.startswith("# Results\n\nkept\n") and text.count("<!-- crossover:begin -->") == 1
    assert "### Who reaches the target first, where" in text and "(plots/crossover_llama-7b.png)" in text
    assert crossover.main(args) == 0
    assert results.read_text() == text


def test_steps_to_target_fall_back_to_the_recorded_counts(tmp_path):
    sources = crossover.step_sources(runs_dirs=(str(tmp_path / "none"), str(tmp_path / "none-gpu")))
    assert [s["size"] for s in sources] == ["cpu", "gpu"]
    assert sources[0]["steps"] == {"centralized": 140, "fedlora": 140, "splitlora-fp32": 140, "splitlora-int8": 140}
    assert "bench/RESULTS.md" in sources[0]["source"]


TINY_LLAMA = ["model.config.model_type=llama", "model.config.num_hidden_layers=3", "model.config.hidden_size=32",
              "model.config.intermediate_size=64", "model.config.num_attention_heads=4",
              "model.config.num_key_value_heads=2", "model.config.max_position_embeddings=128",
              "model.config.tie_word_embeddings=false", "data.synthetic_examples=120", "data.num_eval=16",
              "data.max_length=96", "data.pad_to=dataset", "train.clients=2", "train.batch_size=4", "train.steps=6",
              "train.aggregate_every=3", "train.eval_every=0", "eval.generate=false", "model.cut_layer=1",
              "lora.client.r=4", "lora.server.r=4", "lora.client.target_modules=[q_proj,v_proj]",
              "lora.server.target_modules=[q_proj,v_proj,lm_head]"]


@pytest.mark.parametrize("strategy, bits", [("splitlora", 8), ("splitlora", 32), ("fedlora", 32),
                                            ("centralized", 32)])
def test_the_map_composes_a_step_as_the_strategies_do(tmp_path, strategy, bits):
    """At a tiny Llama shape (untied LM head, every batch padded to the data set's longest), the
    step bench.crossover prices has the flops per party, transfers and bits of the step the
    trainer's strategy simulates."""
    from splitlora.strategies import make_strategy
    from splitlora.trainer import build

    cfg = load_config(None, TINY_LLAMA + [f"strategy={strategy}", f"codec.bits={bits}",
                                          f"output_dir={tmp_path / 'run'}"])
    built = build(cfg, log=lambda *_: None)
    s = built.setup
    built.setup.transport.set_round(0)
    got = make_strategy(s).train_step(0).sim_time_s
    cfg_model = s.base_model.config
    shape = crossover.Shape("tiny", "tiny", "llama", s.num_layers, s.hidden_size, cfg_model.intermediate_size,
                            cfg_model.num_key_value_heads * s.hidden_size // cfg_model.num_attention_heads,
                            cfg_model.vocab_size, cfg.model.cut_layer)
    setting = crossover.Setting(clients=2, batch=4, seq=s.seq_len, aggregate_every=3, lora_r=4)
    want, _ = crossover.step_and_round(strategy, shape, setting, bits=bits)
    assert (got.client_flops, got.server_flops, got.messages, got.bits) == \
        (want.client_flops, want.server_flops, want.messages, want.bits)


def test_sim_time_reprices_each_party_at_its_own_tflops():
    from splitlora.timemodel import SimTime, TimeModel

    tm = TimeModel(client_tflops=2.0, server_tflops=10.0, bandwidth_mbps=8.0, latency_ms=5.0)
    step = max(tm.client_compute(4e12), tm.client_compute(4e12)) + tm.transfer(1_000_000) + tm.server_compute(20e12)
    assert isinstance(step, SimTime) and float(step) == pytest.approx(2.0 + 1.005 + 2.0)
    assert (step.client_flops, step.server_flops) == (4e12, 20e12)
    assert step.at(8.0, 5.0, 2.0, 10.0) == pytest.approx(float(step))
    assert step.at(80.0, 0.0, client_tflops=4.0) == pytest.approx(1.0 + 0.1 + 2.0)
    assert step.at(80.0, 0.0, server_tflops=20.0) == pytest.approx(2.0 + 0.1 + 1.0)
    # Plain-float compute (no party's flops) is kept as it is.
    assert (step + 0.5).at(80.0, 0.0, 4.0, 20.0) == pytest.approx(1.0 + 0.1 + 1.0 + 0.5)
