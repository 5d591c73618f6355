"""`splitlora federation-example DIR`: the files a first federation needs, and commands that use them."""
import math
import shlex

import pytest

from splitlora.cli import main
from splitlora.config import load_config
from splitlora.trainer import train


def test_example_writes_a_runnable_federation(tmp_path, capsys):
    folder = tmp_path / "fed"
    assert main(["federation-example", str(folder), "--clients", "bob,alice", "--port", "50123"]) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(line.strip()) for line in out.splitlines() if line.strip().startswith("splitlora ")]
    assert [c[1] for c in commands] == ["server", "client", "client"]
    for c in commands:
        # every file a command names exists: config, certificates, data
        for flag in ("--config", "--certs", "--data"):
            if flag in c:
                assert (tmp_path / c[c.index(flag) + 1]).exists()
    # clients are numbered by sorted name, so alice reads client0's file
    names = {c[c.index("--name") + 1]: c[c.index("--data") + 1] for c in commands[1:]}
    assert names == {"alice": str(folder / "client0.jsonl"), "bob": str(folder / "client1.jsonl")}
    assert all("127.0.0.1:50123" in c for c in commands[1:])
    for name in ("alice", "bob"):
        assert (folder / "certs" / f"client-{name}.crt").is_file()
    assert len((folder / "client0.jsonl").read_text().splitlines()) == 48

    # The same config trains in one process (the comparison its comment promises), here briefly.
    cfg = load_config(folder / "run.yaml", ["train.steps=4", "eval.generate=false",
                                            f"output_dir={tmp_path / 'local'}"])
    assert cfg.federation.listen == "127.0.0.1:50123"
    result = train(cfg, progress=False, log=lambda *_: None)
    assert (result["steps"], result["clients"]) == (4, 2) and math.isfinite(result["eval_loss"])


@pytest.mark.parametrize("args, message", [
    (["--clients", "solo"], "at least two clients"),
])
def test_example_refusals(tmp_path, capsys, args, message):
    assert main(["federation-example", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


def test_example_refuses_a_folder_that_holds_one(tmp_path, capsys):
    assert main(["federation-example", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["federation-example", str(tmp_path)]) == 2
    assert "already holds an example" in capsys.readouterr().err
