"""Kronecker-factored curvature of models: KFAC and EKFAC as operators."""

from hesse.kfac._ekfac import EKFACOperator
from hesse.kfac._kfac import KFACOperator
from hesse.kfac._kronecker import Factors

__all__ = ["EKFACOperator", "Factors", "KFACOperator"]
