"""Curvature operators: the operator core and the Hessian, GGN and Fisher of functions and models."""

from hesse.operators._base import LinearOperator, as_operator
from hesse.operators._function import FunctionHessianOperator, hessian_operator
from hesse.operators._model import FisherOperator, GGNOperator, HessianOperator

__all__ = [
    "FisherOperator",
    "FunctionHessianOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "as_operator",
    "hessian_operator",
]
