"""The `splitlora` command used the wrong way on purpose: flags and overrides mixed, a run folder
reused, a model type switched under a config of another, a model too big, files that are not
there; and the README's first commands in the order it gives them."""
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from splitlora.cli import _summary_table, main, parse_args
from splitlora.config import ConfigError, load_config
from trainer_testutil import TINY_MODEL

PROJECT = Path(__file__).resolve().parents[2]
# A tiny run of the demo's settings: seconds on one core.
TINY = TINY_MODEL + ["data.synthetic_examples=60", "data.num_eval=8", "train.clients=2", "train.batch_size=2",
                     "train.steps=2", "train.aggregate_every=1", "eval.max_sources=2", "eval.max_new_tokens=4",
                     "model.cut_layer=1", "train.eval_every=0", "train.log_every=1"]


def _train(out, *extra):
    return main(["train", "--no-progress", f"output_dir={out}", *TINY, *extra])


# --- flags and overrides in any order ---------------------------------------------------------------


def test_flags_and_overrides_interleaved():
    args = parse_args(["train", "output_dir=x", "--no-progress", "a=b", "--config", "c.yaml", "train.steps=3"])
    assert args.no_progress and args.config == "c.yaml"
    assert args.overrides == ["output_dir=x", "a=b", "train.steps=3"]  # in the order given
    demo = parse_args(["demo", "train.steps=2", "--no-progress", "--output-dir", "d", "seed=1"])
    assert demo.no_progress and demo.output_dir == "d" and demo.overrides == ["train.steps=2", "seed=1"]


@pytest.mark.parametrize("argv, bad", [
    (["train", "output_dir=x", "--steps=3", "a=b"], "--steps=3"),            # a flag of demo, not of train
    (["train", "a=b", "stray"], "stray"),                                     # neither a flag nor key=value
    (["eval", "runs/x", "eval.max_sources=2"], "eval.max_sources=2"),        # eval takes no overrides
])
def test_what_is_neither_a_flag_nor_an_override_is_argparses_error(capsys, argv, bad):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"splitlora {argv[0]}: error: unrecognized arguments: {bad}" in err


def test_interleaved_overrides_reach_the_run(tmp_path):
    out = tmp_path / "run"
    # Overrides before, between and after the flags: all of them apply (train.steps=2 from TINY,
    # then train.steps=3 after the flag wins, as the later override).
    assert main(["train", f"output_dir={out}", *TINY, "--no-progress", "train.steps=3", "--config",
                 str(PROJECT / "configs" / "demo.yaml"), "seed=5"]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.train.steps == 3 and cfg.seed == 5
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_train_help_lists_every_section(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for section in ("top-level", "model", "data", "lora", "train", "codec", "network", "eval", "fedcybgd",
                    "hsplitlora"):
        lines = [line for line in text.splitlines() if re.match(rf"\s+{section}\s{{2,}}\S", line)]
        assert len(lines) == 1, (section, text)
    assert "configs/demo.yaml" in text and "overwrite" in text


# --- the results table ------------------------------------------------------------------------------


def _summary(**values):
    s = {"final_train_loss": 10.8335, "eval_loss": 2.5, "eval_ppl": 12.18, "bleu": 12.3,
         "bytes_by_kind": {"activations": 1000, "gradients": 1000}, "bytes_total": 5000, "sim_time_s": 12.5,
         "wall_time_s": 3.0}
    s.update(values)
    return s


def test_results_table_keeps_columns_apart_for_huge_values():
    huge = _summary(final_train_loss=10.83350642, eval_loss=1e30, eval_ppl=float("inf"), bleu=99.95,
                    bytes_by_kind={"activations": 3 * 2**50, "gradients": 2**50}, bytes_total=2**60,
                    sim_time_s=123456789012.5, wall_time_s=98765432101.0)
    rows = [("a run name far longer than the run column was", huge), ("small", _summary())]
    table = _summary_table(rows, baseline=_summary()).splitlines()
    header, rule, *body = table
    names = ["train loss", "eval loss", "ppl", "BLEU", "cut bytes", "vs fp32", "all bytes", "sim time", "wall"]
    ends = [header.index(n) + len(n) for n in names]  # right-aligned: every cell ends where its header does
    starts = [len(rows[0][0])] + ends[:-1]
    assert set(rule) == {"-"} and len(rule) == len(header)
    for line in body:
        assert len(line) == len(header)
        for start, end in zip(starts, ends):
            cell = line[start:end]
            assert cell[:2] == "  ", (cell, line)  # two spaces before every column
            assert cell.strip() and "  " not in cell.strip(), (cell, line)  # one value, whole, in its column
    first = body[0]
    cells = [first[s:e].strip() for s, e in zip(starts, ends)]
    assert cells[0] == "10.834" and cells[1] == "1.000e+30" and cells[2] == "inf"
    assert cells[-2] == "1.235e+11s" and cells[-1] == "9.877e+10s"
    assert first.startswith("a run name far longer than the run column was  ")


# --- run folders ------------------------------------------------------------------------------------


def test_existing_run_folder_is_refused_overwrite_replaces_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    first = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    # Another run into the same folder: refused before anything is touched, naming both ways out.
    assert _train(out, "seed=3") == 2
    err = capsys.readouterr().err
    assert str(out) in err and "resume=true" in err and "overwrite=true" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == first and load_config(out / "config.yaml").seed == 0

    # overwrite=true: the old run's files go first (a stale file of it does not survive).
    (out / "generations.jsonl").write_text("stale\n")
    assert _train(out, "seed=3", "overwrite=true", "eval.generate=false") == 0
    assert load_config(out / "config.yaml").seed == 3
    assert not (out / "generations.jsonl").exists() or "stale" not in (out / "generations.jsonl").read_text()
    assert "overwrite: deleted" in capsys.readouterr().out

    # resume=true: allowed, continues the run (two more steps from its last checkpoint).
    assert _train(out, "seed=3", "eval.generate=false", "resume=true", "train.steps=4") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == [0, 1, 2, 3]


def test_resume_and_overwrite_together_is_a_config_error():
    with pytest.raises(ConfigError, match="overwrite: .*set one of them"):
        load_config(None, ["resume=true", "overwrite=true"])


def test_a_run_that_stopped_before_training_leaves_its_folder_usable(tmp_path, capsys):
    # A wrong cut layer stops the run after config.yaml is written: the corrected rerun is not refused.
    out = tmp_path / "run"
    assert _train(out, "model.cut_layer=7") == 2
    assert (out / "config.yaml").is_file()
    assert _train(out) == 0


# --- model.config against the model type ------------------------------------------------------------


def test_model_type_switched_on_the_demo_config_names_the_foreign_keys(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["train", "--config", str(PROJECT / "configs" / "demo.yaml"), "--no-progress",
                 f"output_dir={tmp_path / 'run'}", "model.config.model_type=qwen3"])
    assert code == 2
    err = capsys.readouterr().err
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "activation_function"):
        assert f"model.config.{key}: not a key of a qwen3 config" in err, err
    assert "did you mean num_hidden_layers?" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 60  # no multi-billion-parameter model was built first


def test_model_type_switched_without_a_file_starts_from_that_type():
    # The demo's GPT-2 keys came with the default: they do not carry over to another model type.
    cfg = load_config(None, ["model.config.n_layer=3", "model.config.model_type=llama",
                             "model.config.num_hidden_layers=2", "model.config.hidden_size=32"])
    assert cfg.model.config == {"n_layer": 3, "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32}
    assert load_config(None, ["model.config.model_type=llama"]).model.config == {"model_type": "llama"}
    # The same type keeps the demo's keys.
    assert load_config(None, ["model.config.n_layer=3"]).model.config["n_embd"] == 64


def test_misspelled_llama_key_is_an_error_with_the_suggestion():
    from splitlora.models import load_causal_lm

    with pytest.raises(ConfigError) as exc:
        load_causal_lm(config={"model_type": "llama", "num_hiden_layers": 2, "hidden_size": 32,
                               "num_attention_heads": 2, "vocab_size": 64})
    message = str(exc.value)
    assert "model.config.num_hiden_layers: not a key of a llama config (LlamaConfig)" in message
    assert "did you mean num_hidden_layers?" in message
    # The keys llama does take (older spellings included) pass.
    model, _ = load_causal_lm(config={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                                      "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 64,
                                      "rope_theta": 5000.0, "bos_token_id": 0, "eos_token_id": 0})
    assert model.config.num_hidden_layers == 2


def test_model_larger_than_memory_stops_before_allocating(monkeypatch):
    import psutil

    import splitlora.models as models

    # A real 275-billion-parameter config: allocating it anywhere would fail or be killed, not raise this.
    huge = {"model_type": "llama", "num_hidden_layers": 64, "hidden_size": 16384, "intermediate_size": 65536,
            "num_attention_heads": 128, "vocab_size": 1000}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"has 274,912,788,480 parameters, which need about [\d,.]+ GiB as float32"):
        models.load_causal_lm(config=huge)
    assert time.perf_counter() - t0 < 30

    # A tiny model (168,192 parameters, 0.8 MB as float32) on a machine with 64 KiB available.
    class Memory:
        available = 2**16

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    tiny = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 64,
            "bos_token_id": 0, "eos_token_id": 0}
    with pytest.raises(ValueError) as exc:
        models.load_causal_lm(config=tiny)
    message = str(exc.value)
    count = int(re.search(r"has ([\d,]+) parameters", message).group(1).replace(",", ""))
    assert count == 2 * (12 * 64 * 64 + 13 * 64) + 1000 * 64 + 64 * 64 + 2 * 64  # GPT-2's, head tied
    assert "0.0 GiB of memory is available" in message and "20% margin" in message


# --- missing files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("model.path=nope-model", "model.path"),
    ("data.tokenizer=nope-tokenizer", "data.tokenizer"),
    ("data.source=jsonl data.train_path=nope.jsonl", "data.train_path"),
])
def test_missing_file_is_one_error_line_naming_the_key_and_path(tmp_path, capsys, override, key):
    # The demo's settings otherwise (its model.config gives way to model.path by itself).
    argv = ["train", "--no-progress", f"output_dir={tmp_path / 'run'}", *override.split()]
    assert main(argv) == 2
    err = capsys.readouterr().err
    path = override.split()[-1].split("=", 1)[1]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"splitlora train: error: {key}: ") and repr(path) in lines[0], err


def test_missing_model_path_from_a_subprocess_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "splitlora", "train", "model.path=nope", "--no-progress",
                           f"output_dir={tmp_path / 'run'}"], cwd=PROJECT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("splitlora train: error: model.path: no such folder 'nope' (a folder written "
                                   "by save_pretrained)")


# --- the README's commands, in its order --------------------------------------------------------------


def _readme_commands():
    text = (PROJECT / "README.md").read_text()
    block = text[text.index("## Training"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]


def test_readme_demo_then_eval_and_export_as_written(tmp_path, monkeypatch, capsys):
    commands = _readme_commands()
    evaluate = next(c for c in commands if c[:2] == ["splitlora", "eval"])
    export = next(c for c in commands if c[:2] == ["splitlora", "export"])
    train = next(c for c in commands if c[:2] == ["splitlora", "train"] and "configs/demo.yaml" in c)
    assert commands.index(evaluate) < commands.index(train)  # the demo's folders first, as written
    makefile = (PROJECT / "Makefile").read_text()
    demo = shlex.split(re.search(r"^demo:.*\n\t\$\(PY\) -m (splitlora demo.*)$", makefile, re.M).group(1))

    (tmp_path / "configs").mkdir()
    shutil.copy(PROJECT / "configs" / "demo.yaml", tmp_path / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)  # the README's relative paths, under tmp_path
    # `make demo` (the demo's own code path), shrunk to seconds by overrides.
    assert main([*demo[1:], "--no-progress", *TINY]) == 0
    assert main([*demo[1:], "--no-progress", *TINY]) == 0  # make demo twice: its own runs are replaced
    assert main(["demo", "--no-progress", *TINY]) == 2  # plain `splitlora demo` asks first
    assert "--overwrite" in capsys.readouterr().err

    assert main([*evaluate[1:], "--no-generate"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {str(Path("runs/demo/int8")), str(Path("runs/demo/fp32"))}
    assert all(s["eval_loss"] > 0 and s["step"] == 2 for s in scores.values())

    assert main(export[1:]) == 0
    assert (tmp_path / export[-1] / "adapter_model.safetensors").is_file()
    # The folder of runs itself is no export source: it names the runs to pick.
    assert main(["export", "runs/demo", "out/x"]) == 2
    assert "int8" in capsys.readouterr().err and not (tmp_path / "out" / "x").exists()

    # The README's next command goes elsewhere and leaves the demo's runs as they are.
    assert main([*train[1:], "--no-progress", *TINY]) == 0
    trained = load_config(Path(load_config("configs/demo.yaml").output_dir) / "config.yaml")
    assert trained.codec.bits == 4 and trained.codec.error_feedback and not Path("runs/demo/config.yaml").exists()
