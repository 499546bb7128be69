"""The system a solver works on: ``(A + damping I)`` with a product budget, and its outcome.

# NOTE [solver contract]
Every solver in this package takes a :class:`System` (the damped operator, which
counts its column products and knows the budget), the right-hand sides ``B``
(``(n, k)``), the per-column residual targets ``target`` (``(k,)``:
``max(rtol ||b_j||, atol)``) and an optional preconditioner ``M`` (a function of an
``(n, r)`` tensor), and returns an :class:`Outcome`: the solution ``X`` and, if it
stopped early, why. Solvers test convergence on their own cheap residual
estimates; :func:`hesse.solve` then recomputes the *true* residual
``||b - (A + damping I) x||`` of every column, which alone decides ``converged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hesse.operators._base import LinearOperator

Preconditioner = Callable[[torch.Tensor], torch.Tensor]


class System:
    """``X -> (A + damping I) X`` on ``(n, r)`` tensors, counting column products."""

    def __init__(self, op: LinearOperator, damping: float, budget: int) -> None:
        self.op, self.damping, self.budget = op, damping, budget
        self.n = op.shape[1]
        self.dtype, self.device = op.dtype, op.device
        self.num_matvecs = 0

    def affords(self, columns: int) -> bool:
        """Whether ``columns`` more products stay within the budget."""
        return self.num_matvecs + columns <= self.budget

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return self._apply(self.op._matmat, X)

    def transpose(self, X: torch.Tensor) -> torch.Tensor:
        """``(A + damping I)^T X``."""
        return self._apply(self.op._rmatmat, X)

    def _apply(self, product: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor):
        if X.shape[1] == 0:
            return X.clone()
        self.num_matvecs += X.shape[1]
        out = product(X)
        if self.damping:
            out = out + self.damping * X
        return out


@dataclass
class Outcome:
    """What a solver returns: the solution and, if it stopped early, the reason.

    Attributes:
        x: ``(n, k)``.
        iterations: steps taken.
        reason: ``None`` if the solver's own estimate met the targets; otherwise a
            sentence for the failure message ("max_matvecs=... was exhausted", ...).
        stderr: ``(n, k)`` standard error of ``x`` for stochastic solvers, else ``None``.
        estimates: ``(repeats, n, k)`` the independent estimates ``x`` averages
            (stochastic solvers), else ``None``.
    """

    x: torch.Tensor
    iterations: int
    reason: str | None = None
    stderr: torch.Tensor | None = None
    estimates: torch.Tensor | None = None


def exhausted(system: System) -> str:
    return (
        f"max_matvecs={system.budget} was exhausted. Raise max_matvecs, add a "
        "preconditioner or increase damping"
    )


def column_norms(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(X, dim=0)
