"""`python -m bench.hetero` runs end to end: its runs go through bench.e2e's child process under a
series name ("hetero") that is no size of bench.e2e, which once made every run fail."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hetero_runs_one_short_run_and_writes_its_report(tmp_path, shared_data):
    out, results, plots = tmp_path / "runs", tmp_path / "RESULTS.md", tmp_path / "plots"
    env = dict(os.environ, SPLITLORA_DATA=str(shared_data))
    done = subprocess.run([sys.executable, "-m", "bench.hetero", "--only", "weakest", "--steps", "2", "--out", str(out),
                           "--results", str(results), "--plots", str(plots)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "weakest" / "summary.json").read_text())
    assert summary["strategy"] == "hsplitlora" and summary["steps"] == 2
    assert "<!-- hetero:begin -->" in results.read_text()
    assert (plots / "hetero_loss.png").is_file()
