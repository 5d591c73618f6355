"""Exports that load: every kind of export a run writes loads with plain transformers (+ PEFT) from
what it records, in a fresh process that never imports splitlora, and gives the run's own logits
and tokens.

Each case trains a tiny run (2 steps), from a working directory with relative paths (so that what
the export records must not depend on where the run was started), then one subprocess, started in
another directory, loads every export: for an adapter the base model named by its
adapter_config.json (`AutoModelForCausalLM.from_pretrained(base_model_name_or_path)`) +
`PeftModel.from_pretrained`, and also `AutoPeftModelForCausalLM.from_pretrained(adapter)`; for a
whole model `AutoModelForCausalLM.from_pretrained`; the tokenizer with
`AutoTokenizer.from_pretrained`. Logits on a fixed prompt are compared with the run's evaluation
model (`strategy.logits_fn()` of the restored final checkpoint) at atol = rtol = 1e-4 (float32; the
split and the whole model sum in another order, and HSplitLoRA's folded update is refactored by SVD).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlora.config import load_config
from splitlora.trainer import load_run, train
from trainer_testutil import TINY_MODEL

pytest.importorskip("peft")

SHARED_TOKENIZER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt2-tokenizer" / "tokenizer.json"
NAMED_CACHE = Path(os.environ.get("SPLITLORA_CACHE") or Path.home() / ".cache" / "splitlora").expanduser() \
    / "models" / "smollm2-135m"
TOL = dict(rtol=1e-4, atol=1e-4)
QUIET = dict(progress=False, log=lambda *_: None)
# Beyond the training texts, strings whose splitting the tokenizers library's own \w and \s would
# get wrong (combining marks, '²', '\x1c', NBSP), a literal special token, runs of spaces.
TRICKY = ["naïve cafe\u0301 x² 1\x1c2\u00a0end", "a  <eos> b\t\tc\n\n d's", "  leading, trailing.  "]

LOADER = r'''
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM, PeftModel

torch.set_num_threads(1)
jobs = json.loads(open(sys.argv[1]).read())
results, tensors = {}, {}
for name, job in jobs.items():
    folder = job["folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(job["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = {"prompt_ids": ids[0].tolist(), "eos_token": tokenizer.eos_token,
           "texts_ids": [tokenizer.encode(t, add_special_tokens=False) for t in job["texts"]]}
    out["decoded"] = [tokenizer.decode(i) for i in out["texts_ids"]]
    with torch.no_grad():
        if job["kind"] == "adapter":
            base = json.loads(open(os.path.join(folder, "adapter_config.json")).read())["base_model_name_or_path"]
            out["base"] = base
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
            tensors[name] = model(input_ids=ids).logits[0]
            with model.disable_adapter():
                tensors[name + "/base"] = model(input_ids=ids).logits[0]
            auto = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
            tensors[name + "/auto"] = auto(input_ids=ids).logits[0]
        else:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            tensors[name] = model(input_ids=ids).logits[0]
    results[name] = out
assert "splitlora" not in sys.modules and "splitlora_kernels" not in sys.modules, sorted(sys.modules)
torch.save(tensors, sys.argv[3])
open(sys.argv[2], "w").write(json.dumps(results))
'''


def _config(name, *overrides):
    base = [f"output_dir={name}", "data.synthetic_examples=40", "data.num_eval=8", "data.max_length=96",
            "train.clients=2", "train.batch_size=2", "train.steps=2", "train.aggregate_every=2", "train.eval_every=0",
            "train.log_every=1", "eval.generate=false", "model.cut_layer=1"]
    return load_config(None, base + list(overrides))


def _texts(built):
    texts = []
    for r in built.train_records:
        texts.append(r.text if hasattr(r, "text") else r.prompt + r.completion)
    return texts


def _expected(run: Path, export: Path, kind: str, tricky=False):
    """What the run itself computes: its tokenizer's ids and its evaluation model's logits."""
    built, strategy, _ = load_run(run, log=lambda *_: None)
    texts = _texts(built) + (TRICKY if tricky else [])
    first = built.eval_records[0]
    prompt = first.prompt + first.completion
    ids = built.tokenizer.encode(prompt)
    strategy.train(False)
    with torch.no_grad():
        logits = strategy.logits_fn()(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    return {"job": {"kind": kind, "folder": str(export.resolve()), "prompt": prompt, "texts": texts},
            "prompt_ids": ids, "logits": logits, "texts_ids": [built.tokenizer.encode(t) for t in texts],
            "decoded": [built.tokenizer.decode(built.tokenizer.encode(t)) for t in texts], "texts": texts,
            "eos_token": built.tokenizer.decode([built.tokenizer.eos_id]), "built": built}


def _load_fresh(tmp, cases):
    """Runs LOADER in a new interpreter, started in a directory of its own, on every case."""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (tmp / "loader.py").write_text(LOADER)
    (tmp / "jobs.json").write_text(json.dumps({name: c["job"] for name, c in cases.items()}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(tmp / "loader.py"), str(tmp / "jobs.json"), str(tmp / "out.json"),
                           str(tmp / "logits.pt")], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text()), torch.load(tmp / "logits.pt")


def _save_llama_folder(folder: Path):
    """A small random Llama saved with save_pretrained, with the GPT-2 tokenizer as a bare
    tokenizer.json wrapper (no eos named, as a tokenizer file alone gives)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(SHARED_TOKENIZER)).save_pretrained(folder)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    cases = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # every path the runs are given is relative to here
        train(_config("config-run", *TINY_MODEL), **QUIET)
        cases["config"] = _expected(tmp / "config-run", tmp / "config-run" / "adapter", "adapter", tricky=True)

        if SHARED_TOKENIZER.is_file():
            _save_llama_folder(tmp / "llama")
            train(_config("path-run", "model.path=llama", "lora.client.target_modules=[q_proj,v_proj]",
                          "lora.server.target_modules=[q_proj,v_proj]"), **QUIET)
            cases["path"] = _expected(tmp / "path-run", tmp / "path-run" / "adapter", "adapter")

        train(_config("fedcybgd-run", *TINY_MODEL, "strategy=fedcybgd"), **QUIET)
        cases["fedcybgd"] = _expected(tmp / "fedcybgd-run", tmp / "fedcybgd-run" / "model", "model")

        # Clients at two cuts, the stacked updates folded into the weights at the end of the round:
        # the export is the folded update refactored by SVD, plus the server's adapters (on lm_head too).
        train(_config("hsplitlora-run", *TINY_MODEL, "strategy=hsplitlora", "train.clients=3", "lora.client.r=4",
                      "hsplitlora.devices={fast: {tflops: 1.0e-3}, slow: {count: 2, tflops: 1.0e-6}}",
                      "network.latency_ms=0", "network.bandwidth_mbps=1.0e6", "hsplitlora.min_cut_layer=1",
                      "hsplitlora.max_cut_layer=2", "hsplitlora.step_time_s=30",
                      "lora.client.target_modules=[c_attn,c_proj]", "lora.server.target_modules=[c_attn,lm_head]"),
              **QUIET)
        cases["hsplitlora"] = _expected(tmp / "hsplitlora-run", tmp / "hsplitlora-run" / "adapter", "adapter")
    loaded, logits = _load_fresh(tmp, cases)
    return tmp, cases, loaded, logits


def _assert_loads_as_the_run(name, cases, loaded, logits, tol=TOL):
    case, got = cases[name], loaded[name]
    assert got["prompt_ids"] == case["prompt_ids"]
    assert got["texts_ids"] == case["texts_ids"]
    assert got["decoded"] == case["decoded"]
    assert got["eos_token"] == case["eos_token"]
    torch.testing.assert_close(logits[name], case["logits"], **tol)
    if case["job"]["kind"] == "adapter":
        torch.testing.assert_close(logits[name + "/auto"], case["logits"], **tol)
        # The adapter matters: without it the logits are not the run's (else this test proves nothing).
        assert (logits[name + "/base"] - case["logits"]).abs().max() > 100 * tol["atol"]


def test_config_built_model_exports_its_base_model_and_word_tokenizer(exports):
    tmp, cases, loaded, logits = exports
    run = tmp / "config-run"
    base = loaded["config"]["base"]
    assert Path(base) == (run / "base_model").resolve() and os.path.isabs(base)
    config = json.loads((run / "base_model" / "config.json").read_text())
    assert config["vocab_size"] == cases["config"]["built"].tokenizer.vocab_size and config["use_cache"] is True
    tokenizer_config = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4 knows too
    # The word tokenizer round-trips every training text, and odd Unicode, exactly as the run's.
    case = cases["config"]
    assert case["decoded"][:-len(TRICKY)] == case["texts"][:-len(TRICKY)]
    _assert_loads_as_the_run("config", cases, loaded, logits)


def test_saved_folder_is_recorded_absolute_with_its_tokenizer(exports):
    tmp, cases, loaded, logits = exports
    if "path" not in cases:
        pytest.skip(f"needs the shared GPT-2 tokenizer at {SHARED_TOKENIZER} (../shared/data)")
    assert loaded["path"]["base"] == str((tmp / "llama").resolve())  # given as the relative path "llama"
    # The model folder's tokenizer names no eos; the exported one does (generation stops there).
    assert loaded["path"]["eos_token"] == "<|endoftext|>"
    _assert_loads_as_the_run("path", cases, loaded, logits)


def test_fedcybgd_exports_the_whole_model_and_tokenizer(exports):
    tmp, cases, loaded, logits = exports
    assert not (tmp / "fedcybgd-run" / "adapter").exists()
    _assert_loads_as_the_run("fedcybgd", cases, loaded, logits, tol=dict(rtol=1e-5, atol=1e-5))
    base = cases["fedcybgd"]["built"].setup.base_model
    ids = torch.tensor([cases["fedcybgd"]["prompt_ids"]])
    with torch.no_grad():
        untrained = base(input_ids=ids).logits[0]
    assert (untrained - logits["fedcybgd"]).abs().max() > 1e-2  # the trained weights, not the base's


def test_hsplitlora_folded_export_loads(exports):
    _, cases, loaded, logits = exports
    _assert_loads_as_the_run("hsplitlora", cases, loaded, logits)


def test_named_model_export_points_at_the_converted_cache(tmp_path):
    if not (NAMED_CACHE / "config.json").is_file():
        pytest.skip(f"no converted smollm2-135m in {NAMED_CACHE} (train once with model.name=smollm2-135m)")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        train(_config("named-run", "model.name=smollm2-135m", "data.synthetic_examples=12", "data.num_eval=2",
                      "data.max_length=48", "train.clients=1", "train.batch_size=2", "train.steps=1",
                      "train.aggregate_every=1", "lora.client.r=1", "lora.server.r=1",
                      "lora.client.target_modules=[q_proj,v_proj]", "lora.server.target_modules=[q_proj,v_proj]"),
              **QUIET)
        cases = {"named": _expected(tmp_path / "named-run", tmp_path / "named-run" / "adapter", "adapter")}
    loaded, logits = _load_fresh(tmp_path, cases)
    assert Path(loaded["named"]["base"]) == NAMED_CACHE.resolve()
    assert not (tmp_path / "named-run" / "base_model").exists()
    _assert_loads_as_the_run("named", cases, loaded, logits, tol=dict(rtol=1e-4, atol=1e-3))
