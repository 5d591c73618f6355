"""SavedActivationMeter (splitlora.memory): the bytes autograd keeps for the backward."""
import torch
from torch import nn

from splitlora.memory import ActivationPeaks, SavedActivationMeter, side_memory


def test_counts_distinct_saved_storages_and_leaves_out_the_excluded():
    x = torch.randn(16, 32)
    w = nn.Parameter(torch.randn(32, 8))
    with SavedActivationMeter(exclude=[w]) as meter:
        h = x @ w            # saves x (for w's gradient); w itself is excluded
        y = h.exp()          # saves its result
        z = (y * y).sum()    # saves y once (both operands are the same storage)
    assert meter.bytes == x.nbytes + y.nbytes
    z.backward()             # the hooks handed back what they were given: the gradient is exact
    torch.testing.assert_close(w.grad, x.t() @ (2 * y * y), rtol=1e-5, atol=1e-5)


def test_views_count_once_and_nothing_outside_the_block():
    a = torch.randn(64, requires_grad=True)
    with SavedActivationMeter() as meter:
        b = a * 3
        c = b[:32].sin() + b[32:].cos()   # saves two views of b's storage
    assert meter.bytes == b.nbytes  # b's storage, once
    d = c.exp()                            # after the block: not counted
    assert meter.bytes == b.nbytes
    d.sum().backward()
    assert a.grad is not None


def test_nothing_saved_without_grad():
    x = torch.randn(8, 8)
    with torch.no_grad(), SavedActivationMeter() as meter:
        (x @ x).exp()
    assert meter.bytes == 0


def test_activation_peaks_measure_only_forwards_that_can_set_a_new_peak():
    peaks = ActivationPeaks()
    w = nn.Parameter(torch.randn(8, 8))
    for rows in (4, 2, 6):  # 2 rows cannot beat 4: not measured
        x = torch.randn(rows, 8)
        with peaks.measure("client0", tokens=rows, exclude=[w]):
            (x @ w).exp().sum()
    assert peaks.peaks["client0"][0] == 6
    # x (6 x 8, for w's gradient) and exp's result (6 x 8): float32.
    assert peaks.bytes("client0") == 2 * 6 * 8 * 4 and peaks.bytes("server") is None
    again = ActivationPeaks()
    again.load_state_dict(peaks.state_dict())
    assert again.peaks == peaks.peaks


def test_side_memory_counts_weights_gradients_and_optimizer_state():
    frozen = nn.Linear(16, 16)
    frozen.requires_grad_(False)
    adapter = nn.Linear(16, 4, bias=False)
    model = nn.Sequential(frozen, adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=0.1)
    before = side_memory([model], opt, activation_bytes=100)
    assert before["weights_bytes"] == (16 * 16 + 16 + 4 * 16) * 4
    assert before["gradient_bytes"] == 4 * 16 * 4 and before["optimizer_bytes"] == 0  # no step yet
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    after = side_memory([model, adapter], opt, activation_bytes=100)  # adapter listed twice: counted once
    # AdamW: two moments of the adapter's shape, plus a one-element step counter.
    assert after["optimizer_bytes"] == 2 * 4 * 16 * 4 + opt.state[adapter.weight]["step"].nbytes
    assert after["weights_bytes"] == before["weights_bytes"]
    assert after["total_bytes"] == sum(after[k] for k in ("weights_bytes", "gradient_bytes", "optimizer_bytes")) + 100
    assert side_memory([model], opt, activation_bytes=None)["total_bytes"] is None
