"""bench.e2e's overrides: a --set on the command line wins over a run's own settings."""
import argparse
from pathlib import Path

from bench import e2e
from splitlora.config import load_config


def _args(**changes) -> argparse.Namespace:
    args = dict(size="cpu", tflops=35.6, client_tflops=None, bandwidth_mbps=100.0, latency_ms=10.0, steps=None,
                eval_every=None, set=None)
    args.update(changes)
    return argparse.Namespace(**args)


def _config(name: str, args, tmp_path: Path):
    overrides = e2e.run_overrides(name, args, Path("/data"), tmp_path)
    return load_config(e2e.ROOT / e2e.SIZES[args.size]["config"], overrides), overrides


def test_set_wins_over_the_runs_own_overrides(tmp_path):
    cfg, _ = _config("splitlora-int8", _args(), tmp_path)
    assert cfg.codec.group_size == 64 and cfg.codec.bits == 8  # the run's own setting

    cfg, overrides = _config("splitlora-int8", _args(set=["codec.group_size=1024", "train.lr=0.002"]), tmp_path)
    assert cfg.codec.group_size == 1024 and cfg.codec.bits == 8
    assert cfg.train.lr == 0.002
    assert overrides[-1] == f"output_dir={tmp_path / 'splitlora-int8'}"

    cfg, _ = _config("fedcybgd", _args(set=["train.lr=0.005"]), tmp_path)
    assert cfg.train.lr == 0.005  # over fedcybgd's own 1e-3


def test_every_size_and_run_loads(tmp_path):
    """Every size's overrides name real config keys (a typo raises), and evaluations fall at FedAvg
    round ends, where the evaluated adapters are the ones every party holds."""
    for size, spec in e2e.SIZES.items():
        for name in spec["runs"]:
            cfg, _ = _config(name, _args(size=size), tmp_path)
            assert cfg.train.eval_every % cfg.train.aggregate_every == 0, (size, name)
