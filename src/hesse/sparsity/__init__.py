"""Sparsity detection: trace a function to ATen ops and propagate boolean index patterns.

- :mod:`._tracing`: the one tracer of hesse, ``make_graph`` (also used by
  ``hesse.curvprop``, whose decomposition table lives there too), and
  ``trace(g, x, call=)``: the functionalised, decomposed ATen graph of a function of one
  flat tensor (shapes in ``node.meta["val"]``), NOTE [tracing].
- :mod:`._maps`: the sparse boolean maps and per-tensor states (NOTE [pattern representation]).
- :mod:`._rules` and :mod:`._layers`: one propagation rule per operator family;
  :mod:`._dispatch` picks the rule of an operator.
- :mod:`._propagate`: ``Propagation(gm, n)`` with ``.jacobian()`` and ``.hessian()``
  (NOTE [hessian propagation]).
- :mod:`._coloring` and :mod:`._kernels`: star, acyclic and distance-1 colourings
  (NOTE [colouring], NOTE [acyclic colouring], NOTE [kernels]).
- :mod:`._recovery`: recovery plans, direct and by substitution (NOTE [substitution]).
- :mod:`._sparse`: the public transforms (NOTE [sparse pipeline]).

The public entry points are ``hesse.hessian_sparsity``, ``hesse.jacobian_sparsity``,
``hesse.sparse_hessian``, ``hesse.sparse_jacobian`` and ``hesse.hessian_diagonal``.
"""
