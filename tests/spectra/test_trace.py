"""hesse.trace: unbiased, honest error bars, exact where theory says so."""

from __future__ import annotations

import math

import pytest
import torch

import hesse
from hesse.operators._base import DenseOperator
from tests.spectra.matrices import F64, mlp_hessian, mlp_problem, rotated, spectrum

METHODS = ("hutchinson", "hutch++", "xtrace")


def seeds(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in range(count)]


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_and_stderr_honest(method: str) -> None:
    evals = spectrum("negative", n=60)
    A = rotated(evals)
    exact = evals.sum()
    estimates = [hesse.trace(A, method=method, num_matvecs=24, generator=g) for g in seeds(150)]
    values = torch.stack([e.value for e in estimates])
    stderrs = torch.stack([e.stderr for e in estimates])
    spread = values.std()
    # Unbiased: the mean over seeds lies within 4 standard errors of the mean of the truth.
    assert (values.mean() - exact).abs() <= 4 * spread / math.sqrt(len(estimates))
    # Honest: the typical reported stderr matches the observed spread of the estimates.
    assert 0.6 <= float(stderrs.mean() / spread) <= 1.6
    # And the 95 % intervals cover the truth most of the time.
    covered = [bool(lo <= exact <= hi) for lo, hi in (e.interval(0.95) for e in estimates)]
    # (few samples and, for XTrace, correlated leave-one-out terms: the normal interval is
    # slightly optimistic)
    assert sum(covered) / len(covered) >= 0.8
    assert all(e.num_matvecs <= 24 for e in estimates)


def test_variance_reduction_on_decaying_psd_spectrum() -> None:
    evals = spectrum("decaying", n=80)
    A = rotated(evals)
    errors = {}
    for method in METHODS:
        values = torch.stack(
            [hesse.trace(A, method=method, num_matvecs=30, generator=g).value for g in seeds(40)]
        )
        errors[method] = float(((values - evals.sum()) ** 2).mean().sqrt())
    assert errors["hutch++"] < 0.5 * errors["hutchinson"]
    assert errors["xtrace"] < 0.5 * errors["hutchinson"]


@pytest.mark.parametrize(("method", "budget"), [("hutch++", 3 * 6), ("xtrace", 2 * 7)])
def test_exact_on_low_rank_psd_once_the_sketch_exceeds_the_rank(method: str, budget: int) -> None:
    g = torch.Generator().manual_seed(3)
    U = torch.randn(70, 6, generator=g, dtype=F64)
    A = U @ U.T
    est = hesse.trace(A, method=method, num_matvecs=budget, generator=g)
    assert torch.allclose(est.value, torch.trace(A), rtol=1e-10)
    assert est.stderr <= 1e-8 * torch.trace(A)


def test_hutchinson_is_exact_on_a_diagonal_matrix() -> None:
    # Rademacher probes: z^T D z = sum(D) for every probe.
    D = torch.diag(torch.linspace(-3.0, 5.0, 40, dtype=F64))
    est = hesse.trace(D, method="hutchinson", num_matvecs=5)
    assert torch.allclose(est.value, torch.trace(D))
    assert est.stderr <= 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_adaptive_stops_at_requested_relative_error(method: str) -> None:
    A = rotated(spectrum("decaying", n=80) + 0.05)
    est = hesse.trace(A, method=method, num_matvecs=2000, rtol=1e-2)
    assert est.stderr <= 1e-2 * est.value.abs()
    assert est.num_matvecs < 2000
    # Held to the budget when the request is out of reach.
    capped = hesse.trace(A, method=method, num_matvecs=40, rtol=1e-12)
    assert capped.num_matvecs <= 40


def test_non_symmetric_and_operator_input() -> None:
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 30, generator=g, dtype=F64)
    for method in METHODS:
        est = hesse.trace(DenseOperator(A), method=method, num_matvecs=200, generator=g)
        assert (est.value - torch.trace(A)).abs() <= 5 * est.stderr + 1e-9


def test_model_hessian_trace() -> None:
    H = mlp_hessian()
    est = hesse.trace(H, method="xtrace", num_matvecs=40)
    assert (est.value - torch.trace(H)).abs() <= 5 * est.stderr + 1e-10
    full = hesse.trace(H, method="hutch++", num_matvecs=3 * H.shape[0])  # sketch spans everything
    assert torch.allclose(full.value, torch.trace(H), rtol=1e-10)


def test_float32_and_reproducible() -> None:
    A = rotated(spectrum("decaying", n=50)).float()
    a = hesse.trace(A, generator=torch.Generator().manual_seed(1))
    b = hesse.trace(A, generator=torch.Generator().manual_seed(1))
    assert a.value.dtype == torch.float32
    assert torch.equal(a.value, b.value)


def test_errors() -> None:
    A = rotated(spectrum("decaying", n=10))
    with pytest.raises(
        ValueError,
        match=r"hesse.trace\(A\): method should be one of 'hutch\+\+', 'hutchinson', 'xtrace', got 'exact'",
    ):
        hesse.trace(A, method="exact")
    with pytest.raises(ValueError, match=r"expected num_matvecs >= 1, got 0"):
        hesse.trace(A, num_matvecs=0)
    with pytest.raises(
        ValueError,
        match=r"method='xtrace' needs num_matvecs >= 4 \(to estimate its own error\), got 3",
    ):
        hesse.trace(A, method="xtrace", num_matvecs=3)
    with pytest.raises(TypeError, match=r"expected num_matvecs to be an int"):
        hesse.trace(A, num_matvecs=10.0)
    with pytest.raises(ValueError, match=r"expected rtol to be a positive finite number, got -0.1"):
        hesse.trace(A, rtol=-0.1)
    with pytest.raises(ValueError, match=r"expected a square operator, got shape \(10, 4\)"):
        hesse.trace(A[:, :4])
    with pytest.raises(TypeError, match=r"expected generator to be a torch.Generator or None"):
        hesse.trace(A, generator=1)


def test_model_operators_and_parameter_subsets() -> None:
    model, data, H, H_block = mlp_problem()
    loss = torch.nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss, data)
    n = H.shape[0]
    # Hutch++ whose sketch spans the whole space is exact.
    assert torch.allclose(hesse.trace(op, num_matvecs=3 * n).value, torch.trace(H), rtol=1e-9)
    block = hesse.HessianOperator(model, loss, data, params=["2.weight"])
    est = hesse.trace(block, method="xtrace", num_matvecs=20)
    assert (est.value - torch.trace(H_block)).abs() <= 5 * est.stderr + 1e-10
    fisher = hesse.FisherOperator(model, loss, data, kind="empirical")
    F = fisher.to_dense()
    est = hesse.trace(fisher, method="hutch++", num_matvecs=24)
    assert (est.value - torch.trace(F)).abs() <= 5 * est.stderr + 1e-10
