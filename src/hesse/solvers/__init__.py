"""Linear solves with curvature operators: ``(A + damping I)^{-1} b`` and inverse operators.

One solver per module: block CG (``_cg``), MINRES (``_minres``), LSMR (``_lsmr``),
Neumann (``_neumann``) and LiSSA (``_lissa``); ``_solve`` is the entry point.
"""

from hesse.solvers._inverse import InverseOperator, inverse
from hesse.solvers._jacobi import JacobiOperator, jacobi
from hesse.solvers._solve import (
    METHODS,
    NotConvergedError,
    NotConvergedWarning,
    SolveResult,
    solve,
)

__all__ = [
    "METHODS",
    "InverseOperator",
    "JacobiOperator",
    "NotConvergedError",
    "NotConvergedWarning",
    "SolveResult",
    "inverse",
    "jacobi",
    "solve",
]
