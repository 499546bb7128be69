"""LSMR: least-squares by Golub-Kahan bidiagonalisation (Fong & Saunders, 2011).

# NOTE [lsmr]
LSMR minimises ``||(A + damping I) x - b||`` over the Krylov space of
``A^T A`` (each step one product with the operator and one with its transpose),
chosen so that ``||A^T r||`` decreases monotonically: it solves square systems
(symmetric or not, definite or not) and least-squares problems alike. The
residual norm ``||r||`` is tracked by the paper's estimate (Section 3.3), which
drives the stopping test. A preconditioner ``M`` is applied on the right
(solve ``(A M) y = b``, then ``x = M y``), which leaves the residual unchanged;
``A M`` must be well conditioned in its *singular* values (a diagonal ``M`` for a
badly scaled symmetric ``A`` is not: use CG or MINRES there);
``M`` must be symmetric. Columns are independent recurrences stepped together.
"""

from __future__ import annotations

import torch

from hesse.solvers._minres import _div
from hesse.solvers._system import Outcome, Preconditioner, System, column_norms, exhausted


def _unit(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = column_norms(V)
    return _div(V, norms), norms


def lsmr(
    system: System,
    B: torch.Tensor,
    target: torch.Tensor,
    M: Preconditioner | None,
) -> Outcome:
    """LSMR from ``X = 0`` (no regularisation term), one recurrence per column."""

    def forward(V: torch.Tensor) -> torch.Tensor:
        return system(V if M is None else M(V))

    def backward(U: torch.Tensor) -> torch.Tensor:
        out = system.transpose(U)
        return out if M is None else M(out)

    k = B.shape[1]
    Y = torch.zeros_like(B)
    u, beta = _unit(B)
    active = beta > target
    if not bool(active.any()):
        return Outcome(Y, 0)
    if not system.affords(int(active.sum())):
        return Outcome(Y, 0, exhausted(system))
    v = torch.zeros_like(B)
    v[:, active] = backward(u[:, active])
    v, alpha = _unit(v)
    ones, zeros = torch.ones(k, dtype=B.dtype, device=B.device), B.new_zeros(k)
    alphabar, zetabar = alpha, alpha * beta
    rho, rhobar, cbar, sbar = ones, ones, ones, zeros
    h, hbar = v.clone(), torch.zeros_like(B)
    betadd, betad, rhodold, tautildeold, thetatilde, zeta = beta, zeros, ones, zeros, zeros, zeros
    iterations = 0
    while bool(active.any()):
        if not system.affords(2 * int(active.sum())):
            return Outcome(Y if M is None else M(Y), iterations, exhausted(system))
        iterations += 1
        Av = torch.zeros_like(B)
        Av[:, active] = forward(v[:, active])
        u, beta = _unit(Av - alpha * u)
        Au = torch.zeros_like(B)
        Au[:, active] = backward(u[:, active])
        v, alpha = _unit(Au - beta * v)
        # Rotation P_k (no damping term, so Qhat_k is the identity).
        rhoold = rho
        rho = torch.hypot(alphabar, beta)
        c, s = _div(alphabar, rho), _div(beta, rho)
        thetanew = s * alpha
        alphabar = c * alpha
        # Rotation Pbar_k.
        rhobarold, zetaold = rhobar, zeta
        thetabar = sbar * rho
        rhotemp = cbar * rho
        rhobar = torch.hypot(rhotemp, thetanew)
        cbar, sbar = _div(rhotemp, rhobar), _div(thetanew, rhobar)
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        hbar = h - _div(thetabar * rho, rhoold * rhobarold) * hbar
        Y = Y + torch.where(active, _div(zeta, rho * rhobar) * hbar, 0)
        h = v - _div(thetanew, rho) * h
        # The estimate of ||r|| (rotations Q_k and Qtilde_{k-1}).
        betahat, betadd = c * betadd, -s * betadd
        thetatildeold = thetatilde
        rhotildeold = torch.hypot(rhodold, thetabar)
        ctildeold, stildeold = _div(rhodold, rhotildeold), _div(thetabar, rhotildeold)
        thetatilde = stildeold * rhobar
        rhodold = ctildeold * rhobar
        betad = -stildeold * betad + ctildeold * betahat
        tautildeold = _div(zetaold - thetatildeold * tautildeold, rhotildeold)
        taud = _div(zeta - thetatilde * tautildeold, rhodold)
        normr = torch.sqrt((betad - taud) ** 2 + betadd**2)
        if not bool(torch.isfinite(Y).all()):
            return Outcome(Y, iterations, "the iterate became non-finite (inf or nan)")
        # A zero alpha or beta ends the bidiagonalisation: the iterate is final.
        active = active & (normr > target) & (alpha != 0) & (beta != 0)
    return Outcome(Y if M is None else M(Y), iterations)
