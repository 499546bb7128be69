"""``hesse.inverse``: ``(A + damping I)^{-1}`` as an operator whose products solve."""

from __future__ import annotations

from typing import Any

import torch

from hesse._validation import check_choice
from hesse.operators._base import PSD, SYMMETRIC, LinearOperator
from hesse.solvers._solve import METHODS, SolveResult, check_damping, solve
from hesse.spectra._input import square_operator


class InverseOperator(LinearOperator):
    """``(A + damping I)^{-1}``, each product one :func:`hesse.solve` call.

    Attributes:
        last_result: the :class:`SolveResult` of the latest product (its
            residuals, products and convergence), or ``None`` before the first.
    """

    def __init__(self, op: LinearOperator, damping: float, method: str, options: dict) -> None:
        self.op, self.damping, self.method, self.options = op, damping, method, options
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.layout = op.layout
        keep = {SYMMETRIC, PSD} if method == "cg" else {SYMMETRIC}
        self.tags = op.tags & frozenset(keep)
        self.last_result: SolveResult | None = None

    def _name(self) -> str:
        return f"hesse.inverse(op, method={self.method!r})"

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        result = solve(self.op, X, method=self.method, damping=self.damping, **self.options)
        self.last_result = result
        return result.x


def inverse(
    op: LinearOperator | torch.Tensor,
    *,
    damping: float = 0.0,
    method: str = "cg",
    **options: Any,
) -> InverseOperator:
    """``(A + damping I)^{-1}`` as a :class:`~hesse.LinearOperator`, for composition.

    Every product ``inv @ v`` (vectors, matrices, parameter-shaped dicts) is one
    :func:`hesse.solve` with the given ``method`` and ``options`` (``rtol``,
    ``preconditioner``, ``max_matvecs``, ``on_failure``, ...), so it is exact to the
    solver's tolerance, warns or raises like ``solve`` when a target is missed, and
    keeps the latest :class:`SolveResult` in ``inv.last_result``. The inverse is
    symmetric when ``op`` is (for ``"cg"`` also positive definite), up to the
    solver's tolerance.

    Args:
        op: as in :func:`hesse.solve`.
        damping: ``lambda >= 0``.
        method: as in :func:`hesse.solve`.
        **options: keyword options of :func:`hesse.solve`.

    Returns:
        An :class:`InverseOperator`.

    Raises:
        ValueError, TypeError: as :func:`hesse.solve`, for the operator, damping
            and method (the options are checked at the first product).

    Cost: one solve per product (``k`` columns share one block solve for ``"cg"``).

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> inv = inverse(A, damping=1.0)
        >>> inv @ torch.tensor([3.0, 5.0], dtype=torch.float64)
        tensor([1.0000, 1.0000], dtype=torch.float64)
    """
    call = f"hesse.inverse(op, method={method!r})"
    check_choice(call, "method", method, METHODS)
    check_damping(call, damping)
    op = square_operator(call, op)
    return InverseOperator(op, float(damping), method, options)
