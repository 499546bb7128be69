"""Block preconditioned conjugate gradients, breakdown-free (Ji & Li, 2017).

# NOTE [block CG]
All ``k`` right-hand sides share one block Krylov space, so each step multiplies
the operator by a whole block of search directions ``P`` (one batched product)
and every column's iterate minimises its own ``A``-norm error over the space
built so far (O'Leary, 1980). Plain block CG breaks down when the directions
become linearly dependent (dependent right-hand sides, or some columns converging
before others). The breakdown-free variant orthonormalises each new block and
drops directions whose singular value falls below ``eps^(3/4)`` times the largest,
so the block shrinks instead of ``P^T A P`` turning singular:

.. math::

    \\alpha = (P^\\top A P)^{-1} P^\\top R, \\quad X \\mathrel{+}= P\\alpha, \\quad
    R \\mathrel{-}= AP\\,\\alpha, \\quad
    P \\leftarrow \\operatorname{orth}\\big(Z - P (P^\\top A P)^{-1} (AP)^\\top Z\\big),
    \\quad Z = M R_{\\text{active}}.

Columns that have met their target leave ``Z`` (deflation): the block then only
grows the space for the columns still working, which saves their products; the
converged columns keep receiving their Galerkin updates through ``alpha``.
A direction with ``p^T A p <= 0`` means ``A + damping I`` is not positive
definite there: the solve stops and says to use ``method="minres"``.
"""

from __future__ import annotations

import torch

from hesse.solvers._system import Outcome, Preconditioner, System, column_norms, exhausted


def _orth(W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``W``'s numerically significant column span."""
    if W.shape[1] == 0:
        return W
    U, sig, _ = torch.linalg.svd(W, full_matrices=False)
    keep = sig > torch.finfo(W.dtype).eps ** 0.75 * sig[0]
    return U[:, keep]


def _precondition(M: Preconditioner | None, R: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    # Columns scaled to unit norm: the span is unchanged, and the rank decision in
    # _orth no longer depends on the right-hand sides' scales.
    R = R / norms
    return R if M is None else M(R)


def cg(
    system: System,
    B: torch.Tensor,
    target: torch.Tensor,
    M: Preconditioner | None,
) -> Outcome:
    """Block (P)CG from ``X = 0``; see NOTE [block CG]."""
    X = torch.zeros_like(B)
    R = B.clone()
    norms = column_norms(R)
    active = norms > target
    if not bool(active.any()):
        return Outcome(X, 0)
    P = _orth(_precondition(M, R[:, active], norms[active]))
    iterations = 0
    while True:
        if not system.affords(P.shape[1]):
            return Outcome(X, iterations, exhausted(system))
        Q = system(P)
        iterations += 1
        PQ = P.T @ Q
        PQ = (PQ + PQ.T) / 2
        L, info = torch.linalg.cholesky_ex(PQ)
        if int(info) != 0:
            return Outcome(
                X,
                iterations,
                "the operator plus damping is not positive definite (a search direction p "
                "has p^T (A + damping I) p <= 0). Use method='minres' for indefinite "
                "operators, or raise damping",
            )
        alpha = torch.cholesky_solve(P.T @ R, L)
        X += P @ alpha
        R -= Q @ alpha
        norms = column_norms(R)
        if not bool(torch.isfinite(norms).all()):
            return Outcome(X, iterations, "the residual became non-finite (inf or nan)")
        active = norms > target
        if not bool(active.any()):
            return Outcome(X, iterations)
        Z = _precondition(M, R[:, active], norms[active])
        beta = torch.cholesky_solve(Q.T @ Z, L)
        P = _orth(Z - P @ beta)
        if P.shape[1] == 0:
            return Outcome(X, iterations, "the search directions vanished (stagnation)")
