"""Differential privacy at the cut in a federation of real processes on loopback (mutual TLS):
plain SplitLoRA, a server and three clients, with privacy.clip and privacy.noise_multiplier (or
privacy.epsilon, whose noise needs every client's sample count, which the server's start message
carries; privacy.seed makes each client's noise reproducible) equals the in-process run of the same
config: adapters (rtol 1e-5 / atol 1e-6), step losses (rel 1e-6), byte counts exactly, and
summary.json's privacy report (the epsilon of each client). Each client clips and noises its own
activations (splitlora.strategies.splitfed._client_forward, in the client process) before they
are encoded and sent, so the equality also shows that the server trains on the noised packets it
received, and counts the releases as they arrive. Every wait is bounded and every process is
killed in a `finally`."""
import json

import pytest
from fed_testutil import CLIENTS, assert_same_training, run_beside_in_process, step_records, write_config, write_data

# error_feedback would carry un-noised quantization error into the next packet: refused with DP.
BASE = ["privacy.clip=1.0", "privacy.seed=7", "codec.error_feedback=false"]


@pytest.mark.slow
@pytest.mark.parametrize("noise", [
    pytest.param(["privacy.noise_multiplier=0.5"], id="noise_multiplier"),
    # privacy.epsilon sets the noise multiplier from the largest client sample rate (batch /
    # examples): a client process learns the others' counts from the server's "start" message.
    pytest.param(["privacy.epsilon=8.0"], id="epsilon"),
])
def test_private_federation_equals_the_in_process_run(tmp_path, noise):
    write_data(tmp_path)
    config = write_config(tmp_path)
    private = [*BASE, *noise]
    run_beside_in_process(tmp_path, config, private,
                          local={"local": private, "plain": [*BASE, "privacy.noise_multiplier=0.0"]})
    fed_dir, local_dir = tmp_path / "runs" / "fed", tmp_path / "runs" / "local"
    sb = assert_same_training(fed_dir, local_dir)
    sa = json.loads((local_dir / "summary.json").read_text())
    # The same releases at the same sample rates: the same epsilon, per client and overall.
    assert sb["privacy"] == sa["privacy"]
    cut = sb["privacy"]["cut"]
    assert cut["clip"] == 1.0 and cut["noise_multiplier"] == (0.5 if "noise_multiplier" in noise[0] else
                                                               pytest.approx(0.667, abs=0.01))
    assert cut["releases"] == {str(c): 4 for c in range(len(CLIENTS))}  # one per step, train.steps=4
    assert 0 < sb["privacy"]["epsilon"] < float("inf")
    # The noise is in the packets: the noise-free run's losses differ from the first step on (the
    # server's loss of step 0 is computed on the clients' noised activations).
    plain, got = step_records(tmp_path / "runs" / "plain"), step_records(fed_dir)
    assert plain[0][1] != pytest.approx(got[0][1], rel=1e-4)
