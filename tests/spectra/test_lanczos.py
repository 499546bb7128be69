"""hesse.eigsh against torch.linalg.eigh on matrices with known spectra and a model Hessian."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse
from hesse.operators._base import DenseOperator
from tests.spectra.matrices import (
    F64,
    SPECTRA,
    mlp_hessian,
    mlp_problem,
    reference_order,
    rotated,
    spectrum,
)

TOL = 1e-8


def check_pairs(A: torch.Tensor, result: hesse.EigshResult, ref: torch.Tensor, tol: float) -> None:
    """Eigenvalues match the reference; each pair has a small TRUE residual; vectors orthonormal."""
    values, vectors = result
    scale = ref.abs().max()
    assert torch.allclose(values, ref, rtol=0, atol=2 * tol * scale), (values, ref)
    true_residuals = torch.linalg.vector_norm(A @ vectors - vectors * values, dim=0)
    assert (true_residuals <= 10 * tol * scale).all(), true_residuals
    eye = torch.eye(values.numel(), dtype=A.dtype)
    assert torch.allclose(vectors.T @ vectors, eye, atol=1e-10)
    assert result.converged.all()


def _supported(name: str, which: str, block_size: int) -> bool:
    """The documented limits of eigsh: a triple eigenvalue at the wanted end needs
    block_size >= 3; eigenvalues accumulating at 0 (wanted by SA) need shift-invert."""
    if name == "degenerate" and block_size < 3 and which != "SA":
        return False
    return not (name == "decaying" and which == "SA")


@pytest.mark.parametrize(
    ("name", "which", "block_size"),
    [
        (name, which, b)
        for name in SPECTRA
        for which in ["LA", "SA", "LM"]
        for b in [1, 3]
        if _supported(name, which, b)
    ],
)
def test_eigenvalues_match_eigh(name: str, which: str, block_size: int) -> None:
    evals = spectrum(name)
    A = rotated(evals)
    result = hesse.eigsh(A, 5, which=which, tol=TOL, block_size=block_size)
    check_pairs(A, result, reference_order(evals, which)[:5], TOL)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigenvectors_match_up_to_sign(which: str) -> None:
    evals = torch.linspace(-4.0, 9.0, 80, dtype=F64) ** 3  # well separated at both ends
    A = rotated(evals, seed=3)
    ref_values, ref_vectors = torch.linalg.eigh(A)
    if which == "LA":
        ref_values, ref_vectors = ref_values.flip(0), ref_vectors.flip(1)
    values, vectors = hesse.eigsh(A, 4, which=which, tol=1e-10)
    assert torch.allclose(values, ref_values[:4], rtol=1e-9)
    overlap = (vectors * ref_vectors[:, :4]).sum(0).abs()
    assert torch.allclose(overlap, torch.ones(4, dtype=F64), atol=1e-8)


def test_degenerate_eigenspace_is_recovered() -> None:
    # An exactly repeated eigenvalue in the standard basis: the block must span its eigenspace.
    evals = spectrum("degenerate")
    A = torch.diag(evals)
    values, vectors = hesse.eigsh(A, 3, block_size=3, tol=1e-10)
    assert torch.allclose(values, torch.full((3,), 5.0, dtype=F64), atol=1e-9)
    # The projector onto the computed space equals the one onto the true eigenspace (e_0..e_2).
    P = vectors @ vectors.T
    P_ref = torch.zeros_like(A)
    P_ref[:3, :3] = torch.eye(3, dtype=F64)
    assert torch.allclose(P, P_ref, atol=1e-8)


def test_low_rank_with_k_above_rank_finds_zeros() -> None:
    g = torch.Generator().manual_seed(2)
    U = torch.randn(40, 3, generator=g, dtype=F64)
    A = U @ U.T
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    values, _ = hesse.eigsh(A, 5, tol=1e-10)
    assert torch.allclose(values, ref, atol=1e-10 * ref[0])


def test_small_matrix_whole_space() -> None:
    A = torch.diag(torch.arange(6.0, dtype=F64))
    assert torch.allclose(hesse.eigsh(A, 5).eigenvalues, torch.arange(5.0, 0.0, -1, dtype=F64))
    assert torch.allclose(hesse.eigsh(A, 5, which="SA").eigenvalues, torch.arange(5.0, dtype=F64))


def test_model_hessian() -> None:
    H = mlp_hessian()
    evals = torch.linalg.eigvalsh(H)
    for which in ("LA", "SA", "LM"):
        result = hesse.eigsh(H, 5, which=which, tol=TOL)
        check_pairs(H, result, reference_order(evals, which)[:5], TOL)


def test_unsymmetrised_autodiff_hessian_is_accepted() -> None:
    # torch.func.hessian is symmetric only up to rounding; eigsh symmetrises it.
    x = torch.linspace(-1.0, 1.0, 12, dtype=F64)
    H = torch.func.hessian(lambda x: (x.sin() * x.roll(1)).sum() + (x**4).sum())(x)
    values, _ = hesse.eigsh(H, 3)
    assert torch.allclose(values, torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:3], rtol=1e-6)


def test_operator_input_and_matvec_count() -> None:
    A = rotated(spectrum("decaying"))
    calls = []

    class Counting(DenseOperator):
        def _matmat(self, X: torch.Tensor) -> torch.Tensor:
            calls.append(X.shape[1])
            return super()._matmat(X)

    op = Counting(A, tags=frozenset({"symmetric"}))
    result = hesse.eigsh(op, 3, block_size=2)
    assert result.num_matvecs == sum(calls)
    assert set(calls) == {2}  # one batched product per step
    assert result.num_matvecs < 60  # far below the power method's count for this spectrum


def test_float32() -> None:
    evals = torch.linspace(0.0, 4.0, 60, dtype=F64) ** 2
    A = rotated(evals).float()
    values, _ = hesse.eigsh(A, 3, tol=1e-4)
    assert values.dtype == torch.float32
    assert torch.allclose(values.double(), evals.flip(0)[:3], rtol=1e-4)


def test_budget_exhaustion_warns_and_reports() -> None:
    A = rotated(spectrum("negative"))
    with pytest.warns(UserWarning, match=r"hesse.eigsh\(A, k\): .* of 4 eigenpairs reached tol"):
        result = hesse.eigsh(A, 4, max_matvecs=8)
    assert result.num_matvecs <= 8
    assert not result.converged.all()


def test_randomness_only_from_the_generator() -> None:
    A = rotated(spectrum("clustered"))
    state = torch.random.get_rng_state()
    a = hesse.eigsh(A, 3, generator=torch.Generator().manual_seed(7))
    b = hesse.eigsh(A, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.num_matvecs == b.num_matvecs


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), which=st.sampled_from(["LA", "SA", "LM"]))
def test_random_spectra(seed: int, k: int, which: str) -> None:
    g = torch.Generator().manual_seed(seed)
    evals = torch.randn(30, generator=g, dtype=F64) * torch.rand(30, generator=g, dtype=F64) * 10
    A = rotated(evals, seed=seed)
    result = hesse.eigsh(A, k, which=which, tol=TOL, generator=g)
    check_pairs(A, result, reference_order(evals, which)[:k], TOL)


def test_errors() -> None:
    A = rotated(spectrum("decaying", n=10))
    with pytest.raises(ValueError, match=r"hesse.eigsh\(A, k\): expected k < n = 10, got k=10"):
        hesse.eigsh(A, 10)
    with pytest.raises(ValueError, match=r"expected k >= 1, got 0"):
        hesse.eigsh(A, 0)
    with pytest.raises(TypeError, match=r"expected k to be an int"):
        hesse.eigsh(A, 2.0)
    with pytest.raises(ValueError, match=r"which should be one of 'LA', 'SA', 'LM', got 'BE'"):
        hesse.eigsh(A, 2, which="BE")
    with pytest.raises(ValueError, match=r"expected a square operator, got shape \(10, 9\)"):
        hesse.eigsh(A[:, :9], 2)
    B = A.clone()
    B[0, 1] += 1.0
    with pytest.raises(
        ValueError, match=r"expected a symmetric matrix, got one with max\|A - A\^T\|"
    ):
        hesse.eigsh(B, 2)
    with pytest.raises(ValueError, match=r"expected a symmetric operator, got DenseOperator"):
        hesse.eigsh(DenseOperator(A), 2)
    with pytest.raises(ValueError, match=r"expected max_matvecs >= 1, got 0"):
        hesse.eigsh(A, 2, max_matvecs=0)
    with pytest.raises(ValueError, match=r"expected max_matvecs >= k \+ block_size - 1 = 4"):
        hesse.eigsh(A, 3, max_matvecs=3, block_size=2)
    for k, b in ((3, 1), (3, 2), (2, 4)):  # the smallest budget still yields k pairs
        with pytest.warns(UserWarning, match="eigenpairs reached tol"):
            assert hesse.eigsh(A, k, block_size=b, max_matvecs=k + b - 1).eigenvalues.shape == (k,)
    with pytest.raises(TypeError, match=r"expected generator to be a torch.Generator or None"):
        hesse.eigsh(A, 2, generator=0)
    with pytest.raises(ValueError, match=r"expected tol to be a positive finite number, got 0"):
        hesse.eigsh(A, 2, tol=0)
    with pytest.raises(ValueError, match=r"expected k \+ block_size <= n = 10"):
        hesse.eigsh(A, 5, block_size=6)
    with pytest.raises(ValueError, match=r"expected k \+ block_size <= basis_size <= n"):
        hesse.eigsh(A, 5, basis_size=5)
    with pytest.raises(TypeError, match=r"expected a real floating-point matrix"):
        hesse.eigsh(torch.eye(4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match=r"expected a hesse operator or a 2-D tensor"):
        hesse.eigsh([[1.0]], 1)


def test_model_operators_and_parameter_subsets() -> None:
    model, data, H, H_block = mlp_problem()
    loss = torch.nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss, data)
    for which in ("LA", "SA"):
        result = hesse.eigsh(op, 3, which=which, tol=TOL)
        check_pairs(H, result, reference_order(torch.linalg.eigvalsh(H), which)[:3], TOL)
    block = hesse.HessianOperator(model, loss, data, params=["2.weight"])
    result = hesse.eigsh(block, 3, tol=TOL, block_size=2)
    check_pairs(H_block, result, torch.linalg.eigvalsh(H_block).flip(0)[:3], TOL)
    ggn = hesse.GGNOperator(model, loss, data)
    G = ggn.to_dense()
    result = hesse.eigsh(ggn, 4, tol=TOL)
    check_pairs(G, result, torch.linalg.eigvalsh((G + G.T) / 2).flip(0)[:4], TOL)
