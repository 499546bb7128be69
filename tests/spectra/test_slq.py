"""hesse.spectral_density: quadrature weights, moments and normalisation."""

from __future__ import annotations

import pytest
import torch

import hesse
from hesse._probes import rademacher
from hesse.operators._base import DenseOperator
from tests.spectra.matrices import F64, mlp_hessian, mlp_problem, rotated, spectrum


def moments(nodes: torch.Tensor, weights: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([(weights * nodes**j).sum() for j in range(1, count + 1)])


def test_quadrature_is_exact_on_a_diagonal_matrix() -> None:
    # Unit Rademacher probes have v_i^2 = 1/n, so v^T D^j v = mean(d^j) for EVERY probe:
    # the quadrature moments (j < 2m) must equal the spectrum's exactly. Weights taken from
    # any row of the tridiagonal's eigenvectors other than the first break this.
    evals = torch.cat(
        [torch.linspace(-2.0, 1.0, 50, dtype=F64), torch.tensor([4.0, 4.0, 6.0], dtype=F64)]
    )
    result = hesse.spectral_density(torch.diag(evals), num_probes=3, lanczos_steps=12)
    exact = torch.stack([(evals**j).mean() for j in range(1, 9)])
    assert torch.allclose(moments(result.nodes, result.weights, 8), exact, rtol=1e-10)
    assert torch.allclose(result.weights.sum(), torch.tensor(1.0, dtype=F64))


def test_smoothed_density_moments_and_normalisation() -> None:
    evals = torch.cat(
        [torch.linspace(-2.0, 1.0, 50, dtype=F64), torch.tensor([4.0, 4.0, 6.0], dtype=F64)]
    )
    grid, density = hesse.spectral_density(
        torch.diag(evals), num_probes=2, lanczos_steps=20, grid=4000
    )
    assert torch.allclose(torch.trapezoid(density, grid), torch.tensor(1.0, dtype=F64))
    assert (density >= 0).all()
    result = hesse.spectral_density(torch.diag(evals), num_probes=2, lanczos_steps=20, grid=4000)
    mean = torch.trapezoid(grid * density, grid)
    var = torch.trapezoid((grid - mean) ** 2 * density, grid)
    assert torch.allclose(mean, evals.mean(), atol=1e-6)
    # Gaussian smoothing adds sigma^2 to the variance.
    assert torch.allclose(var, evals.var(unbiased=False) + result.sigma**2, rtol=1e-6)
    assert 0.999 < result.mass < 1.001


def test_moments_of_a_rotated_spectrum_within_statistical_error() -> None:
    evals = spectrum("negative", n=80)
    A = rotated(evals)
    result = hesse.spectral_density(A, num_probes=40, lanczos_steps=15)
    per_probe_count = result.nodes.numel() // 40
    assert per_probe_count == 15
    exact = torch.stack([(evals**j).mean() for j in range(1, 5)])
    # Per probe moments v^T A^j v: their spread gives the error of the average.
    nodes = result.nodes.reshape(40, 15)
    weights = result.weights.reshape(40, 15) * 40
    per_probe = torch.stack([(weights * nodes**j).sum(1) for j in range(1, 5)], dim=1)
    stderr = per_probe.std(0) / 40**0.5
    assert ((per_probe.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all()


def test_model_hessian_density() -> None:
    H = mlp_hessian()
    n = H.shape[0]
    evals = torch.linalg.eigvalsh(H)
    result = hesse.spectral_density(
        H, num_probes=6, lanczos_steps=10, generator=torch.Generator().manual_seed(3)
    )
    # White-box: the probes are the first draw from the generator (hesse._probes). The
    # quadrature reproduces each probe's moments v^T H^j v exactly for j < 2 * steps.
    V = (
        rademacher(n, 6, generator=torch.Generator().manual_seed(3), dtype=F64, device=H.device)
        / n**0.5
    )
    HjV = V
    for j in range(1, 8):
        HjV = H @ HjV
        expected = (V * HjV).sum(0).mean()
        assert torch.allclose(
            (result.weights * result.nodes**j).sum(), expected, rtol=1e-9, atol=1e-15
        )
    # With lanczos_steps = n every weighted Ritz value is an eigenvalue of H.
    full = hesse.spectral_density(H, num_probes=2, lanczos_steps=n)
    gaps = (full.nodes[:, None] - evals[None, :]).abs().min(1).values
    assert (gaps[full.weights > 1e-10] < 1e-8).all()
    grid, density = full
    assert grid[0] < evals[0] and evals[-1] < grid[-1]


def test_low_rank_breakdown_keeps_weights_normalised() -> None:
    g = torch.Generator().manual_seed(4)
    U = torch.randn(40, 3, generator=g, dtype=F64)
    result = hesse.spectral_density(U @ U.T, num_probes=4, lanczos_steps=30)
    assert result.num_matvecs <= 4 * 5  # each probe stops after about rank + 1 steps
    assert torch.allclose(result.weights.sum(), torch.tensor(1.0, dtype=F64))
    # A diagonal rank-3 matrix: every unit Rademacher probe puts mass 37/40 on the null space.
    D = torch.diag(
        torch.cat([torch.tensor([5.0, 3.0, 2.0], dtype=F64), torch.zeros(37, dtype=F64)])
    )
    result = hesse.spectral_density(D, num_probes=4, lanczos_steps=30)
    at_zero = result.weights[result.nodes.abs() < 1e-8].sum()
    assert torch.allclose(at_zero, torch.tensor(37 / 40, dtype=F64))


def test_custom_grid_and_reported_mass() -> None:
    A = torch.diag(torch.linspace(0.0, 1.0, 30, dtype=F64))
    half = torch.linspace(0.5, 2.0, 300, dtype=F64)
    result = hesse.spectral_density(A, grid=half, sigma=0.01)
    assert torch.equal(result.grid, half)
    assert 0.4 < result.mass < 0.6
    assert torch.allclose(
        torch.trapezoid(result.density, result.grid), torch.tensor(1.0, dtype=F64)
    )


def test_probes_batched_one_product_per_step() -> None:
    calls = []

    class Counting(DenseOperator):
        def _matmat(self, X: torch.Tensor) -> torch.Tensor:
            calls.append(X.shape[1])
            return super()._matmat(X)

    A = rotated(spectrum("negative", n=30))
    result = hesse.spectral_density(
        Counting(A, tags=frozenset({"symmetric"})), num_probes=5, lanczos_steps=8
    )
    assert calls == [5] * 8
    assert result.num_matvecs == 40


def test_errors() -> None:
    A = rotated(spectrum("decaying", n=10))
    B = A.clone()
    B[0, 1] += 1
    with pytest.raises(
        ValueError, match=r"hesse.spectral_density\(A\): expected a symmetric matrix"
    ):
        hesse.spectral_density(B)
    with pytest.raises(ValueError, match=r"expected num_probes >= 1, got 0"):
        hesse.spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match=r"expected lanczos_steps >= 1, got 0"):
        hesse.spectral_density(A, lanczos_steps=0)
    with pytest.raises(ValueError, match=r"expected sigma to be a positive finite number"):
        hesse.spectral_density(A, sigma=0.0)
    with pytest.raises(ValueError, match=r"expected grid to be strictly increasing"):
        hesse.spectral_density(A, grid=torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=r"expected grid to be a 1-D float tensor"):
        hesse.spectral_density(A, grid=torch.zeros(2, 2, dtype=F64))
    with pytest.raises(TypeError, match=r"expected grid to be None, an int or a 1-D tensor"):
        hesse.spectral_density(A, grid=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"expected grid >= 2, got 1"):
        hesse.spectral_density(A, grid=1)
    with pytest.raises(ValueError, match=r"the grid \[100, 101\] misses the spectrum"):
        hesse.spectral_density(A, grid=torch.tensor([100.0, 101.0], dtype=F64), sigma=1e-3)
    with pytest.raises(TypeError, match=r"expected generator to be a torch.Generator or None"):
        hesse.spectral_density(A, generator="seed")
    with pytest.raises(ValueError, match=r"expected a square operator"):
        hesse.spectral_density(A[:3])


def test_model_operators_and_parameter_subsets() -> None:
    model, data, H, H_block = mlp_problem()
    loss = torch.nn.CrossEntropyLoss()
    for op, dense in (
        (hesse.HessianOperator(model, loss, data), H),
        (hesse.HessianOperator(model, loss, data, params=["2.weight"]), H_block),
    ):
        n = dense.shape[0]
        result = hesse.spectral_density(op, num_probes=3, lanczos_steps=n)
        evals = torch.linalg.eigvalsh(dense)
        # Full-length recurrences: every weighted node is an eigenvalue of the dense reference.
        gaps = (result.nodes[:, None] - evals[None, :]).abs().min(1).values
        assert (gaps[result.weights > 1e-10] < 1e-8).all()
        assert torch.allclose(result.weights.sum(), torch.tensor(1.0, dtype=F64))
