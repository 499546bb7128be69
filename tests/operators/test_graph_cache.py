"""HessianOperator(cache_graphs=True): kept gradient graphs give the same products,
skip the forward pass, and stay within the memory budget."""

import pytest
import torch
from torch import nn

import hesse

DT = torch.float64


class Counted(nn.Module):
    """A residual MLP with LayerNorm that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.inp(x)
        return self.out(h + torch.tanh(self.norm(h)))


def problem(batches=3, batch=4):
    g = torch.Generator().manual_seed(0)
    model = Counted().to(DT)
    data = [
        (torch.randn(batch, 6, generator=g, dtype=DT), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(batches)
    ]
    return model, data


def reference_hessian(model, data):
    """Plain autograd double backward on the dataset-mean loss (no hesse)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)
    params = {k: t.reshape(s) for k, t, s in zip(names, theta.split(sizes), shapes)}
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (X,)), y)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    return torch.stack(
        [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(g.numel())]
    )


def test_cached_products_equal_uncached_and_skip_the_forward_pass():
    model, data = problem()
    loss = nn.CrossEntropyLoss()
    plain = hesse.HessianOperator(model, loss, data)
    cached = hesse.HessianOperator(model, loss, data, cache_graphs=True)
    n = plain.shape[0]
    V = torch.randn(n, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    H = reference_hessian(model, data)
    first = cached @ V
    model.calls = 0
    again = cached @ V  # every batch's graph is kept: no forward pass at all
    assert model.calls == 0
    single = cached @ V[:, 0]
    assert model.calls == 0
    expected = plain @ V
    assert model.calls == len(data)  # the uncached operator rebuilds every graph
    for got in (first, again):
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert torch.allclose(single, expected[:, 0], rtol=0, atol=1e-12)
    assert torch.allclose(expected, H @ V, rtol=0, atol=1e-12)
    assert len(cached._graphs.entries) == len(data)
    assert 0 < cached._graphs.used <= cached.memory_budget


def test_memory_budget_is_honoured():
    model, data = problem()
    loss = nn.CrossEntropyLoss()
    probe = hesse.HessianOperator(model, loss, data[:1], cache_graphs=True)
    probe @ torch.zeros(probe.shape[0], dtype=DT)
    one = probe._graphs.used  # bytes one batch's graph holds (all batches are alike)
    assert one > 0
    budget = int(1.5 * one)  # room for one graph, not two
    cached = hesse.HessianOperator(model, loss, data, cache_graphs=True, memory_budget=budget)
    V = torch.randn(cached.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    first = cached @ V
    assert len(cached._graphs.entries) == 1
    assert cached._graphs.used <= budget
    model.calls = 0
    second = cached @ V  # one graph kept, the other batches rebuilt
    assert model.calls == len(data) - 1
    expected = hesse.HessianOperator(model, loss, data) @ V
    assert torch.allclose(first, expected, rtol=0, atol=1e-12)
    assert torch.allclose(second, expected, rtol=0, atol=1e-12)
    assert cached._graphs.used <= budget


def test_a_changed_batch_is_rebuilt_not_answered_from_a_stale_graph():
    model, data = problem(batches=2)
    loss = nn.CrossEntropyLoss()
    batches = list(data)
    cached = hesse.HessianOperator(model, loss, batches, cache_graphs=True)
    v = torch.randn(cached.shape[0], dtype=DT, generator=torch.Generator().manual_seed(3))
    cached @ v
    batches[1] = (batches[1][0] * 2, batches[1][1])  # the same list now yields other data
    expected = hesse.HessianOperator(model, loss, batches) @ v
    assert torch.allclose(cached @ v, expected, rtol=0, atol=1e-12)


def test_errors():
    model, data = problem(batches=1)
    loss = nn.CrossEntropyLoss()
    with pytest.raises(
        TypeError,
        match=r"HessianOperator\(model, loss_fn, data\): expected cache_graphs to be True or False",
    ):
        hesse.HessianOperator(model, loss, data, cache_graphs="yes")
    with pytest.raises(ValueError, match=r"memory_budget should be positive"):
        hesse.HessianOperator(model, loss, data, cache_graphs=True, memory_budget=0)
