"""What the spectral algorithms spend: the product / linear-algebra time split, SLQ's
memory-bounded probe groups, and eigsh's basis handling on a block of vectors."""

from __future__ import annotations

import time

import torch

import hesse
from hesse.operators._base import SYMMETRIC, DenseOperator
from hesse.spectra import _slq
from hesse.spectra._timing import TimedOperator
from tests.spectra.matrices import F64, rotated, spectrum


class SlowProducts(DenseOperator):
    """A dense operator whose every product also sleeps, so product time is known."""

    pause = 0.002

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        time.sleep(self.pause)
        return super()._matmat(X)


def test_eigsh_and_density_report_the_time_split() -> None:
    A = rotated(spectrum("negative"))
    op = SlowProducts(A, tags=frozenset({SYMMETRIC}))
    result = hesse.eigsh(op, 3, tol=1e-8)
    steps = result.num_matvecs  # block size 1: one call per product
    assert result.product_seconds >= steps * op.pause
    assert result.product_seconds <= result.total_seconds
    density = hesse.spectral_density(op, num_probes=2, lanczos_steps=10)
    assert density.product_seconds >= 10 * op.pause
    assert density.product_seconds <= density.total_seconds


def test_timed_operator_is_the_operator() -> None:
    A = rotated(spectrum("decaying", n=20))
    op = TimedOperator(DenseOperator(A, tags=frozenset({SYMMETRIC})))
    X = torch.randn(20, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(op @ X, A @ X)
    assert torch.equal(op.T @ X, A @ X)
    assert op.calls == 2 and op.seconds > 0
    est = hesse.trace(op, method="hutchinson", num_matvecs=4)
    assert op.calls == 3 and est.num_matvecs == 4


def test_density_in_probe_groups_equals_all_probes_at_once(monkeypatch) -> None:
    # Bases too large for the bound run in groups; every probe's recurrence is the same.
    A = rotated(spectrum("negative", n=40))
    calls = []

    class Counting(DenseOperator):
        def _matmat(self, X: torch.Tensor) -> torch.Tensor:
            calls.append(X.shape[1])
            return super()._matmat(X)

    op = Counting(A, tags=frozenset({SYMMETRIC}))
    whole = hesse.spectral_density(op, num_probes=5, lanczos_steps=12)
    assert calls == [5] * 12
    calls.clear()
    # Room for the bases of two probes (40 x 12 float64 each) at a time.
    monkeypatch.setattr(_slq, "BASIS_BYTES", 2 * 40 * 12 * 8)
    grouped = hesse.spectral_density(op, num_probes=5, lanczos_steps=12)
    assert calls == [2] * 12 + [2] * 12 + [1] * 12
    assert grouped.num_matvecs == whole.num_matvecs == 60
    assert torch.allclose(grouped.nodes, whole.nodes, rtol=0, atol=1e-12)
    assert torch.allclose(grouped.weights, whole.weights, rtol=0, atol=1e-12)


def test_eigsh_block_that_loses_rank_is_refilled_and_stays_orthonormal() -> None:
    # Rank 2 with blocks of 4: the first new block has two noise directions, which are
    # replaced by fresh random vectors (the careful, re-orthogonalising path).
    g = torch.Generator().manual_seed(4)
    U = torch.randn(60, 2, generator=g, dtype=F64)
    A = U @ U.T
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    values, vectors = hesse.eigsh(A, 3, block_size=4, tol=1e-10)
    assert torch.allclose(values, ref, rtol=0, atol=1e-10 * float(ref[0]))
    assert torch.allclose(vectors.T @ vectors, torch.eye(3, dtype=F64), atol=1e-12)
    assert torch.allclose(A @ vectors, vectors * values, atol=1e-9 * float(ref[0]))
    assert vectors.is_contiguous()
