"""The statistics the benchmark reports print: BLEU significance (bench.report.bleu_statistics) and
the heterogeneity report's per-client rows and time to target (bench.hetero)."""
import pytest

pytest.importorskip("sacrebleu")

from bench import hetero, report  # noqa: E402
from splitlora.evaluate import corpus_bleu  # noqa: E402

REFS = [
    ["the pub is near the river .", "a pub by the river ."],
    ["cheap food in the centre .", "the centre has cheap food ."],
    ["a family friendly cafe .", "the cafe is family friendly ."],
    ["high rated italian food .", "italian food rated high ."],
    ["a coffee shop near the park .", "the coffee shop is near the park ."],
    ["no children allowed here .", "it is not family friendly ."],
] * 4  # 24 sources: enough for the bootstrap to resample


def _row(name, hypotheses, bleu=None):
    outputs = [{"source": f"mr {i}", "hypothesis": h, "references": r}
               for i, (h, r) in enumerate(zip(hypotheses, REFS))]
    recorded = corpus_bleu(hypotheses, REFS) if bleu is None else bleu
    return {"name": name, "summary": {"bleu": recorded}, "run": {"generations": outputs}}


GOOD = [r[0] for r in REFS]                         # the first reference: BLEU 100
NOISY = [r[0] if i % 3 else "food ." for i, r in enumerate(REFS)]
NOISY_TOO = [h if i != 1 else "food ." for i, h in enumerate(NOISY)]  # one more source wrong
BAD = ["food ." for _ in REFS]


def test_bootstrap_interval_and_paired_test():
    rows = [_row("splitlora-fp32", NOISY), _row("centralized", GOOD), _row("fedlora", NOISY_TOO),
            _row("pretrained", BAD)]
    stats = report.bleu_statistics(rows)
    assert stats["n_sources"] == len(REFS) and stats["baseline"] == "splitlora-fp32"
    # Every run's interval holds its own BLEU; a perfect run's is a point at 100.
    for r in rows:
        mean, half = stats["ci"][r["name"]]
        assert mean - half - 1e-6 <= r["summary"]["bleu"] <= mean + half + 1e-6
    assert stats["ci"]["centralized"][0] == pytest.approx(100.0)
    # A clearly better system differs significantly; one that differs on a single source does not.
    assert stats["paired"]["centralized"] < 0.05
    assert stats["paired"]["fedlora"] > 0.05
    assert "pretrained" not in stats["paired"]  # the untrained model is not a fine-tuned run


def test_no_statistics_from_outputs_that_are_not_the_runs():
    # Outputs that do not reproduce the recorded BLEU, or that are for other sources, are refused.
    wrong_bleu = [_row("splitlora-fp32", NOISY), _row("centralized", GOOD, bleu=42.0)]
    assert report.bleu_statistics(wrong_bleu) == {}
    other = _row("centralized", GOOD)
    other["run"]["generations"][0]["source"] = "another mr"
    assert report.bleu_statistics([_row("splitlora-fp32", NOISY), other]) == {}
    missing = _row("centralized", GOOD)
    missing["run"]["generations"] = None
    assert report.bleu_statistics([_row("splitlora-fp32", NOISY), missing]) == {}


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    curve = {"step": [20, 40, 60], "loss": [5.0, 4.4, 4.6], "sim": [1.0, 2.0, 3.0]}
    assert hetero.first_at_or_below(curve, 4.5) == (40, 2.0)
    assert hetero.first_at_or_below(curve, 4.4) == (40, 2.0)
    assert hetero.first_at_or_below(curve, 4.0) is None


def test_client_rows_sum_bytes_and_replace_the_activation_estimate_by_the_measurement():
    clients = [{"device": "phone", "est_memory_bytes": 10.0, "est_activation_bytes": 6.0,
                "measured_activation_bytes": 4.0},
               {"device": "laptop", "est_memory_bytes": 20.0, "est_activation_bytes": 12.0,
                "measured_activation_bytes": None}]
    summary = {"trainable_params": {"clients": clients}, "bytes": {
        "client0": {"up": {"activations": 5, "adapters": 2}, "down": {"gradients": 5, "adapters": 3}},
        "client1": {"up": {"activations": 7}, "down": {"gradients": 7}}}}
    rows = hetero.client_rows({"summary": summary})
    assert [(r["up"], r["down"], r["adapters"]) for r in rows] == [(7, 8, 5), (7, 7, 0)]
    assert rows[0]["measured_memory_bytes"] == 10.0 - 6.0 + 4.0
    assert rows[1]["measured_memory_bytes"] is None


def test_link_sweep_reprices_time_to_target():
    """Two runs that reach the target at the same evaluation: a split run that sent 2 transfers of
    1 Mbit and computed 0.01 s, and centralized, which computed 0.05 s and sent nothing. At the
    configured 1 Mbit/s and 10 ms the split run takes 2.03 s; with free links it takes 0.01 s."""
    net = {"bandwidth_mbps": 1.0, "latency_ms": 10.0}

    def row(name, compute_s, messages, bits):
        link_s = messages * 0.010 + bits / 1e6
        return {"name": name, "run": {"config": {"network": net}},
                "hit": {"step": 20, "sim": compute_s + link_s, "wall": 1.0, "link": (link_s, messages, bits)}}

    rows = [row("centralized", 0.05, 0, 0), row("splitlora-fp32", 0.01, 2, 2e6)]
    lines = report.link_sweep_lines(rows, target=1.0)
    table = {l.split(" | ")[0].strip("| "): l for l in lines if l.startswith("| ") and "---" not in l}
    assert table["splitlora-fp32"].split(" | ")[1] == report.fmt_s(2.03)
    assert table["splitlora-fp32"].split(" | ")[-1].strip(" |*") == report.fmt_s(0.01)
    assert report.repriced(2.03, (2.03 - 0.01, 2, 2e6), 1e3, 1.0) == pytest.approx(0.01 + 0.002 + 0.002)
    wins = next(l for l in lines if l.startswith("- splitlora-fp32"))
    # At 10 Mbit/s and 50 ms: 0.01 + 0.1 + 0.2 s, slower than centralized's 0.05 s; from 1 Gbit/s
    # and 1 ms on (0.014 s) it is faster.
    assert wins.endswith("before centralized at: 1 Gbit/s, 1 ms, 10 Gbit/s, 0.1 ms, 100 Gbit/s, 0.01 ms, "
                         "free links."), wins


def test_memory_per_side_table():
    side = {"weights_bytes": 2048, "gradient_bytes": 512, "optimizer_bytes": 1024, "activation_bytes": 4096,
            "total_bytes": 2048 + 512 + 1024 + 4096}
    dist_server_view = dict(side, activation_bytes=None, total_bytes=None)
    rows = [{"name": "splitlora", "summary": {"memory_per_side": {"client": dist_server_view, "server": side}}},
            {"name": "fedcybgd", "summary": {"memory_per_side": None}}]
    lines = report.memory_per_side_table(rows)
    split = next(l for l in lines if l.startswith("| splitlora"))
    cells = [c.strip() for c in split.strip("|").split("|")]
    assert cells[1:5] == [report.fmt_bytes(2048), report.fmt_bytes(1536), "not measured here", "-"]
    assert cells[5:] == [report.fmt_bytes(2048), report.fmt_bytes(1536), report.fmt_bytes(4096),
                         f"**{report.fmt_bytes(7680)}**"]
    assert any(l.startswith("Not reported per side: fedcybgd") for l in lines)
