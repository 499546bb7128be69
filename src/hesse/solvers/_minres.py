"""MINRES for symmetric, possibly indefinite systems (Paige & Saunders, 1975).

# NOTE [minres]
Lanczos builds an orthonormal basis of the Krylov space of ``A + damping I`` (in
the ``M``-inner product when preconditioned) and a running QR factorisation of
its tridiagonal matrix by Givens rotations; each step updates ``x`` along one
new direction so that ``||r||`` (``||r||_M`` preconditioned) is minimal over the
space. The residual norm comes for free as ``|phibar|``, the running product of
the rotation sines. Only ``A + damping I`` must be symmetric: it may be
indefinite or singular (consistent systems). The preconditioner must be
symmetric positive definite. Columns are independent recurrences, all stepped
together, each with one product per step until it meets its target.
"""

from __future__ import annotations

import torch

from hesse.solvers._system import Outcome, Preconditioner, System, column_norms, exhausted


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0``, else 0 (frozen columns may reach exact zeros)."""
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), 0)


def _m_norm(R: torch.Tensor, Y: torch.Tensor) -> torch.Tensor | None:
    """``sqrt(r^T M r)`` per column, or ``None`` if ``M`` is not positive definite."""
    sq = (R * Y).sum(0)
    if bool((sq < 0).any()):
        return None
    return sq.sqrt()


_NOT_PD_PRECONDITIONER = (
    "the preconditioner is not positive definite (r^T M r < 0). MINRES needs a "
    "symmetric positive definite preconditioner"
)


def minres(
    system: System,
    B: torch.Tensor,
    target: torch.Tensor,
    M: Preconditioner | None,
) -> Outcome:
    """Preconditioned MINRES from ``X = 0``, one recurrence per column; see NOTE [minres]."""
    precondition = (lambda R: R) if M is None else M
    X = torch.zeros_like(B)
    r1 = B.clone()
    y = precondition(r1)
    beta1 = _m_norm(r1, y)
    if beta1 is None:
        return Outcome(X, 0, _NOT_PD_PRECONDITIONER)
    # The recurrence estimates ||r||_M; stop on the same relative reduction as the target.
    goal = target * _div(beta1, column_norms(B))
    zeros = torch.zeros_like(beta1)
    oldb, beta, dbar, epsln, phibar = zeros, beta1, zeros, zeros, beta1
    cs, sn = -torch.ones_like(beta1), zeros
    w = torch.zeros_like(B)
    w2 = torch.zeros_like(B)
    r2 = r1
    active = phibar > goal
    tiny = torch.finfo(B.dtype).eps
    iterations = 0
    while bool(active.any()):
        if not system.affords(int(active.sum())):
            return Outcome(X, iterations, exhausted(system))
        iterations += 1
        v = _div(y, beta)
        Av = torch.zeros_like(v)
        Av[:, active] = system(v[:, active])
        y = Av
        if iterations > 1:
            y = y - _div(beta, oldb) * r1
        alfa = (v * y).sum(0)
        y = y - _div(alfa, beta) * r2
        r1, r2 = r2, y
        y = precondition(r2)
        oldb = beta
        beta = _m_norm(r2, y)
        if beta is None:
            return Outcome(X, iterations, _NOT_PD_PRECONDITIONER)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp(min=tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        X = X + torch.where(active, phi * w, 0)
        if not bool(torch.isfinite(X).all()):
            return Outcome(X, iterations, "the iterate became non-finite (inf or nan)")
        active = active & (phibar.abs() > goal)
    return Outcome(X, iterations)
