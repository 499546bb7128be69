"""Nominal 95 % intervals cover the truth 93-97 % of the time (NOTE [calibrated intervals]).

Every stochastic estimator x five operator families (decaying SPD, flat, indefinite,
an MLP's Hessian and GGN; dense, so hundreds of seeds stay cheap), 200 to 1000 seeds
each; ``benchmarks/interval_coverage.py`` prints the same table (with more seeds on request).
"""

from __future__ import annotations

import math

import pytest
import torch

import hesse
from tests.estimators.coverage_cases import ESTIMATORS, FAMILIES, coverage, family

BUDGET = 24


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_intervals_cover_and_estimates_are_unbiased(estimator: str) -> None:
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    results = {name: coverage(estimator, name) for name in FAMILIES}  # 200-1000 seeds each
    # Over the five families (>= 1000 intervals: binomial sd <= 0.7 points) the coverage
    # is 93-97 %; each family's own (sd up to 1.5 points at 200 seeds) within 2.6 sd.
    pooled = sum(r["coverage"] for r in results.values()) / len(results)
    assert 0.93 <= pooled <= 0.97, results
    for name, r in results.items():
        assert 0.91 <= r["coverage"] <= 0.99, (name, r)
        # Unbiased: the mean over seeds is within a few of its standard errors of the truth.
        assert r["bias_z"] < (4.0 if estimator.startswith("trace") else 1.5), (name, r)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_is_exact_once_the_budget_reaches_the_dimension(method: str) -> None:
    A = family("indefinite")
    n = A.shape[0]
    est = hesse.trace(A, method=method, num_matvecs=n)
    assert est.exact and est.num_matvecs == n and float(est.stderr) == 0.0
    torch.testing.assert_close(est.value, A.trace())
    low, high = est.interval(0.95)
    assert float(low) == float(high) == float(est.value)
    assert not hesse.trace(A, method=method, num_matvecs=n - 1).exact


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_is_exact_once_the_budget_reaches_the_dimension(method: str) -> None:
    A = family("MLP GGN")
    n = A.shape[0]
    est = hesse.diagonal(A, method=method, num_matvecs=n)
    assert est.exact and est.num_matvecs == n and bool((est.stderr == 0).all())
    torch.testing.assert_close(est.value, A.diagonal())


def test_model_hessian_trace_is_exact_through_the_operator() -> None:
    from tests.estimators.coverage_cases import mlp

    model, x, y = mlp()
    H = hesse.HessianOperator(model, torch.nn.CrossEntropyLoss(), [(x, y)])
    est = hesse.trace(H, num_matvecs=H.shape[0])
    assert est.exact
    torch.testing.assert_close(est.value, family("MLP Hessian").trace())


def test_interval_uses_student_t_quantiles() -> None:
    # (without sample moments: the plain t interval)
    f64 = {"dtype": torch.float64}
    est = hesse.Estimate(torch.tensor(2.0, **f64), torch.tensor(0.5, **f64), num_matvecs=5, dof=4)
    low, high = est.interval(0.95)
    t4 = 2.7764451051977987  # closed form: t_{4}(0.975)
    assert math.isclose(float(high - 2.0), t4 * 0.5, rel_tol=1e-12)
    assert math.isclose(float(2.0 - low), t4 * 0.5, rel_tol=1e-12)
    normal = hesse.Estimate(torch.tensor(0.0, **f64), torch.tensor(1.0, **f64), num_matvecs=5)
    assert math.isclose(float(normal.interval(0.9)[1]), 1.6448536269514722, rel_tol=1e-12)
    # The dof each estimator reports: draws - 1.
    A = family("flat")
    g = torch.Generator().manual_seed(0)
    assert hesse.trace(A, method="hutchinson", num_matvecs=BUDGET, generator=g).dof == BUDGET - 1
    assert hesse.trace(A, method="xtrace", num_matvecs=BUDGET, generator=g).dof == BUDGET // 2 - 1
    d = hesse.diagonal(A, method="hutchinson", num_matvecs=BUDGET, generator=g)
    assert d.dof == BUDGET - 1


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, True, "0.95"])
def test_interval_rejects_bad_levels(level) -> None:
    est = hesse.Estimate(torch.tensor(0.0), torch.tensor(1.0), num_matvecs=3, dof=2)
    with pytest.raises(ValueError, match=r"Estimate.interval\(level\): expected level in \(0, 1\)"):
        est.interval(level)


def test_interval_widens_for_skewed_draws() -> None:
    """Hall's (1992) Edgeworth correction, against scipy's sample moments."""
    from scipy import stats

    from hesse._estimate import from_draws

    draws = torch.arange(1, 13, dtype=torch.float64) ** 2  # right-skewed
    est = from_draws(draws, num_matvecs=12)
    m, x = 12, stats.t.ppf(0.975, 11)
    g, k = stats.skew(draws.numpy()), stats.kurtosis(draws.numpy())
    q = x + x / m * (g**2 * (x**4 + 2 * x**2 - 3) / 18 - k * (x**2 - 3) / 12)
    se = float(draws.std()) / math.sqrt(m)
    low, high = est.interval(0.95)
    assert q > x and math.isclose(float(high - est.value), q * se, rel_tol=1e-10)
    assert math.isclose(float(est.value - low), q * se, rel_tol=1e-10)
    # Symmetric, heavy-tailed draws (the term is negative): never narrower than t.
    values = [-8.0, -1.0, -0.5, -0.2, 0.0, 0.0, 0.0, 0.0, 0.2, 0.5, 1.0, 8.0]
    flat = from_draws(torch.tensor(values, dtype=torch.float64), num_matvecs=12)
    assert float(flat.kurtosis) > 0
    half = float(flat.interval(0.95)[1] - flat.value)
    assert math.isclose(half, x * float(flat.stderr), rel_tol=1e-12)
