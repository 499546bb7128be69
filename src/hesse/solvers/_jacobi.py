"""The diagonal (Jacobi) preconditioner."""

from __future__ import annotations

import torch

from hesse._validation import describe, fail
from hesse.operators._base import PSD, SYMMETRIC, LinearOperator
from hesse.solvers._solve import check_damping


class JacobiOperator(LinearOperator):
    """``diag(1 / (d + damping))`` as an operator."""

    def __init__(self, inverse_diagonal: torch.Tensor) -> None:
        self.inverse_diagonal = inverse_diagonal
        n = inverse_diagonal.shape[0]
        self.shape, self.dtype, self.device = (
            (n, n),
            inverse_diagonal.dtype,
            inverse_diagonal.device,
        )
        self.tags = frozenset({SYMMETRIC, PSD})

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.inverse_diagonal.unsqueeze(1) * X


def jacobi(diagonal: torch.Tensor, *, damping: float = 0.0) -> JacobiOperator:
    """The Jacobi preconditioner ``M = diag(1 / (d + damping))`` for :func:`hesse.solve`.

    Args:
        diagonal: ``(n,)``, the diagonal ``d`` of ``A`` (e.g. ``hesse.diagonal(op)``),
            with ``d + damping > 0`` everywhere (``M`` must be positive definite).
        damping: the same ``lambda >= 0`` passed to the solve.

    Returns:
        A symmetric positive definite :class:`JacobiOperator`.

    Raises:
        TypeError: ``diagonal`` is not a floating-point tensor.
        ValueError: it is not 1-D, or ``d + damping`` has entries ``<= 0`` or non-finite.

    Cost: one elementwise product per application.

    Example:
        >>> M = jacobi(torch.tensor([2.0, 4.0], dtype=torch.float64), damping=0.0)
        >>> M @ torch.tensor([1.0, 1.0], dtype=torch.float64)
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    call = "hesse.solvers.jacobi(diagonal)"
    if not isinstance(diagonal, torch.Tensor) or not diagonal.is_floating_point():
        fail(call, f"expected a floating-point tensor, got {describe(diagonal)}.", TypeError)
    if diagonal.dim() != 1:
        fail(call, f"expected a 1-D diagonal, got shape {tuple(diagonal.shape)}.")
    shifted = diagonal.detach() + check_damping(call, damping)
    if not bool(torch.isfinite(shifted).all()) or bool((shifted <= 0).any()):
        fail(
            call,
            f"expected diagonal + damping > 0 and finite everywhere, got minimum "
            f"{float(shifted.min()):.3g}. Raise damping (a Hessian's diagonal can be negative; "
            "use a GGN diagonal) so that the preconditioner is positive definite.",
        )
    return JacobiOperator(1 / shifted)
