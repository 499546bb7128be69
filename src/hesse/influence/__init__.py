"""Influence functions (Koh & Liang 2017) on hesse's curvature operators and solvers."""

from hesse.influence._influence import InfluenceInfo, influence, self_influence

__all__ = ["InfluenceInfo", "influence", "self_influence"]
