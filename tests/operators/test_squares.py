"""NOTE [verification tolerance] in ``hesse/operators/_squares.py``: the first-batch
check that a layer rule's gradient is autograd's accepts rounding, rejects other uses."""

from __future__ import annotations

import torch
from torch import nn

import hesse
from hesse.operators._squares import same_gradient


def _cancelling_terms(m: int) -> torch.Tensor:
    """``m`` float32 products whose sum cancels: large magnitudes, a small total."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(m, generator=gen, dtype=torch.float64) * 1e3
    return (t - t.mean() + 1e-2).to(torch.float32)


def test_two_summation_orders_agree() -> None:
    t = _cancelling_terms(51_200)
    forward = t.sum(0, keepdim=True)
    backward = t.flip(0).reshape(-1, 8).sum(0).sum(0, keepdim=True)  # another order
    sizes = t.abs().sum(0, keepdim=True)
    # The old tolerance, relative to the entries alone, rejects these rounding differences.
    assert not torch.allclose(forward, backward, rtol=1e-5, atol=1e-6 * float(backward.abs()))
    assert same_gradient(forward, backward, sizes, t.numel())


def test_another_use_of_the_weight_is_rejected() -> None:
    t = _cancelling_terms(51_200)
    sizes = t.abs().sum(0, keepdim=True)
    true = t.sum(0, keepdim=True)
    for dtype in (torch.float32, torch.float64):
        other = 1e-3 * sizes.to(dtype)  # a term the rule does not see
        assert not same_gradient(true.to(dtype), (true + other).to(dtype), sizes.to(dtype), 51_200)


def test_float32_functional_use_goes_to_the_generic_path() -> None:
    """A weight also used outside its module, in float32: still rejected by the check."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tied = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.tied(x)) + torch.sin(x @ self.tied.weight)
            return self.head(h)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    G = hesse.GGNOperator(Tied(), nn.CrossEntropyLoss(), [(X, y)])
    got = hesse.diagonal(G)
    assert set(G._linear_plan) == {"head."}
    torch.testing.assert_close(got, G.to_dense().diagonal(), rtol=1e-4, atol=1e-7)


def test_float32_conv_over_many_positions_keeps_the_fast_path() -> None:
    """The sweep's MC cell, CNN at B=512 in float32: 51,200 terms per first-layer entry."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(72, 10),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(512, 1, 12, 12, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # where the old tolerance rejected the first convolution
    try:
        G = hesse.GGNOperator(model, nn.CrossEntropyLoss(), [(X, y)])
        got = hesse.diagonal(G, method="mc", generator=torch.Generator().manual_seed(0)).value
    finally:
        torch.set_num_threads(threads)
    assert set(G._linear_plan) == {"0.", "3.", "6."}
    G64 = hesse.GGNOperator(model.double(), nn.CrossEntropyLoss(), [(X.double(), y)])
    want = hesse.diagonal(G64, method="mc", generator=torch.Generator().manual_seed(0)).value
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-7)
