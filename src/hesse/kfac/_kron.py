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


def grid_function(
    eg: Eigen, ea: Eigen, grid: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``P -> grid_apply(P, eg, ea, grid)`` (one block of an inverse operator)."""
    return lambda P: grid_apply(P, eg, ea, grid)


def diagonal_of(eg: Eigen, ea: Eigen, grid: torch.Tensor) -> torch.Tensor:
    """The ``(p, q)`` diagonal of ``(Q_G ⊗ Q_A) diag(grid) (Q_G ⊗ Q_A)^T``."""
    left = grid if eg.vectors is None else eg.vectors.square() @ grid
    return left if ea.vectors is None else left @ ea.vectors.square().T


#: entries of the per-sample gradient stack formed at once by :func:`sample_squares`.
_SQUARES_CHUNK = 2**22


def sample_squares(g: torch.Tensor, a: torch.Tensor, eg: Eigen, ea: Eigen) -> torch.Tensor:
    """``sum_{n,k} (Q_G^T D_nk Q_A)^2``, ``D_nk = sum_r g_nrk a_nr^T`` the per-sample gradients.

    ``g``: ``(K, N, R, p)`` output-gradient rows, ``a``: ``(N, R, q)`` input rows.
    Without shared positions (``R = 1``) every ``D_nk`` has rank one and the squares
    are outer products of squared projections; otherwise the rotated per-sample
    gradients are formed in chunks of samples. Returns ``(p, q)``.

    Cost: ``O(K N R (p^2 + q^2))``, plus ``O(K N R p q)`` with shared positions.
    """
    u = g if eg.vectors is None else torch.matmul(g, eg.vectors)
    v = a if ea.vectors is None else torch.matmul(a, ea.vectors)
    K, N, R, p = u.shape
    q = v.shape[-1]
    if R == 1:
        return u[:, :, 0].square().sum(0).T @ v[:, 0].square()
    out = u.new_zeros(p, q)
    step = max(1, _SQUARES_CHUNK // max(1, K * p * q))
    for start in range(0, N, step):
        d = torch.einsum("knrp,nrq->knpq", u[:, start : start + step], v[start : start + step])
        out += d.square().sum((0, 1))
    return out


def sample_squares_onehot(
    g: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None, eg: Eigen, q: int
) -> torch.Tensor:
    """:func:`sample_squares` for one-hot input rows (an embedding, ``Q_A = I``).

    ``idx``: ``(N, R)`` token indices, ``keep``: rows that carry a gradient (or
    ``None``). Rows of one sample with the same token add up before squaring.
    Returns ``(p, q)``.
    """
    u = g if eg.vectors is None else torch.matmul(g, eg.vectors)  # (K, N, R, p)
    K, N, R, p = u.shape
    key = (torch.arange(N, device=idx.device).unsqueeze(1) * q + idx).reshape(-1)
    u = u.reshape(K, N * R, p)
    if keep is not None:
        key, u = key[keep.reshape(-1)], u[:, keep.reshape(-1)]
    keys, inverse = torch.unique(key, return_inverse=True)
    summed = u.new_zeros(K, keys.numel(), p).index_add_(1, inverse, u)
    out = u.new_zeros(q, p).index_add_(0, keys % q, summed.square().sum(0))
    return out.T
