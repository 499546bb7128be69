"""hesse.diagonal: exact paths to 1e-10, estimators unbiased within their reported error."""

import pytest
import torch
from torch import nn

import hesse
from hesse.estimators import diagonal_methods, register_diagonal
from hesse.operators._base import LinearOperator

DT = torch.float64


def autograd_hessian(f, x):
    """Dense reference by unbatched double backward (independent of hesse)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return torch.stack(
        [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())]
    )


def f(x):
    return (x.sin() * x.roll(1)).sum() + (x**4).sum() + x[0] * x[-1] ** 3


def spd(n, gen, rank=None):
    M = torch.randn(n, rank or n, generator=gen, dtype=DT)
    return M @ M.T


def test_function_operator_exact_and_directional(gen):
    x = torch.randn(9, generator=gen, dtype=DT)
    ref = autograd_hessian(f, x).diagonal()
    H = hesse.hessian_operator(f)(x)
    torch.testing.assert_close(hesse.diagonal(H), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(hesse.diagonal(H, method="directional"), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        hesse.diagonal(H, method="directional", chunk_size=2), ref, rtol=0, atol=1e-10
    )


def test_separable_function_exact(gen):
    x = torch.randn(50, generator=gen, dtype=DT)
    H = hesse.hessian_operator(lambda z: (z.exp() * z).sum())(x)
    torch.testing.assert_close(hesse.diagonal(H), (x.exp() * (x + 2)), rtol=0, atol=1e-10)
    # n > chunk_size: the sparse (colouring) path when hesse.sparsity._sparse is present
    d = hesse.diagonal(H, chunk_size=8)
    torch.testing.assert_close(d, (x.exp() * (x + 2)), rtol=0, atol=1e-10)


def test_dense_and_generic_operator_exact(gen):
    A = spd(6, gen)
    torch.testing.assert_close(hesse.diagonal(A), A.diagonal())
    op = hesse.as_operator(A) + hesse.as_operator(A)  # a generic operator: basis products
    torch.testing.assert_close(
        hesse.diagonal(op, chunk_size=4), 2 * A.diagonal(), rtol=0, atol=1e-12
    )


def test_model_operators_exact(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(7, 3, generator=gen, dtype=DT)
    Y = torch.randint(0, 3, (7,), generator=gen)
    data = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    ce = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        parts = [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)]
        return ce(torch.func.functional_call(model, dict(zip(names, parts)), (X,)), Y)

    ref = autograd_hessian(loss, x0).diagonal()
    H = hesse.HessianOperator(model, ce, data)
    torch.testing.assert_close(hesse.diagonal(H), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(hesse.diagonal(H, chunk_size=7), ref, rtol=0, atol=1e-10)
    # GGN exact vs its own dense matrix built by products (products are tested against torch.func)
    G = hesse.GGNOperator(model, ce, data)
    torch.testing.assert_close(
        hesse.diagonal(G, chunk_size=3), G.to_dense().diagonal(), rtol=0, atol=1e-10
    )


def test_hutchinson_exact_on_diagonal_matrix(gen):
    d = torch.randn(20, generator=gen, dtype=DT)
    est = hesse.diagonal(torch.diag(d), method="hutchinson", num_matvecs=3, generator=gen)
    assert isinstance(est, hesse.Estimate) and est.num_matvecs == 3
    torch.testing.assert_close(est.value, d, rtol=0, atol=1e-14)
    assert est.stderr.abs().max() < 1e-14


@pytest.mark.parametrize("rank", [1, 4])
def test_xdiag_exact_on_low_rank(rank, gen):
    A = spd(30, gen, rank=rank)
    est = hesse.diagonal(A, method="xdiag", num_matvecs=2 * (rank + 2), generator=gen)
    assert est.num_matvecs == 2 * (rank + 2)
    torch.testing.assert_close(est.value, A.diagonal(), rtol=0, atol=1e-10)
    assert est.stderr.max() < 1e-9


def test_xdiag_exact_on_structurally_low_rank(gen):
    A = torch.zeros(12, 12, dtype=DT)
    A[:3, :3] = spd(3, gen)  # exact zeros in the sketch
    est = hesse.diagonal(A, method="xdiag", num_matvecs=10, generator=gen)
    torch.testing.assert_close(est.value, A.diagonal(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_stochastic_unbiased_within_reported_error(method, gen):
    A = spd(15, gen) + 0.5 * torch.randn(15, 15, generator=gen, dtype=DT)  # not symmetric
    runs = [hesse.diagonal(A, method=method, num_matvecs=12, generator=gen) for _ in range(60)]
    values = torch.stack([r.value for r in runs])
    mean = values.mean(0)
    err = values.std(0) / len(runs) ** 0.5
    z = (mean - A.diagonal()) / err
    assert z.abs().max() < 4.5
    # the reported standard errors describe the actual spread
    reported = torch.stack([r.stderr for r in runs]).square().mean(0).sqrt()
    ratio = reported / values.std(0)
    assert 0.5 < ratio.median() < 2.0


def test_generator_reproducible(gen):
    A = spd(70, gen)  # larger than the default budget of 64: estimated, not exact
    a = hesse.diagonal(A, method="xdiag", num_matvecs=8, generator=torch.Generator().manual_seed(5))
    b = hesse.diagonal(A, method="xdiag", num_matvecs=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    c = hesse.diagonal(A, method="hutchinson")  # default generator: seeded, reproducible
    d = hesse.diagonal(A, method="hutchinson")
    assert torch.equal(c.value, d.value) and c.num_matvecs == 64


@pytest.mark.parametrize("method", ["mc", "gnb"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_and_gnb_unbiased(method, loss, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(10, 3, generator=gen, dtype=DT)
    if loss == "ce":
        Y, loss_fn = torch.randint(0, 3, (10,), generator=gen), nn.CrossEntropyLoss()
    else:
        Y, loss_fn = torch.randn(10, 3, generator=gen, dtype=DT), nn.MSELoss()
    data = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    G = hesse.GGNOperator(model, loss_fn, data)
    exact = hesse.diagonal(G)
    est = hesse.diagonal(G, method=method, num_matvecs=400, generator=gen)
    assert est.num_matvecs == 400
    z = (est.value - exact) / est.stderr
    assert z.abs().max() < 5
    one = hesse.diagonal(G, method=method, generator=gen)
    assert one.stderr.isnan().all() and one.value.shape == exact.shape
    F = hesse.FisherOperator(model, loss_fn, data, kind="mc")
    assert hesse.diagonal(F, method=method, generator=gen).value.shape == exact.shape


def test_float32(gen):
    A = spd(5, gen).float()
    est = hesse.diagonal(torch.diag(A.diagonal()), method="hutchinson", num_matvecs=2)
    assert est.value.dtype == torch.float32
    x = torch.randn(4, generator=gen)
    H = hesse.hessian_operator(f)(x)
    assert hesse.diagonal(H).dtype == torch.float32


def test_registry_is_one_line(gen):
    class Flipped(LinearOperator):
        pass

    register_diagonal("trace-free", LinearOperator)(lambda op, **kw: torch.zeros(op.shape[0]))
    try:
        assert "trace-free" in diagonal_methods()
        assert torch.equal(hesse.diagonal(spd(3, gen), method="trace-free"), torch.zeros(3))
    finally:
        from hesse.estimators._diagonal import _REGISTRY

        del _REGISTRY[("trace-free", LinearOperator)]


def test_errors(gen):
    A = spd(4, gen)
    with pytest.raises(
        ValueError, match=r"hesse.diagonal\(op, method='nope'\): method should be one of"
    ):
        hesse.diagonal(A, method="nope")
    with pytest.raises(ValueError, match="expected a square operator"):
        hesse.diagonal(torch.ones(3, 4, dtype=DT))
    with pytest.raises(TypeError, match="hesse operator or a 2-D tensor"):
        hesse.diagonal([[1.0]])
    with pytest.raises(NotImplementedError, match="method 'directional' does not apply"):
        hesse.diagonal(A, method="directional")
    with pytest.raises(NotImplementedError, match="method 'mc' does not apply"):
        hesse.diagonal(A, method="mc")
    with pytest.raises(ValueError, match="num_matvecs should be a positive int"):
        hesse.diagonal(A, method="hutchinson", num_matvecs=0)
    with pytest.raises(ValueError, match="chunk_size should be a positive int"):
        hesse.diagonal(A, chunk_size=-1)
    with pytest.raises(TypeError, match="torch.Generator"):
        hesse.diagonal(A, method="hutchinson", generator=1)
    with pytest.raises(ValueError, match="xdiag needs num_matvecs >= 4"):
        hesse.diagonal(A, method="xdiag", num_matvecs=3)
    model = nn.Linear(2, 2).to(DT)
    data = [
        (torch.randn(3, 2, generator=gen, dtype=DT), torch.randn(3, 2, generator=gen, dtype=DT))
    ]
    F = hesse.FisherOperator(
        model, lambda o, y: ((o - y) ** 2).sum(1).mean(), data, kind="empirical"
    )
    with pytest.raises(
        NotImplementedError, match="sampled labels need a loss with a known output Hessian"
    ):
        hesse.diagonal(F, method="mc")


class Shared(nn.Module):
    """Linear modules called twice, a weight also used functionally, 3-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Linear(3, 3)
        self.tied = nn.Linear(3, 3)
        self.seq = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        self.unused(x)  # called, but its output never reaches the loss
        h = torch.tanh(self.twice(torch.tanh(self.twice(x))))
        h = self.tied(h) + torch.sin(h @ self.tied.weight)  # weight used outside its module
        h = self.seq(torch.stack([h, h.cos()], 1)).sum(1)  # (N, 2, 3) inputs
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_exact_ggn_diagonal_on_shared_and_functional_weights(loss, gen):
    torch.manual_seed(0)
    model = Shared().to(DT)
    X = torch.randn(9, 3, generator=gen, dtype=DT)
    if loss == "ce":
        Y, loss_fn = torch.randint(0, 2, (9,), generator=gen), nn.CrossEntropyLoss()
    else:
        Y, loss_fn = torch.rand(9, 2, generator=gen, dtype=DT).round(), nn.BCEWithLogitsLoss()
    data = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    G = hesse.GGNOperator(model, loss_fn, data)
    ref = G.to_dense().diagonal()
    torch.testing.assert_close(hesse.diagonal(G), ref, rtol=0, atol=1e-10)
    # only the head takes the fast path; the check rejected the functionally used weight
    assert set(G._linear_plan) == {"head.", "unused."}
    assert hesse.diagonal(G)[-12:].abs().max() == 0  # unused.weight and unused.bias
    F = hesse.FisherOperator(
        model, loss_fn, data, kind="empirical", params=["tied.weight", "head.bias"]
    )
    torch.testing.assert_close(hesse.diagonal(F), F.to_dense().diagonal(), rtol=0, atol=1e-10)


def test_exact_ggn_diagonal_batchnorm_train_includes_batch_coupling(gen):
    """NOTE [coupled rows]: batch statistics couple the samples; the reference is the
    Jacobian of the whole batch's output (one reverse pass per output entry)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT).train()
    X, Y = torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT)
    G = hesse.GGNOperator(model, nn.MSELoss(), [(X, Y)])
    x = G._x.detach().requires_grad_(True)
    out = G._forward(x, X).reshape(-1)
    J = torch.stack([torch.autograd.grad(o, x, retain_graph=True)[0] for o in out])
    reference = (2 * J.square()).sum(0) / Y.numel()  # MSE: H = 2 I over the mean's terms
    torch.testing.assert_close(hesse.diagonal(G), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.to_dense().diagonal(), reference, rtol=1e-10, atol=1e-12)
    assert G._rows_per_sample == 0  # the whole-batch path


def test_exact_ggn_diagonal_conv_layers(gen):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).to(DT)
    X = torch.randn(5, 2, 8, 8, generator=gen, dtype=DT)
    Y = torch.randint(0, 3, (5,), generator=gen)
    G = hesse.GGNOperator(model, nn.CrossEntropyLoss(), [(X[:3], Y[:3]), (X[3:], Y[3:])])
    torch.testing.assert_close(hesse.diagonal(G), G.to_dense().diagonal(), rtol=0, atol=1e-10)
    assert set(G._linear_plan) == {"0.", "2.", "4."}
    cols = G._factor_squares(G._factor, per_column=True)  # the path "mc" uses
    torch.testing.assert_close(cols.sum(0), G.to_dense().diagonal(), rtol=0, atol=1e-10)
    est = hesse.diagonal(G, method="mc", num_matvecs=3, generator=gen)
    assert est.value.shape == (G.shape[0],) and torch.isfinite(est.stderr).all()
