"""strategy=sl (vanilla split learning: clients one after another, adapters relayed through the
server) and the U-shaped SplitLoRA (labels stay on the clients, which report their loss) as
federations of real processes on loopback (mutual TLS): the same adapters, step losses and byte
counts as the in-process run of the same config (rtol 1e-5 / atol 1e-6 for the
adapters, rel 1e-6 for losses, bytes exactly). The reference run goes on beside the federation's
processes; every wait is bounded and every process is killed in a `finally`."""
import pytest
from fed_testutil import assert_same_training, run_beside_in_process, write_config, write_data


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["strategy=sl"], ["train.u_shape=true", "model.server_end=2"]],
                         ids=["sl", "u_shape"])
def test_federation_equals_the_in_process_run(tmp_path, variant):
    write_data(tmp_path)
    config = write_config(tmp_path)
    run_beside_in_process(tmp_path, config, variant)
    assert_same_training(tmp_path / "runs" / "fed", tmp_path / "runs" / "local")
