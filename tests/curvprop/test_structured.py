"""Structured column rules of curvature propagation, against plain autograd double backward.

NOTE [diagonal columns] (elementwise residuals kept as values, elementwise products as
two diagonal sources, ``mm``/``addmm`` of diagonal columns by ``einsum``, at sink and
non-sink factors) and NOTE [column compression] (whole sources refactored at small
nodes). References: one double backward per parameter (``torch.autograd.grad`` with
``create_graph=True`` twice), never ``torch.func.hessian`` (wrong after Linear ->
LayerNorm on torch 2.13). float64, to 1e-10.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
from hesse.curvprop import _exact

DT = torch.float64


def autograd_diagonal(model, loss_fn, x, y) -> torch.Tensor:
    """The Hessian diagonal over all parameters, one double backward per parameter."""
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    flat.requires_grad_(True)
    shapes = [p.shape for _, p in model.named_parameters()]
    pieces = torch.split(flat, [s.numel() for s in shapes])
    state = {k: q.reshape(s) for k, q, s in zip(names, pieces, shapes)}
    loss = loss_fn(functional_call(model, state, (x,)), y)
    (g,) = torch.autograd.grad(loss, flat, create_graph=True)
    rows = [torch.autograd.grad(g[i], flat, retain_graph=True)[0][i] for i in range(flat.numel())]
    return torch.stack(rows).detach()


class Gated(nn.Module):
    """Elementwise residuals and products on full-shape tensors, weights used twice
    (non-sink ``mm`` factors), a bias-free ``mm``, a residual stream and LayerNorm."""

    def __init__(self, d: int = 5, c: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)
        self.mix = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h * torch.sigmoid(self.gate(h))  # elementwise product of two curved tensors
        h = self.mix(h) + self.mix(torch.exp(-h * h))  # one weight used twice
        return self.out(self.ln(x + h)).flatten(0, -2)


def _problem():
    torch.manual_seed(0)
    model = Gated().to(DT)
    x = torch.randn(2, 3, 5, dtype=DT)
    y = torch.randint(0, 3, (6,))
    return model, nn.CrossEntropyLoss(), x, y


def test_diagonal_columns_match_autograd():
    model, loss_fn, x, y = _problem()
    H = hesse.HessianOperator(model, loss_fn, [(x, y)])
    got = hesse.diagonal(H, method="exact")
    ref = autograd_diagonal(model, loss_fn, x, y)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_rules_are_used(monkeypatch):
    """The rules above run on this model (so the comparison tests them)."""
    used = {"product": 0, "mm": 0, "compress": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            used[name] += 1
            return real(*args, **kwargs)

        return wrapped

    P = _exact.Propagation
    monkeypatch.setattr(P, "_product_residual", counting("product", P._product_residual))
    monkeypatch.setattr(P, "_transport_mm_diagonal", counting("mm", P._transport_mm_diagonal))
    real_compress = P._compress

    def compress(self, value, here):
        before = set(here)
        real_compress(self, value, here)
        used["compress"] += set(here) != before

    monkeypatch.setattr(P, "_compress", compress)
    monkeypatch.setattr(_exact, "COMPRESS_RATIO", 1)
    model, loss_fn, x, y = _problem()
    got = hesse.diagonal(hesse.HessianOperator(model, loss_fn, [(x, y)]), method="exact")
    assert used["product"] > 0 and used["mm"] > 0 and used["compress"] > 0
    torch.testing.assert_close(got, autograd_diagonal(model, loss_fn, x, y), atol=1e-10, rtol=0)


@pytest.mark.parametrize("limit", [0, 2048])
def test_compression_does_not_change_values(monkeypatch, limit):
    """With compression off (limit 0) and at every node that allows it (ratio 1)."""
    monkeypatch.setattr(_exact, "COMPRESS_LIMIT", limit)
    monkeypatch.setattr(_exact, "COMPRESS_RATIO", 1)
    model, loss_fn, x, y = _problem()
    got = hesse.per_sample_diagonal(model, loss_fn, x, y)
    total = torch.cat([v.sum(0).reshape(-1) for v in got.values()])
    torch.testing.assert_close(
        total, autograd_diagonal(model, loss_fn, x, y), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_cost_model_choice_keeps_values(monkeypatch, margin):
    """NOTE [cost model]: margin 0 forces the basis products after the first sample;
    the default keeps curvature propagation here. Both give the autograd diagonal."""
    from hesse.curvprop import _api

    monkeypatch.setattr(_api, "BRUTE_FORCE_MARGIN", margin)
    sweeps = []
    real = _api.sample_row
    monkeypatch.setattr(_api, "sample_row", lambda *a: sweeps.append(1) or real(*a))
    model, loss_fn, x, y = _problem()
    got = hesse.diagonal(hesse.HessianOperator(model, loss_fn, [(x, y)]), method="exact")
    assert len(sweeps) == (1 if margin == 0.0 else 2)  # first sample, then the rest or none
    torch.testing.assert_close(got, autograd_diagonal(model, loss_fn, x, y), atol=1e-10, rtol=0)
