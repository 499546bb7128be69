"""Curvature backpropagation on traced ATen graphs: exact and Becker-LeCun Hessian diagonals."""

from hesse.curvprop._api import CurvpropFallbackWarning, per_sample_diagonal

__all__ = ["CurvpropFallbackWarning", "per_sample_diagonal"]
