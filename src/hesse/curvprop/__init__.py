"""Curvature backpropagation on traced ATen graphs: exact and Becker-LeCun Hessian diagonals.

The model and the loss are traced (``make_fx``, fake tensors, composite ops
decomposed) on one sample; a backward sweep over the graph carries, next to the
gradient, a signed symmetric factorisation of the curvature (exact method) or
only its diagonal (Becker-LeCun / HesScale), node by node, with no per-layer code.

Modules:
    ``_graph``: tracing, activity and the curvature family of every node.
    ``_exact``: the exact factor propagation (NOTE [second-order adjoints]).
    ``_diagonal_only``: the diagonal-only propagation (NOTE [diagonal-only propagation]).
    ``_api``: per-sample batching, the trace cache, fallbacks, public entry points.

Public: :func:`hesse.per_sample_diagonal`, and ``hesse.diagonal(HessianOperator(...),
method="exact" | "becker-lecun")``.
"""

from hesse.curvprop._api import CurvpropFallbackWarning, per_sample_diagonal

__all__ = ["CurvpropFallbackWarning", "per_sample_diagonal"]
