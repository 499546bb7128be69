"""Input checks shared by the spectral algorithms (eigsh, trace, spectral_density)."""

from __future__ import annotations

from typing import Any

import torch

from hesse._validation import describe, fail
from hesse.operators._base import SYMMETRIC, DenseOperator, LinearOperator, as_operator


def square_operator(call: str, A: Any) -> LinearOperator:
    """``A`` as an operator; it must be square and real floating point."""
    op = as_operator(A, call=call)
    m, n = op.shape
    if m != n:
        fail(call, f"expected a square operator, got shape {op.shape}.")
    if n < 1:
        fail(call, "expected a non-empty operator, got shape (0, 0).")
    if not op.dtype.is_floating_point:
        fail(call, f"expected a real floating-point operator, got dtype {op.dtype}.", TypeError)
    return op


def symmetric_operator(call: str, A: Any) -> LinearOperator:
    """``A`` as a symmetric operator.

    A dense tensor that is symmetric up to rounding (``|A - A^T| <= 1e3 eps max|A|``,
    as Hessians computed by automatic differentiation are) is symmetrised; an
    operator must carry the ``"symmetric"`` tag.
    """
    op = square_operator(call, A)
    if SYMMETRIC in op.tags:
        return op
    if isinstance(A, torch.Tensor):
        scale = A.abs().max()
        gap = (A - A.T).abs().max()
        if gap <= 1e3 * torch.finfo(A.dtype).eps * scale:
            return DenseOperator((A + A.T) / 2, tags=frozenset({SYMMETRIC}))
        fail(
            call,
            f"expected a symmetric matrix, got one with max|A - A^T| = {gap.item():.3g} "
            f"(max|A| = {scale.item():.3g}). Symmetrise it with (A + A.T) / 2 if that is intended.",
        )
    fail(
        call,
        f"expected a symmetric operator, got {op!r} without the 'symmetric' tag. These "
        "algorithms assume A = A^T: pass a Hessian/GGN/Fisher operator, or an operator whose "
        "tags include 'symmetric'.",
    )


def check_int(call: str, name: str, value: Any, minimum: int) -> int:
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(call, f"expected {name} to be an int, got {value!r}.", TypeError)
    if value < minimum:
        fail(call, f"expected {name} >= {minimum}, got {value}.")
    return value


def check_positive_float(call: str, name: str, value: Any) -> float:
    """``value`` must be a positive finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(call, f"expected {name} to be a positive number, got {describe(value)}.", TypeError)
    if not 0 < value < float("inf"):
        fail(call, f"expected {name} to be a positive finite number, got {value!r}.")
    return float(value)
