"""SavedActivationMeter (splitlora.memory): the bytes autograd keeps for the backward."""
import torch
from torch import nn

from splitlora.memory import SavedActivationMeter


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
