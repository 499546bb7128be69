"""hesse's laplace-torch backends against laplace-torch's own (BackPACK) and autograd (float64)."""

import re

import pytest
import torch

laplace = pytest.importorskip("laplace")
pytest.importorskip("backpack")

from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402

from hesse.integrations.laplace import (  # noqa: E402
    HesseEF,
    HesseGGN,
    HesseHessian,
    check_version,
)

DT = torch.float64
N = 24

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _model(outputs: int) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, outputs)
    ).to(DT)


def _data(likelihood: str):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, 3, (N,), generator=g)
        return X, y, 3
    return X, torch.randn(N, 2, generator=g, dtype=DT), 2


def _fit(backend, likelihood, subset, structure, **kwargs):
    X, y, outputs = _data(likelihood)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    la = Laplace(
        _model(outputs),
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        prior_precision=0.7,
        **kwargs,
    )
    la.fit(loader)
    return la, X


def _precision(la) -> torch.Tensor:
    P = la.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else P


def _assert_same_laplace(ours, theirs, X):
    torch.testing.assert_close(_precision(ours), _precision(theirs), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        ours.log_marginal_likelihood(), theirs.log_marginal_likelihood(), rtol=1e-8, atol=1e-8
    )
    a, b = ours(X[:6], pred_type="glm"), theirs(X[:6], pred_type="glm")
    for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_ggn_matches_backpack(likelihood, structure, subset):
    ours, X = _fit(HesseGGN, likelihood, subset, structure)
    theirs, _ = _fit(BackPackGGN, likelihood, subset, structure)
    _assert_same_laplace(ours, theirs, X)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_empirical_fisher_matches_peers(likelihood, structure):
    ours, X = _fit(HesseEF, likelihood, "all", structure)
    # BackPACK has no empirical KFAC; curvlinops' (through laplace) is the same quantity.
    theirs, _ = _fit(
        CurvlinopsEF if structure == "kron" else BackPackEF, likelihood, "all", structure
    )
    _assert_same_laplace(ours, theirs, X)
    ggn, _ = _fit(HesseGGN, likelihood, "all", structure)
    assert not torch.allclose(_precision(ours), _precision(ggn))  # a different matrix


def _cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(32, 3)
    ).to(DT)


@pytest.mark.parametrize(("structure", "peer"), [("kron", CurvlinopsGGN), ("diag", BackPackGGN)])
def test_cnn_matches_peer(structure, peer):
    # For convolutions laplace's BackPACK KFLR factors use another convention than the
    # Grosse & Martens (2016) "expand" KFAC that hesse and curvlinops compute.
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)
    fitted = []
    for backend in (HesseGGN, peer):
        la = Laplace(_cnn(), "classification", hessian_structure=structure, backend=backend)
        la.fit(loader)
        fitted.append(la)
    _assert_same_laplace(*fitted, X)


def test_subnetwork_matches_backpack():
    indices = torch.tensor([0, 3, 7, 20, 31, 32, 35])
    kwargs = dict(subnetwork_indices=indices)
    ours, X = _fit(HesseGGN, "classification", "subnetwork", "full", **kwargs)
    theirs, _ = _fit(BackPackGGN, "classification", "subnetwork", "full", **kwargs)
    _assert_same_laplace(ours, theirs, X)


def _double_backward_hessian(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters()]
    (g,) = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    ]
    rows = [torch.autograd.grad(g[i], params, retain_graph=True) for i in range(g.numel())]
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_exact_hessian_backend_equals_double_backward(likelihood):
    X, y, outputs = _data(likelihood)
    model = _model(outputs)
    backend = HesseHessian(model, likelihood)
    factor = 1.0 if likelihood == "classification" else 0.5
    lossfunc = backend.lossfunc
    H = _double_backward_hessian(model, factor * lossfunc(model(X), y))
    loss, full = backend.full(X, y)
    torch.testing.assert_close(full, H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, factor * lossfunc(model(X), y).detach())
    _, diag = backend.diag(X, y)
    torch.testing.assert_close(diag, torch.diagonal(H), rtol=1e-10, atol=1e-12)
    # Through laplace-torch: the posterior precision is the summed Hessian plus the prior.
    la, _ = _fit(HesseHessian, likelihood, "all", "full")
    torch.testing.assert_close(la.posterior_precision, H + 0.7 * torch.eye(len(H), dtype=DT))


def test_errors():
    with pytest.raises(
        ImportError,
        match=re.escape("expected laplace-torch >= 0.3, < 0.4, got laplace-torch 0.2.1"),
    ):
        check_version("0.2.1")
    with pytest.raises(ImportError, match="got laplace-torch 1.0"):
        check_version("1.0")
    assert check_version() == check_version(
        laplace.__version__ if hasattr(laplace, "__version__") else None
    )
    X, y, _ = _data("classification")
    backend = HesseHessian(_model(3), "classification")
    with pytest.raises(
        NotImplementedError,
        match=re.escape("HesseHessian.kron(x, y): the exact Hessian has no Kronecker"),
    ):
        backend.kron(X, y, N=N)
    with pytest.raises(NotImplementedError, match="dict-like .* CurvlinopsGGN"):
        HesseGGN(_model(3), "classification").diag({"input_ids": X}, y)
    with pytest.raises(TypeError, match="expected generator to be a torch.Generator"):
        HesseGGN(_model(3), "classification", stochastic=True, generator=0)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_monte_carlo_fisher_approaches_the_ggn(structure):
    def fit(**backend_kwargs):
        la, _ = _fit(HesseGGN, "classification", "all", structure, backend_kwargs=backend_kwargs)
        return _precision(la)

    ggn = fit()
    mc = fit(stochastic=True, num_samples=400, generator=torch.Generator().manual_seed(0))
    again = fit(stochastic=True, num_samples=400, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, again)  # the samples come from the generator only
    assert not torch.equal(mc, ggn)
    # E[MC Fisher] = GGN; with 400 labels per point the sampling error is a few per cent.
    assert float((mc - ggn).norm() / (ggn - 0.7 * torch.eye(len(ggn), dtype=DT)).norm()) < 0.1
