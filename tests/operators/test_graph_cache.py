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


# -- invalidation: a kept graph never answers for a changed model or batch -------------
class Normed(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear: buffers and a train/eval switch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.out(torch.tanh(self.bn(self.inp(x))))


def normed_problem():
    g = torch.Generator().manual_seed(4)
    model = Normed().to(DT).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(generator=g)
        model.bn.running_var.uniform_(0.5, 2.0, generator=g)
    data = [
        (torch.randn(4, 6, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
        for _ in range(2)
    ]
    return model, data


def changes():
    """In-place changes between two products, each of which changes the operator."""

    def selected_parameter(model, data):
        with torch.no_grad():
            model.inp.weight.mul_(1.5)  # the one selected parameter: the operator sees it

    def fixed_parameter(model, data):
        with torch.no_grad():
            model.out.weight.mul_(1.5)  # not selected: read on every forward

    def input_tensor(model, data):
        data[0][0].mul_(2.0)  # the same tensor object, new values

    def target_tensor(model, data):
        data[1][1][:] = (data[1][1] + 1) % 3

    def buffer(model, data):
        model.bn.running_mean.add_(0.5)

    def mode(model, data):
        model.train()  # batch statistics instead of running ones

    def replaced_buffer(model, data):
        model.bn.running_var = model.bn.running_var * 2

    return [selected_parameter, fixed_parameter, input_tensor, target_tensor, buffer, mode,
            replaced_buffer]  # fmt: skip


@pytest.mark.parametrize("change", changes(), ids=lambda f: f.__name__)
def test_a_kept_graph_is_dropped_when_the_model_or_batch_changes_in_place(change):
    model, data = normed_problem()
    loss = nn.CrossEntropyLoss()
    kwargs = {"params": ["inp.weight"]}  # one leaf: the operator's vector views the weight
    cached = hesse.HessianOperator(model, loss, data, cache_graphs=True, **kwargs)
    V = torch.randn(cached.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    before = cached @ V
    change(model, data)
    fresh = hesse.HessianOperator(model, loss, data, **kwargs)
    expected = fresh @ V
    assert (expected - before).abs().max() > 1e-6  # the change does change the operator
    torch.testing.assert_close(cached @ V, expected, rtol=0, atol=1e-12)
    model.calls = 0
    torch.testing.assert_close(cached @ V, expected, rtol=0, atol=1e-12)
    assert model.calls == 0  # the rebuilt graphs are kept again


def test_cached_and_session_products_equal_plain_autograd():
    model, data = problem(batches=2)
    loss = nn.CrossEntropyLoss()
    H = reference_hessian(model, data)
    V = torch.randn(H.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(6))
    cached = hesse.HessianOperator(model, loss, data, cache_graphs=True)
    plain = hesse.HessianOperator(model, loss, data)
    for _ in range(2):
        torch.testing.assert_close(cached @ V, H @ V, rtol=0, atol=1e-10)
        torch.testing.assert_close(plain @ V[:, 0], H @ V[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(plain.to_dense(), H, rtol=0, atol=1e-10)


# -- NOTE [graph sessions]: one algorithm's call keeps the graphs, then drops them -------
def test_a_session_builds_each_graph_once_and_releases_it():
    model, data = problem(batches=2)
    loss = nn.CrossEntropyLoss()
    H = reference_hessian(model, data)
    op = hesse.HessianOperator(model, loss, data)
    op.chunk_size = 7  # to_dense takes several products
    model.calls = 0
    dense = op.to_dense()
    assert model.calls == len(data)  # one forward per batch for all ceil(n / 7) products
    torch.testing.assert_close(dense, H, rtol=0, atol=1e-10)
    assert not op._graphs.entries and op._graphs.used == 0 and op._graphs.budget == 0
    model.calls = 0
    op @ torch.zeros(op.shape[0], dtype=DT)
    op @ torch.zeros(op.shape[0], dtype=DT)
    assert model.calls == 2 * len(data)  # outside a session every product rebuilds

    model.calls = 0
    result = hesse.eigsh(2.0 * op, 3, generator=torch.Generator().manual_seed(0))  # composed
    assert model.calls == len(data)
    expected = torch.linalg.eigvalsh(2.0 * H)[-3:]
    torch.testing.assert_close(result.eigenvalues.sort().values, expected, rtol=1e-7, atol=1e-9)
    assert not op._graphs.entries


def test_a_session_respects_the_memory_budget_and_skips_random_models():
    model, data = problem(batches=3)
    loss = nn.CrossEntropyLoss()
    probe = hesse.HessianOperator(model, loss, data[:1], cache_graphs=True)
    probe @ torch.zeros(probe.shape[0], dtype=DT)
    one = probe._graphs.used
    op = hesse.HessianOperator(model, loss, data, memory_budget=int(1.5 * one))
    op.chunk_size = 10
    model.calls = 0
    dense = op.to_dense()
    chunks = -(-op.shape[0] // 10)
    assert model.calls == 1 + (len(data) - 1) * chunks  # one graph kept, two rebuilt
    torch.testing.assert_close(dense, reference_hessian(model, data), rtol=0, atol=1e-10)

    dropout = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DT).train()
    random = hesse.HessianOperator(dropout, loss, data)
    with random._keep_graphs():
        random @ torch.zeros(random.shape[0], dtype=DT)
        assert not random._graphs.entries  # every pass draws new masks: nothing is kept


def test_a_dict_of_inputs_given_a_new_tensor_is_rebuilt():
    model, data = problem(batches=1)
    loss = nn.CrossEntropyLoss()
    batches = [({"x": data[0][0]}, data[0][1])]  # keyword inputs: forward(x=...)
    cached = hesse.HessianOperator(model, loss, batches, cache_graphs=True)
    v = torch.randn(cached.shape[0], dtype=DT, generator=torch.Generator().manual_seed(7))
    before = cached @ v
    batches[0][0]["x"] = data[0][0] * 2  # the same dict object now holds another tensor
    expected = hesse.HessianOperator(model, loss, batches) @ v
    assert (expected - before).abs().max() > 1e-6
    torch.testing.assert_close(cached @ v, expected, rtol=0, atol=1e-12)
