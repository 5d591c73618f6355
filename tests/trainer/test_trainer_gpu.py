"""The trainer on a GPU: the CUDA codec, the Triton LoRA kernels and the side-stream encoder."""
import pytest
import torch

from splitlora.strategies import make_strategy
from splitlora.trainer import build
from trainer_testutil import tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _one_tile_config(monkeypatch):
    # The tiny model's layers come in many shapes: autotuning each one's Triton kernels would take
    # minutes and test nothing these tests check (the kernels' numbers do not depend on the tile).
    monkeypatch.setenv("SPLITLORA_TRITON_AUTOTUNE", "0")


def _losses(cfg, steps):
    built = build(cfg, log=lambda *_: None)
    strategy = make_strategy(built.setup)
    losses = [strategy.train_step(step).loss for step in range(steps)]
    return strategy, losses


def test_cuda_run_matches_cpu_run(tmp_path):
    common = ["train.clients=2", "codec.bits=32", "train.max_grad_norm=null"]
    _, cpu = _losses(tiny_config(tmp_path, "device=cpu", *common), 4)
    _, gpu = _losses(tiny_config(tmp_path, "device=cuda", *common), 4)
    assert gpu == pytest.approx(cpu, rel=2e-3)


def test_cuda_side_stream_encoding_is_exact(tmp_path):
    extra = ["device=cuda", "codec.bits=4", "codec.error_feedback=true", "codec.stochastic=true", "train.clients=3"]
    on, on_losses = _losses(tiny_config(tmp_path, *extra, "codec.overlap=true"), 4)
    off, off_losses = _losses(tiny_config(tmp_path, *extra, "codec.overlap=false"), 4)
    assert on_losses == off_losses
    a, b = on.export_state()[1], off.export_state()[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert on.transport.ledger.summary() == off.transport.ledger.summary()


def test_cuda_hsplitlora_per_client_server_adapters_match_cpu(tmp_path):
    """The server's per-client adapters run the Triton multi-adapter kernel on CUDA; the CPU run
    takes the plain-torch reference per client. Same losses, within float32 summation order."""
    common = ["strategy=hsplitlora", "train.clients=3", "codec.bits=32", "train.max_grad_norm=null",
              "train.aggregate_every=2", "hsplitlora.server_adapters=per_client",
              "hsplitlora.devices={big: {tflops: 4.0}, small: {count: 2, tflops: 1.0}}"]

    def run(device):
        built = build(tiny_config(tmp_path, f"device={device}", *common, name=device), log=lambda *_: None)
        strategy = make_strategy(built.setup)
        losses = []
        for step in range(4):
            losses.append(strategy.train_step(step).loss)
            if step % 2 == 1:
                strategy.end_round(step)
        return strategy, losses

    cpu_strategy, cpu = run("cpu")
    gpu_strategy, gpu = run("cuda")
    assert len(set(cpu_strategy._server_ranks(cpu_strategy.plans))) > 1  # unequal server ranks
    assert gpu == pytest.approx(cpu, rel=2e-3)


def test_base_model_stays_in_host_memory_and_copies_go_to_the_gpu(tmp_path):
    """On a GPU the segments run on the device while the base model stays in host memory (one
    copy of the weights on the device, not two); the generation and centralized models are
    copied to the device with the base model's values; a client process holds no server weights."""
    from splitlora.trainer import _generation_model

    cfg = tiny_config(tmp_path, "device=cuda", "train.clients=2")
    built = build(cfg, log=lambda *_: None)
    assert all(p.device.type == "cpu" for p in built.setup.base_model.parameters())
    for segment in (built.setup.client, built.setup.server):
        assert all(p.device.type == "cuda" for p in segment.parameters())
    strategy = make_strategy(built.setup)
    strategy.train_step(0)
    whole = _generation_model(strategy, built)
    base = dict(built.setup.base_model.named_parameters())
    for name, p in whole.named_parameters():
        assert p.device.type == "cuda", name
        if name in base:
            assert torch.equal(p.cpu(), base[name]), name
    assert all(p.device.type == "cpu" for p in built.setup.base_model.parameters())  # left where it was

    central = make_strategy(build(tiny_config(tmp_path, "device=cuda", "strategy=centralized", name="c"),
                                  log=lambda *_: None).setup)
    assert all(p.device.type == "cuda" for p in central.model.parameters())

    client_built = build(cfg, log=lambda *_: None, role="client0")
    assert all(p.device.type == "cuda" for p in client_built.setup.client.parameters())
    assert all(p.is_meta for p in client_built.setup.server.parameters())  # no server weights at all


@pytest.mark.parametrize("strategy", ["splitlora", "centralized", "sl"])
def test_whole_cuda_run_evaluates_like_the_cpu_run(tmp_path, strategy):
    """train() end to end on CUDA, held-out loss and generation included: a split strategy's
    evaluation function is a closure with no parameters to read the device from, so the trainer
    must hand it the device (the token ids once stayed on the host and the run died in its first
    evaluation). The held-out loss matches the CPU run's within float32 summation order."""
    from splitlora.trainer import train

    common = [f"strategy={strategy}", "codec.bits=32", "train.max_grad_norm=null", "train.steps=4",
              "train.eval_every=2", "eval.generate=true"]
    cpu = train(tiny_config(tmp_path, "device=cpu", *common, name="cpu"), progress=False, log=lambda *_: None)
    gpu = train(tiny_config(tmp_path, "device=cuda", *common, name="gpu"), progress=False, log=lambda *_: None)
    assert gpu["eval_loss"] == pytest.approx(cpu["eval_loss"], rel=2e-3)
    assert 0.0 <= gpu["bleu"] <= 100.0 and len(gpu["samples"]) > 0
