"""bench.privacy --run: the attack benchmark on a user's own finished run (a tiny trainer run here),
and its one-line errors (exit status 2)."""
import json
import sys
from pathlib import Path

import pytest

from bench import privacy
from splitlora.data import synthetic_examples
from splitlora.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_testutil import tiny_config  # noqa: E402


def _write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"prompt": e.source + " ||", "completion": " " + e.target}) + "\n"
                            for e in examples))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-layer SplitLoRA run cut after layer 1, trained on a jsonl file; a disjoint public jsonl."""
    tmp = tmp_path_factory.mktemp("privacy_run")
    private = synthetic_examples(120, seed=1)
    seen = {e.source for e in private}
    public = [e for e in synthetic_examples(400, seed=2) if e.source not in seen][:60]
    train_file = _write_jsonl(tmp / "train.jsonl", private)
    cfg = tiny_config(tmp, "data.source=jsonl", f"data.train_path={train_file}", "data.eval_fraction=0.15",
                      name="myrun")
    train(cfg, progress=False, log=lambda *_: None)
    return dict(tmp=tmp, run=tmp / "myrun", train=train_file, public=_write_jsonl(tmp / "public.jsonl", public))


def _rows(out):
    return json.loads((out / "results_run.json").read_text())


def test_run_mode_attacks_the_runs_cut(tiny_run, capsys):
    out = tiny_run["tmp"] / "out"
    assert privacy.main(["--run", str(tiny_run["run"]), "--public", str(tiny_run["public"]), "--quick",
                         "--threads", "1", "--out", str(out)]) == 0
    res = _rows(out)
    assert res["run"]["cut"] == 1 and res["run"]["strategy"] == "splitlora"
    assert {r["cut"] for r in res["rows"]} == {1}  # the run's cut only, by default
    assert [r["defence"] for r in res["rows"]] == ["none", "noise0.01", "noise1", "int8"]
    for r in res["rows"]:
        assert 0.0 <= r["inversion"]["token_accuracy"] <= 1.0
        assert r["utility_loss"] > 0
    by = {r["defence"]: r for r in res["rows"]}
    assert 0.0 <= by["none"]["optimisation"]["token_accuracy"] <= 1.0
    assert by["none"]["inversion"]["token_accuracy"] >= by["noise1"]["inversion"]["token_accuracy"]
    assert by["none"]["utility_loss"] <= by["noise1"]["utility_loss"]
    assert res["counts"]["private"] == 8 and res["counts"]["public"] == 40
    table = (out / "privacy.md").read_text()
    assert "| 1 | none |" in table and "<!-- privacy" not in table
    assert "| 1 | noise1 |" in capsys.readouterr().out


def test_run_mode_other_cuts_use_the_base_bottom_layers(tiny_run):
    out = tiny_run["tmp"] / "out2"
    assert privacy.main(["--run", str(tiny_run["run"]), "--public", str(tiny_run["public"]), "--quick",
                         "--threads", "1", "--cuts", "2", "--noise", "", "--codec", "", "--out", str(out)]) == 0
    res = _rows(out)
    assert sorted({r["cut"] for r in res["rows"]}) == [1, 2]
    assert any("cuts 2 (not the run's): the base model's bottom layers" in n for n in res["notes"])


def _error(capsys, argv):
    code = privacy.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "error:" in err, (code, err)
    return err


def test_run_mode_errors(tiny_run, capsys, tmp_path):
    run, public = str(tiny_run["run"]), str(tiny_run["public"])
    out = ["--quick", "--out", str(tmp_path / "out")]
    assert "is not a run folder" in _error(capsys, ["--run", str(tmp_path), "--public", public] + out)
    fed = tmp_path / "fed"
    fed.mkdir()
    text = (tiny_run["run"] / "config.yaml").read_text()
    assert "strategy: splitlora" in text
    (fed / "config.yaml").write_text(text.replace("strategy: splitlora", "strategy: fedlora"))
    assert "has no cut" in _error(capsys, ["--run", str(fed), "--public", public] + out)
    assert "needs --public" in _error(capsys, ["--run", run] + out)
    assert "no such file" in _error(capsys, ["--run", run, "--public", str(tmp_path / "nope.jsonl")] + out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    assert "--public" in _error(capsys, ["--run", run, "--public", str(bad)] + out)
    # public text that holds a record of the run's training data
    shared = tmp_path / "shared.jsonl"
    shared.write_text(Path(public).read_text() + tiny_run["train"].read_text())
    assert "disjoint" in _error(capsys, ["--run", run, "--public", str(shared)] + out)
    assert "cannot go with --run" in _error(capsys, ["--run", run, "--public", public, "--merge"] + out)
    assert not (tmp_path / "out").exists()
