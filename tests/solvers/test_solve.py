"""hesse.solve / hesse.inverse against dense torch.linalg.solve (float64)."""

import re

import pytest
import torch

import hesse
from hesse.operators._base import SYMMETRIC, DenseOperator, LinearOperator
from hesse.solvers import NotConvergedError, NotConvergedWarning

DT = torch.float64
N = 40


def _matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=DT))
    A = Q @ torch.diag(eigenvalues) @ Q.T
    return (A + A.T) / 2


SPD = _matrix(torch.logspace(-2, 2, N, dtype=DT))
_ev = torch.linspace(-4, 4, N, dtype=DT)
INDEFINITE = _matrix(torch.where(_ev.abs() < 0.2, torch.full_like(_ev, 0.5), _ev), seed=1)


class _Matvec(LinearOperator):
    """A symmetric operator known only through products (no dense shortcut)."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device
        self.tags = frozenset({SYMMETRIC})

    def _matmat(self, X):
        return self.A @ X

    def _rmatmat(self, X):
        return self.A.T @ X


def _rhs(k: int | None, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, *(() if k is None else (k,)), generator=g, dtype=DT)


def _reference(A: torch.Tensor, b: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.linalg.solve(A + damping * torch.eye(N, dtype=DT), b)


def _check(result, A, b, damping, rtol):
    C = A + damping * torch.eye(N, dtype=DT)
    x = result.x
    true = torch.linalg.vector_norm(b - C @ x, dim=0)
    # The reported residual is the true residual of the returned x.
    # (equal up to the rounding of one product: eps ||C|| ||x||)
    rounding = 1e-14 * torch.linalg.matrix_norm(C, 2) * torch.linalg.vector_norm(x, dim=0)
    assert bool(((result.residual_norm - true).abs() <= rounding).all())
    assert bool(result.converged.all())
    assert bool((true <= rtol * torch.linalg.vector_norm(b, dim=0)).all())
    # Error bound from the residual: ||x - x*|| <= ||C^-1|| ||r||.
    ref = _reference(A, b, damping)
    bound = true / torch.linalg.eigvalsh(C).abs().min()
    assert bool((torch.linalg.vector_norm(x - ref, dim=0) <= bound * (1 + 1e-8) + 1e-12).all())


CASES = [
    ("cg", SPD, 0.0),
    ("cg", SPD, 0.5),
    ("minres", SPD, 0.1),
    ("minres", INDEFINITE, 0.0),
    ("minres", INDEFINITE, 0.05),
    ("lsmr", SPD, 0.5),
    ("lsmr", INDEFINITE, 0.0),
]


@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize(("method", "A", "damping"), CASES)
def test_matches_dense_solve(method, A, damping, k):
    b = _rhs(k)
    result = hesse.solve(_Matvec(A), b, method=method, damping=damping, rtol=1e-9)
    assert result.x.shape == b.shape
    assert result.residual_norm.shape == b.shape[1:]
    _check(result, A, b, damping, 1e-9)


def test_neumann_matches_dense_solve():
    A = _matrix(torch.linspace(0.5, 4.0, N, dtype=DT))
    b = _rhs(3)
    result = hesse.solve(A, b, method="neumann", damping=0.5, scale=4.5, rtol=1e-10)
    _check(result, A, b, 0.5, 1e-10)
    # The series contracts by max|1 - lambda/s| = 1 - 1/4.5 per step.
    assert result.iterations <= 1 + torch.log(torch.tensor(1e-10)) / torch.log(
        torch.tensor(1 - 1 / 4.5)
    )


@pytest.mark.parametrize("method", ["cg", "minres", "lsmr"])
def test_preconditioners(method):
    # A badly scaled SPD matrix that Jacobi fixes: D^1/2 S D^1/2, S well conditioned.
    d = torch.logspace(-3, 3, N, dtype=DT)
    S = _matrix(torch.linspace(1.0, 3.0, N, dtype=DT))
    A = d.sqrt()[:, None] * S * d.sqrt()[None, :]
    b = _rhs(3)
    if method != "lsmr":  # right preconditioning: A D^-1 is not well conditioned (non-normal)
        plain = hesse.solve(A, b, method=method, rtol=1e-9, max_matvecs=100_000)
        jacobi = hesse.solve(
            A, b, method=method, rtol=1e-9, preconditioner=hesse.solvers.jacobi(torch.diag(A))
        )
        _check(plain, A, b, 0.0, 1e-9)
        _check(jacobi, A, b, 0.0, 1e-9)
        assert jacobi.num_matvecs < plain.num_matvecs / 2
    # The exact inverse as preconditioner: one step (plus the residual check).
    exact = hesse.as_operator(torch.linalg.inv(A))
    once = hesse.solve(A, b, method=method, rtol=1e-9, preconditioner=exact)
    _check(once, A, b, 0.0, 1e-9)
    assert once.iterations <= 2


def test_block_cg_shares_the_krylov_space():
    b = _rhs(6)
    block = hesse.solve(SPD, b, damping=0.01, rtol=1e-9)
    singles = [hesse.solve(SPD, b[:, j], damping=0.01, rtol=1e-9) for j in range(6)]
    assert block.iterations < min(s.iterations for s in singles)
    # Dependent right-hand sides do not break the block recurrence.
    dependent = torch.cat([b[:, :2], 3 * b[:, :1], b[:, :1] - b[:, 1:2]], dim=1)
    _check(hesse.solve(SPD, dependent, damping=0.01, rtol=1e-9), SPD, dependent, 0.01, 1e-9)


def test_parameter_shaped_dicts():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(
        DT
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT))]
    G = hesse.GGNOperator(model, torch.nn.MSELoss(), data)
    b = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in model.named_parameters()}
    result = hesse.solve(G, b, damping=0.1, rtol=1e-10)
    assert set(result.x) == set(b) and result.residual_norm.shape == ()
    flat = torch.cat([b[k].reshape(-1) for k in b])
    C = G.to_dense() + 0.1 * torch.eye(flat.numel(), dtype=DT)
    expected = torch.linalg.solve(C, flat)
    torch.testing.assert_close(torch.cat([result.x[k].reshape(-1) for k in b]), expected)


def test_inverse_operator_composes():
    inv = hesse.inverse(_Matvec(SPD), damping=0.3, rtol=1e-11)
    b = _rhs(4)
    torch.testing.assert_close(inv @ b, _reference(SPD, b, 0.3), rtol=1e-8, atol=1e-10)
    assert inv.last_result.num_matvecs > 0 and bool(inv.last_result.converged.all())
    # (A + 0.3 I) (A + 0.3 I)^-1 = I, and the inverse composes with other operators.
    C = hesse.as_operator(SPD + 0.3 * torch.eye(N, dtype=DT))
    torch.testing.assert_close((C @ (inv @ b)), b, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close((inv + inv) @ b, 2 * (inv @ b))
    assert inv.is_symmetric


def test_lissa_is_unbiased_within_its_error():
    A = _matrix(torch.logspace(-1, 1, N, dtype=DT))
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(N, N, generator=g, dtype=DT) for _ in range(4)]
    mats = [A + 0.3 * (E + E.T) / 2 for E in noise]
    samples = [DenseOperator(m, tags=frozenset({SYMMETRIC})) for m in mats]
    mean = DenseOperator(sum(mats) / 4, tags=frozenset({SYMMETRIC}))
    b = _rhs(2)
    depth = 400
    result = hesse.solve(
        mean, b, method="lissa", damping=1.0, scale=20.0, depth=depth, repeats=16,
        samples=samples, generator=torch.Generator().manual_seed(0), rtol=0.5,
    )  # fmt: skip
    # E[x] is the depth-`depth` Neumann partial sum; its truncation error is tiny here.
    C = mean.matrix + torch.eye(N, dtype=DT)
    exact = torch.linalg.solve(C, b)
    truncation = torch.linalg.matrix_power(torch.eye(N, dtype=DT) - C / 20.0, depth + 1) @ exact
    z = (result.x - exact + truncation) / result.stderr
    assert float(z.abs().max()) < 5.0
    assert float(z.abs().mean()) < 1.5
    assert result.num_matvecs == 16 * depth * 2 + 2


def test_on_failure_warns_or_raises():
    b = _rhs(2)
    with pytest.warns(
        NotConvergedWarning, match=r"0 of 2 right-hand sides .* max_matvecs=6 was exhausted"
    ):
        result = hesse.solve(SPD, b, max_matvecs=6)
    assert not bool(result.converged.any())
    torch.testing.assert_close(
        result.residual_norm, torch.linalg.vector_norm(b - SPD @ result.x, dim=0)
    )
    with pytest.raises(NotConvergedError, match="max_matvecs=6 was exhausted"):
        hesse.solve(SPD, b, max_matvecs=6, on_failure="raise")
    with pytest.raises(NotConvergedError, match="not positive definite .* method='minres'"):
        hesse.solve(INDEFINITE, b, on_failure="raise")
    with pytest.raises(NotConvergedError, match=r"the series diverges: scale=1 .* hesse.eigsh"):
        hesse.solve(SPD, b, method="neumann", scale=1.0, on_failure="raise")


def test_zero_right_hand_side_is_exact_without_products():
    result = hesse.solve(SPD, torch.zeros(N, 2, dtype=DT))
    assert bool(result.converged.all()) and result.iterations == 0
    assert torch.equal(result.x, torch.zeros(N, 2, dtype=DT))


BAD = [
    (dict(damping=-1.0), ValueError, "expected damping >= 0 (finite), got -1.0"),
    (dict(damping="1"), TypeError, "expected damping to be a number >= 0"),
    (dict(b=torch.ones(N + 1, dtype=DT)), ValueError, f"expected b of shape ({N},) or ({N}, k)"),
    (dict(b=torch.ones(N, dtype=torch.float32)), TypeError, "expected b of dtype torch.float64"),
    (dict(b=torch.full((N,), float("nan"), dtype=DT)), ValueError, "b has non-finite entries"),
    (dict(b=[1.0] * N), TypeError, "expected b to be a tensor"),
    (dict(b={"w": torch.ones(N, dtype=DT)}), TypeError, "b is a dict, but the operator has no"),
    (dict(method="gmres"), ValueError, "method should be one of 'cg', 'minres'"),
    (dict(on_failure="ignore"), ValueError, "on_failure should be one of 'warn', 'raise'"),
    (dict(rtol=0.0), ValueError, "expected rtol to be a positive finite number"),
    (dict(max_matvecs=0), ValueError, "expected max_matvecs >= 1"),
    (dict(method="neumann"), ValueError, "scale is required"),
    (dict(method="lissa", scale=1.0), ValueError, "depth is required for method='lissa'"),
    (
        dict(method="lissa", scale=1.0, depth=3, samples=[DenseOperator(SPD)]),
        ValueError,
        "a generator is required",
    ),
    (dict(scale=2.0), ValueError, "scale applies to 'neumann' and 'lissa' only"),
    (
        dict(preconditioner=torch.eye(N, dtype=DT)),
        TypeError,
        "expected preconditioner to be a hesse",
    ),
    (
        dict(method="neumann", scale=1.0, preconditioner=DenseOperator(SPD)),
        ValueError,
        "takes no preconditioner",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), BAD)
def test_bad_input(kwargs, exc, message):
    kwargs = dict(kwargs)
    b = kwargs.pop("b", _rhs(None))
    with pytest.raises(exc, match=re.escape(message)):
        hesse.solve(SPD, b, **kwargs)


def test_bad_operator():
    with pytest.raises(
        ValueError, match=re.escape("hesse.solve(op, b, method='cg'): expected a symmetric")
    ):
        hesse.solve(torch.randn(4, 4, dtype=DT), torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="expected a square operator"):
        hesse.solve(torch.randn(4, 3, dtype=DT), torch.ones(4, dtype=DT), method="lsmr")
    with pytest.raises(
        ValueError,
        match=re.escape("hesse.solvers.jacobi(diagonal): expected diagonal + damping > 0"),
    ):
        hesse.solvers.jacobi(torch.tensor([1.0, -1.0], dtype=DT))


def test_kfac_inverse_preconditions_cg():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(
        DT
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 6, generator=g, dtype=DT), torch.randint(0, 4, (64,), generator=g))]
    loss = torch.nn.CrossEntropyLoss()
    G = hesse.GGNOperator(model, loss, data)
    K = hesse.KFACOperator(model, loss, data)
    damping = 1e-3
    b = torch.randn(G.shape[0], 3, generator=g, dtype=DT)
    plain = hesse.solve(G, b, damping=damping, rtol=1e-8)
    preconditioned = hesse.solve(
        G, b, damping=damping, rtol=1e-8, preconditioner=K.inverse(damping, exact_damping=True)
    )
    expected = torch.linalg.solve(G.to_dense() + damping * torch.eye(G.shape[0], dtype=DT), b)
    for result in (plain, preconditioned):
        assert bool(result.converged.all())
        torch.testing.assert_close(result.x, expected, rtol=1e-5, atol=1e-6)
    # (Whether KFAC saves products depends on the model; here it does a little. The
    # exact inverse as preconditioner converging in one step is tested above.)
