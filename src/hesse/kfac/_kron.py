"""Kronecker algebra on a block's parameter matrices: products, eigenbases, damping.

# NOTE [kron layout]
A block's parameters form a ``(p, q)`` matrix ``P`` (NOTE [kfac layers]), and its
curvature is ``G ⊗ A`` on the row-major ``vec(P)``: ``(G ⊗ A) vec(P) = vec(G P A)``
with ``G`` (``p x p``, output gradients) and ``A`` (``q x q``, inputs, or a
``(q,)`` vector when diagonal). Everything here takes a stack ``(k, p, q)`` of
such matrices (one per column of a flat ``(n, k)`` input). With eigenbases
``G = Q_G diag(g) Q_G^T``, ``A = Q_A diag(a) Q_A^T`` every function of the
Kronecker product (inverse, damping, log-determinant) acts on the ``p x q``
eigenvalue grid ``g a^T`` in the rotated basis ``Q_G^T P Q_A``; EKFAC replaces
that grid by corrected eigenvalues.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def kron_apply(P: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``G P A`` for a stack ``P`` (``(k, p, q)``); ``A`` dense or a diagonal vector."""
    left = torch.matmul(G, P)
    return left * A if A.dim() == 1 else torch.matmul(left, A)


@dataclass(frozen=True)
class Eigen:
    """``F = Q diag(values) Q^T``; ``vectors`` is ``None`` for a diagonal ``F`` (``Q = I``)."""

    values: torch.Tensor
    vectors: torch.Tensor | None

    @staticmethod
    def of(F: torch.Tensor) -> Eigen:
        if F.dim() == 1:
            return Eigen(F.clamp_min(0), None)
        values, vectors = torch.linalg.eigh(F)
        # A factor is a sum of outer products (PSD): tiny negative eigenvalues are rounding.
        return Eigen(values.clamp_min(0), vectors)


def to_eigenbasis(P: torch.Tensor, eg: Eigen, ea: Eigen) -> torch.Tensor:
    """``Q_G^T P Q_A``."""
    if eg.vectors is not None:
        P = torch.matmul(eg.vectors.T, P)
    return P if ea.vectors is None else torch.matmul(P, ea.vectors)


def from_eigenbasis(P: torch.Tensor, eg: Eigen, ea: Eigen) -> torch.Tensor:
    """``Q_G P Q_A^T``."""
    if eg.vectors is not None:
        P = torch.matmul(eg.vectors, P)
    return P if ea.vectors is None else torch.matmul(P, ea.vectors.T)


def grid_apply(P: torch.Tensor, eg: Eigen, ea: Eigen, grid: torch.Tensor) -> torch.Tensor:
    """``Q (grid ∘ Q^T P Q_A) Q_A^T``: a function of the block, given on the eigenvalue grid."""
    return from_eigenbasis(to_eigenbasis(P, eg, ea) * grid, eg, ea)


def grid_function(eg: Eigen, ea: Eigen, grid: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``P -> grid_apply(P, eg, ea, grid)`` (one block of an inverse operator)."""
    return lambda P: grid_apply(P, eg, ea, grid)


def diagonal_of(eg: Eigen, ea: Eigen, grid: torch.Tensor) -> torch.Tensor:
    """The ``(p, q)`` diagonal of ``(Q_G ⊗ Q_A) diag(grid) (Q_G ⊗ Q_A)^T``."""
    left = grid if eg.vectors is None else eg.vectors.square() @ grid
    return left if ea.vectors is None else left @ ea.vectors.square().T


def square_projections(
    g: torch.Tensor, a: torch.Tensor | None, eg: Eigen, ea: Eigen, idx: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_e (Q_G^T g_e)^2 (Q_A^T a_e)^{2T}``: EKFAC's sum of squared rotated gradients.

    ``g``: ``(K, E, p)`` output-gradient rows of ``E`` examples (``K`` columns each,
    summed: the input row does not depend on the column); ``a``: ``(E, q)`` input
    rows, or ``None`` with ``idx`` (``(E,)`` one-hot positions) for a diagonal input
    factor. Returns ``(p, q)``.

    Cost: ``O(K E p^2 + E q^2 + E p q)``.
    """
    u = g if eg.vectors is None else torch.matmul(g, eg.vectors)
    u2 = u.square().sum(0)  # (E, p)
    if idx is not None:
        q = ea.values.shape[0]
        out = u2.new_zeros(q, u2.shape[1])
        out.index_add_(0, idx, u2)
        return out.T
    v = a if ea.vectors is None else a @ ea.vectors
    return u2.T @ v.square()
