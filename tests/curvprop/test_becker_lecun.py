"""Becker-LeCun / HesScale diagonals: an independent hand-written recursion, BackPACK, and error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.curvprop import per_sample_diagonal
from tests.curvprop.test_exact import NAMES, cases, dense_diagonal, flat, mlp

D = torch.float64


def hesscale_by_hand(model: nn.Sequential, x, y):
    """The diagonal-only recursion for Linear-tanh-Linear-tanh-Linear + mean cross-entropy.

    Written layer by layer from Becker & LeCun (1989) / HesScale (Elsayed & Mahmood,
    2022): exact diag(softmax Hessian) = p - p^2 at the logits, then
    d_h = (W^2)^T d_a, d_a = f'(a)^2 d_h + f''(a) g_h, d_W = d_a (x^2)^T.
    """
    w1, b1, w2, b2, w3, b3 = (p.detach() for p in model.parameters())
    n = x.shape[0]
    a1 = x @ w1.T + b1
    h1 = a1.tanh()
    a2 = h1 @ w2.T + b2
    h2 = a2.tanh()
    p = (h2 @ w3.T + b3).softmax(-1)
    g3 = (p - nn.functional.one_hot(y, p.shape[1]).to(D)) / n
    d3 = (p - p * p) / n
    t2 = 1 - h2**2
    gh2, dh2 = g3 @ w3, d3 @ w3**2
    da2 = t2**2 * dh2 - 2 * h2 * t2 * gh2
    t1 = 1 - h1**2
    gh1, dh1 = (t2 * gh2) @ w2, da2 @ w2**2
    da1 = t1**2 * dh1 - 2 * h1 * t1 * gh1
    outer = lambda d, v: torch.einsum("bo,bi->boi", d, v * v)  # noqa: E731
    return {
        "0.weight": outer(da1, x),
        "0.bias": da1,
        "2.weight": outer(da2, h1),
        "2.bias": da2,
        "4.weight": outer(d3, h2),
        "4.bias": d3,
    }


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)
    ).to(D)


def test_matches_the_layerwise_recursion_per_sample(gen):
    model = tanh_mlp()
    x, y = torch.randn(7, 4, generator=gen, dtype=D), torch.randint(0, 3, (7,), generator=gen)
    got = per_sample_diagonal(model, nn.CrossEntropyLoss(), x, y, method="becker-lecun")
    ref = hesscale_by_hand(model, x, y)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-14)


def test_last_layer_is_exact_and_hidden_layers_are_not(gen):
    model = tanh_mlp()
    x, y = torch.randn(7, 4, generator=gen, dtype=D), torch.randint(0, 3, (7,), generator=gen)
    loss = nn.CrossEntropyLoss()
    bl = flat(
        {
            k: v.sum(0)
            for k, v in per_sample_diagonal(model, loss, x, y, method="becker-lecun").items()
        }
    )
    exact = dense_diagonal(model, loss, x, y)
    last = sum(p.numel() for p in list(model.parameters())[:4])
    torch.testing.assert_close(bl[last:], exact[last:], rtol=0, atol=1e-14)
    # an approximation elsewhere: it drops the off-diagonal curvature
    assert (bl[:last] - exact[:last]).norm() > 1e-3 * exact[:last].norm()


def test_agrees_with_backpack_diaghessian_where_hesscale_is_exact(gen):
    """BackPACK has no HesScale extension; its DiagHessian is exact, and HesScale's
    last layer is exact too (Elsayed & Mahmood, 2022), so there they must agree."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagHessian

    model = tanh_mlp()
    x, y = torch.randn(7, 4, generator=gen, dtype=D), torch.randint(0, 3, (7,), generator=gen)
    got = per_sample_diagonal(model, nn.CrossEntropyLoss(), x, y, method="becker-lecun")
    bp_model = backpack.extend(tanh_mlp())
    bp_loss = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(DiagHessian()):
        bp_loss(bp_model(x), y).backward()
    for name, p in bp_model.named_parameters():
        if name.startswith("4."):
            torch.testing.assert_close(got[name].sum(0), p.diag_h, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_every_model_and_reports_its_error(name, gen):
    model, loss_fn, x, y = cases(gen)[name]
    bl = flat(
        {
            k: v.sum(0)
            for k, v in per_sample_diagonal(model, loss_fn, x, y, method="becker-lecun").items()
        }
    )
    exact = dense_diagonal(model, loss_fn, x, y)
    rel = ((bl - exact).norm() / exact.norm()).item()
    print(f"becker-lecun relative error on {name}: {rel:.3g}")
    assert torch.isfinite(bl).all()
    if name.startswith(("mlp", "cnn")):  # chains of layers: what the method was made for
        assert rel < 0.1
    # Normalisation, attention and shared weights couple many units through fan-out,
    # whose cross terms the diagonal-only recursion drops (relative errors near 0.4-2).


def test_operator_method(gen):
    model = tanh_mlp()
    data = [
        (torch.randn(6, 4, generator=gen, dtype=D), torch.randint(0, 3, (6,), generator=gen)),
        (torch.randn(3, 4, generator=gen, dtype=D), torch.randint(0, 3, (3,), generator=gen)),
    ]
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data)
    got = hesse.diagonal(op, method="becker-lecun")
    # dataset mean = (6 * mean_1 + 3 * mean_2) / 9: per-sample terms each weigh 1/9
    rows = [
        flat(per_sample_diagonal(model, nn.CrossEntropyLoss(), x, y, method="becker-lecun"), True)
        * x.shape[0]
        for x, y in data
    ]
    torch.testing.assert_close(got, torch.cat(rows).sum(0) / 9, rtol=0, atol=1e-14)


def test_untraceable_model_is_an_error(gen):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h if h.sum() > 0 else -h

    x, y = torch.randn(4, 3, generator=gen, dtype=D), torch.randint(0, 2, (4,), generator=gen)
    with pytest.raises(NotImplementedError, match="needs a traceable model"):
        per_sample_diagonal(Branchy().to(D), nn.CrossEntropyLoss(), x, y, method="becker-lecun")
    data = [(x, y)]
    op = hesse.HessianOperator(Branchy().to(D), nn.CrossEntropyLoss(), data)
    with pytest.raises(NotImplementedError, match="needs a model that curvature propagation"):
        hesse.diagonal(op, method="becker-lecun")


def test_mlp_with_relu_is_exact_when_only_the_output_is_curved(gen):
    """ReLU has no second derivative, so with one hidden layer the only dropped terms
    are the off-diagonals of the hidden-layer curvature: check the output layer."""
    model = mlp()
    x, y = torch.randn(5, 4, generator=gen, dtype=D), torch.randint(0, 3, (5,), generator=gen)
    loss = nn.CrossEntropyLoss()
    bl = per_sample_diagonal(model, loss, x, y, method="becker-lecun")
    exact = per_sample_diagonal(model, loss, x, y, method="exact")
    torch.testing.assert_close(bl["4.weight"], exact["4.weight"], rtol=0, atol=1e-14)
    torch.testing.assert_close(bl["4.bias"], exact["4.bias"], rtol=0, atol=1e-14)
