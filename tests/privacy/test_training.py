"""Privacy in a training run: two keys turn it on, epsilon lands in summary.json (and is printed),
a target epsilon sets the noise, a resumed run is bit-identical, and bad keys are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from splitlora.config import ConfigError
from splitlora.privacy import epsilon, secure_generator
from splitlora.trainer import train
from trainer_testutil import tiny_config

# tiny_config: 2 clients, batch 4, 6 steps, FedAvg every 3; privacy.clip and noise_multiplier on.
ON = ["privacy.clip=5.0", "privacy.noise_multiplier=1.0"]


def _run(tmp_path, *overrides, name="run", steps=6):
    lines = []
    summary = train(tiny_config(tmp_path, *overrides, f"train.steps={steps}", name=name), progress=False,
                    log=lines.append)
    return summary, lines


def test_two_keys_turn_it_on_and_epsilon_is_in_the_summary_and_printed(tmp_path):
    summary, lines = _run(tmp_path, *ON)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert written == json.loads(json.dumps(summary["privacy"]))
    cut = written["cut"]
    assert cut["releases"] == {"0": 6, "1": 6}  # every client sent a batch in each of the 6 steps
    for c in ("0", "1"):
        q = cut["sample_rate"][c]
        assert 0 < q < 1
        assert cut["epsilon"][c] == pytest.approx(epsilon(1.0, q, 6, 1e-5), rel=1e-12)
    assert written["epsilon"] == max(cut["epsilon"].values())
    # FedAvg of un-noised adapters is a release the cut's epsilon does not cover: the summary says so.
    assert written["not_covered"] == ["client adapters reach FedAvg without noise"]
    printed = [line for line in lines if line.startswith("privacy: epsilon = ")]
    assert len(printed) == 1 and f"{written['epsilon']:.4g}" in printed[0]


def test_privacy_off_writes_no_privacy_section(tmp_path):
    summary, _ = _run(tmp_path, steps=2)
    assert "privacy" not in summary


def test_a_target_epsilon_sets_the_noise_and_is_met(tmp_path):
    summary, _ = _run(tmp_path, "privacy.clip=5.0", "privacy.epsilon=2.0", "privacy.adapter_clip=0.5",
                      "privacy.adapter_noise_multiplier=2.0")
    p = summary["privacy"]
    assert p["epsilon"] <= 2.0 and p["epsilon"] > 1.9
    assert p["cut"]["noise_multiplier"] > 0
    assert p["adapters"]["rounds"] == {"0": 2, "1": 2}
    assert p["adapters"]["epsilon"] == pytest.approx(epsilon(2.0, 1.0, 2, 1e-5), rel=1e-12)
    assert p["not_covered"] == []


def test_the_noise_reaches_training(tmp_path):
    """The same run without noise, and with noise from two seeds: three different trainings."""
    losses = []
    for name, extra in (("clean", ["privacy.noise_multiplier=0.0", "privacy.seed=1"]),
                        ("a", ["privacy.noise_multiplier=1.0", "privacy.seed=1"]),
                        ("b", ["privacy.noise_multiplier=1.0", "privacy.seed=2"])):
        summary, _ = _run(tmp_path, "privacy.clip=5.0", *extra, name=name, steps=3)
        losses.append(summary["final_train_loss"])
        if name == "clean":  # clipping alone: no finite epsilon, and the summary says so
            assert summary["privacy"]["epsilon"] == float("inf")
    assert len(set(losses)) == 3, losses


def test_noise_generators_are_seeded_from_the_os():
    assert not torch.equal(secure_generator().get_state(), secure_generator().get_state())


def test_resume_with_privacy_on_is_bit_identical(tmp_path):
    extra = [*ON, "privacy.seed=3", "privacy.adapter_clip=0.5", "privacy.adapter_noise_multiplier=0.3",
             "codec.bits=4", "codec.stochastic=true", "train.aggregate_every=2"]
    full, _ = _run(tmp_path / "full", *extra)
    _run(tmp_path / "part", *extra, steps=4)
    resumed, lines = _run(tmp_path / "part", *extra, "resume=true")
    assert resumed["privacy"] == full["privacy"]
    a = load_file(str(tmp_path / "full" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "run" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["eval_loss"] == full["eval_loss"]


@pytest.mark.parametrize("overrides, message", [
    (["privacy.clip=1.0"], "privacy.noise_multiplier: privacy.clip is set; set privacy.noise_multiplier"),
    (["privacy.noise_multiplier=1.0"], "privacy.noise_multiplier: needs privacy.clip"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.epsilon=3.0"], "set either privacy.noise_multiplier"),
    (["privacy.clip=0", "privacy.noise_multiplier=1.0"], "privacy.clip: must be a number > 0"),
    (["privacy.clip=-2.0", "privacy.noise_multiplier=1.0"], "privacy.clip: must be a number > 0"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=-1.0"], "privacy.noise_multiplier: must be a number >= 0"),
    (["privacy.clip=1.0", "privacy.epsilon=0"], "privacy.epsilon: must be a number > 0"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=1.0"], "privacy.delta: must be in"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.accountant=gdp"], "privacy.accountant"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.protect_gradients=true"],
     "privacy.protect_gradients: protects the gradient a client sends up"),
    (["privacy.adapter_clip=1.0"], "privacy.adapter_noise_multiplier: adapter DP needs both"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy=fedlora"], "privacy: DP is implemented for"),
    (["privacy.adapter_clip=1.0", "privacy.adapter_noise_multiplier=1.0", "strategy=sl"], "sl hands one adapter"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "codec.error_feedback=true"], "codec.error_feedback: not with"),
])
def test_bad_privacy_config_is_refused_with_a_sentence(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        tiny_config(tmp_path, *overrides)


@pytest.mark.parametrize("variant", [["strategy=sl", "codec.bits=32"],
                                     ["train.u_shape=true", "model.server_end=2", "privacy.protect_gradients=true"]])
def test_sl_uncompressed_and_u_shape_with_protected_gradients(tmp_path, variant):
    summary, _ = _run(tmp_path, *ON, *variant, steps=2)
    cut = summary["privacy"]["cut"]
    protected = "privacy.protect_gradients=true" in variant
    # Two releases of each batch per step (activations up, gradients up) cost as one at sigma / sqrt 2.
    for c, q in cut["sample_rate"].items():
        assert cut["epsilon"][c] == pytest.approx(epsilon(1.0 / (2 ** 0.5 if protected else 1), q, 2, 1e-5))


def test_privacy_keys_may_not_change_on_resume(tmp_path):
    from splitlora.trainer import _may_change_on_resume

    cfg = tiny_config(tmp_path, *ON)
    for key in ("privacy.clip", "privacy.noise_multiplier", "privacy.epsilon", "privacy.seed",
                "privacy.adapter_clip", "privacy.adapter_noise_multiplier", "privacy.protect_gradients"):
        assert not _may_change_on_resume(key, cfg), key
