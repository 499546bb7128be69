"""hesse.influence against leave-one-out retraining and an autograd reference (float64)."""

import re

import pytest
import torch

import hesse

DT = torch.float64
N, D, LAM = 100, 5, 0.05


def _logistic_problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g, dtype=DT)
    X = torch.randn(N, D, generator=g, dtype=DT)
    y = (torch.rand(N, generator=g, dtype=DT) < torch.sigmoid(X @ w)).to(DT)
    Xt = torch.randn(12, D, generator=g, dtype=DT)
    yt = (torch.rand(12, generator=g, dtype=DT) < torch.sigmoid(Xt @ w)).to(DT)
    return X, y, Xt, yt


def _newton(X, y, weights, theta=None):
    """argmin (1/N) sum_i w_i bce_i + LAM/2 ||theta||^2 by Newton's method (closed forms)."""
    A = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], dim=1)
    theta = torch.zeros(D + 1, dtype=DT) if theta is None else theta.clone()
    for _ in range(50):
        p = torch.sigmoid(A @ theta)
        grad = A.T @ (weights * (p - y)) / N + LAM * theta
        hess = (A.T * (weights * p * (1 - p))) @ A / N + LAM * torch.eye(D + 1, dtype=DT)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.norm()) < 1e-15:
            break
    return theta


def _bce(theta, X, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(
        X @ theta[:D] + theta[D], y, reduction="none"
    )


@pytest.fixture(scope="module")
def trained():
    X, y, Xt, yt = _logistic_problem()
    theta = _newton(X, y, torch.ones(N, dtype=DT))
    model = torch.nn.Linear(D, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(theta[:D])
        model.bias.copy_(theta[D])
    return model, theta, (X, y.unsqueeze(1)), (Xt, yt.unsqueeze(1))


def test_predicts_leave_one_out_retraining(trained):
    model, theta, (X, y), (Xt, yt) = trained
    scores = hesse.influence(
        model, torch.nn.BCEWithLogitsLoss(), (X, y), (Xt, yt), method="exact", damping=LAM
    )
    assert scores.shape == (N, 12)
    removed = 60
    actual = torch.empty(removed, 12, dtype=DT)
    base = _bce(theta, Xt, yt[:, 0])
    for i in range(removed):
        weights = torch.ones(N, dtype=DT)
        weights[i] = 0  # removing z_i: eps = -1/N in Koh & Liang's upweighting
        actual[i] = _bce(_newton(X, y[:, 0], weights, theta), Xt, yt[:, 0]) - base
    predicted = -scores[:removed] / N
    for j in range(12):
        r = torch.corrcoef(torch.stack([actual[:, j], predicted[:, j]]))[0, 1]
        assert float(r) >= 0.95, (j, float(r))


@pytest.mark.parametrize(
    ("curvature", "method"), [("ggn", "cg"), ("hessian", "cg"), ("hessian", "minres")]
)
def test_iterative_equals_exact(trained, curvature, method):
    model, _, train, test = trained
    loss = torch.nn.BCEWithLogitsLoss()
    exact = hesse.influence(
        model, loss, train, test, curvature=curvature, method="exact", damping=LAM
    )
    iterative, info = hesse.influence(
        model, loss, train, test, curvature=curvature, method=method, damping=LAM,
        rtol=1e-13, test_batch_size=5, return_info=True,
    )  # fmt: skip
    torch.testing.assert_close(iterative, exact, rtol=1e-8, atol=1e-10)
    assert bool(info.converged.all()) and info.residual_norm.shape == (12,)
    assert info.settings["method"] == method and info.settings["damping"] == LAM
    assert info.num_matvecs > 0


def test_lissa_within_its_reported_error(trained):
    model, _, train, test = trained
    loss = torch.nn.BCEWithLogitsLoss()
    exact = hesse.influence(model, loss, train, test, method="exact", damping=0.5)
    scores, info = hesse.influence(
        model, loss, train, test, method="lissa", damping=0.5, batch_size=20, scale=1.5,
        depth=60, repeats=16, generator=torch.Generator().manual_seed(0), rtol=0.5,
        return_info=True,
    )  # fmt: skip
    # Truncation: (1 - 0.5 / 1.5)^61 < 1e-10 of the solution; the rest is sampling noise.
    z = (scores - exact) / info.stderr
    assert float((z.abs() <= 4.5).float().mean()) >= 0.99
    assert float(z.abs().mean()) < 1.3
    assert info.settings["repeats"] == 16 and info.stderr.shape == scores.shape


def test_self_influence_is_the_diagonal(trained):
    model, _, train, _ = trained
    loss = torch.nn.BCEWithLogitsLoss()
    full = hesse.influence(model, loss, train, train, method="exact", damping=LAM)
    diagonal = hesse.self_influence(model, loss, train, method="cg", damping=LAM, rtol=1e-12)
    torch.testing.assert_close(diagonal, torch.diagonal(full), rtol=1e-8, atol=1e-10)
    # A sum-reduced loss gives the same scores: C is always that of the mean loss.
    summed = torch.nn.BCEWithLogitsLoss(reduction="sum")
    torch.testing.assert_close(
        hesse.influence(model, summed, train, train, method="exact", damping=LAM), full
    )


def test_mlp_against_autograd_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(
        DT
    )
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(15, 3, generator=g, dtype=DT), torch.randint(0, 3, (15,), generator=g)
    Xt, yt = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())

    def flat_grad(loss, **kw):
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, **kw)])

    grad = flat_grad(loss_fn(model(X), y), create_graph=True)
    H = torch.stack([flat_grad(grad[i], retain_graph=True) for i in range(len(grad))])
    G = torch.stack([flat_grad(loss_fn(model(X[i : i + 1]), y[i : i + 1])) for i in range(15)])
    Gt = torch.stack([flat_grad(loss_fn(model(Xt[j : j + 1]), yt[j : j + 1])) for j in range(4)])
    damping = 0.3
    reference = -G @ torch.linalg.solve(H + damping * torch.eye(len(H), dtype=DT), Gt.T)
    scores = hesse.influence(
        model, loss_fn, (X, y), (Xt, yt), curvature="hessian", method="exact", damping=damping
    )
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)


def test_bad_input(trained):
    model, _, (X, y), (Xt, yt) = trained
    loss = torch.nn.BCEWithLogitsLoss()
    call = re.escape("hesse.influence(model, loss_fn, train_data, test_data): ")

    def run(train=(X, y), test=(Xt, yt), **kw):
        return hesse.influence(
            model, loss, train, test, **{"method": "exact", "damping": LAM, **kw}
        )

    with pytest.raises(
        ValueError,
        match=call
        + r"test inputs must match the training inputs per point: expected shape \(n, 5\)",
    ):
        run(test=(Xt[:, :4], yt))
    with pytest.raises(ValueError, match="test targets must match the training targets"):
        run(test=(Xt, yt[:, 0]))
    with pytest.raises(ValueError, match="test inputs must match .* got .* of torch.float32"):
        run(test=(Xt.float(), yt))
    bad = X.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="train_data inputs have non-finite entries .* at point 7"):
        run(train=(bad, y))
    # Finite data, non-finite gradient: 2 (f - y) overflows for the target 1e308 of point 3.
    far = yt.clone()
    far[3] = 1e308
    with pytest.raises(ValueError, match="the gradient of the loss at test point 3 is not finite"):
        hesse.influence(model, torch.nn.MSELoss(), (X, y), (Xt, far), damping=LAM)
    with pytest.raises(ValueError, match="expected damping >= 0"):
        run(damping=-1.0)
    with pytest.raises(TypeError, match="expected train_data to be an \\(inputs, targets\\) pair"):
        run(train=[X, y, y])
    with pytest.raises(ValueError, match="same number .* of points"):
        run(train=(X, y[:5]))
    with pytest.raises(ValueError, match="method='lissa' needs scale"):
        run(method="lissa")
    with pytest.raises(ValueError, match="a generator is required"):
        run(method="lissa", scale=1.0, depth=3, batch_size=10)
    with pytest.raises(NotImplementedError, match="method='ekfac' inverts the EKFAC operator"):
        run(method="ekfac")
    with pytest.raises(
        ValueError, match="curvature should be one of 'ggn', 'hessian', 'kfac', 'ekfac'"
    ):
        run(curvature="fisher")
    # More parameters than data: the GGN is singular and damping=0 leaves it so.
    wide = torch.nn.Linear(5, 3).to(DT)
    with pytest.raises(ValueError, match=r"C \+ damping I is singular .* Raise damping"):
        hesse.influence(
            wide, torch.nn.CrossEntropyLoss(), (X[:2], torch.tensor([0, 1])),
            (X[:1], torch.tensor([0])), method="exact",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("curvature", "method"), [("kfac", "exact"), ("ekfac", "ekfac"), ("kfac", "cg")]
)
def test_kronecker_curvatures_against_their_dense_matrix(curvature, method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(
        DT
    )
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    test = (X[:5] + 0.1, y[:5])
    loss_fn = torch.nn.CrossEntropyLoss()
    cls = hesse.KFACOperator if curvature == "kfac" else hesse.EKFACOperator
    K = cls(model, loss_fn, [(X, y)]).to_dense()
    damping = 0.1
    scores = hesse.influence(
        model, loss_fn, (X, y), test, curvature=curvature, method=method, damping=damping,
        rtol=1e-13,
    )  # fmt: skip
    params = list(model.parameters())

    def flat_grad(loss):
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])

    Gtr = torch.stack([flat_grad(loss_fn(model(X[i : i + 1]), y[i : i + 1])) for i in range(30)])
    Gte = torch.stack(
        [flat_grad(loss_fn(model(test[0][j : j + 1]), test[1][j : j + 1])) for j in range(5)]
    )
    reference = -Gtr @ torch.linalg.solve(K + damping * torch.eye(len(K), dtype=DT), Gte.T)
    torch.testing.assert_close(scores, reference, rtol=1e-8, atol=1e-11)
