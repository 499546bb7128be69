"""Sparsity detection: trace a function to ATen ops and propagate boolean index patterns.

- :mod:`._tracing`: ``trace(g, x, call=)``, the functionalised, decomposed ATen graph of a
  function of one flat tensor (shapes in ``node.meta["val"]``); reusable by any pass over
  the graph (NOTE [tracing]).
- :mod:`._maps`: the sparse boolean maps and per-tensor states (NOTE [pattern representation]).
- :mod:`._rules` and :mod:`._layers`: one propagation rule per operator family;
  :mod:`._dispatch` picks the rule of an operator.
- :mod:`._propagate`: ``Propagation(gm, n)`` with ``.jacobian()`` and ``.hessian()``
  (NOTE [hessian propagation]).

The public entry points are ``hesse.hessian_sparsity`` and ``hesse.jacobian_sparsity``.
"""
