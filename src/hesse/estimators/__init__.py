"""Estimators of operator functionals: diagonals (exact and stochastic)."""

from hesse.estimators._diagonal import diagonal, diagonal_methods, register_diagonal

__all__ = ["diagonal", "diagonal_methods", "register_diagonal"]
