"""Becker-LeCun / HesScale: propagate only Hessian diagonals backwards through the graph.

# NOTE [diagonal-only propagation]
Keeping only the diagonal ``d_z`` of the curvature at every node, the exact
recursion ``H_a = J^T H_z J + R`` (NOTE [second-order adjoints] in ``_exact``)
becomes

.. math::

    d_a = (J \\odot J)^\\top d_z + \\operatorname{diag} R,

which costs about one extra backward pass (Becker & LeCun, 1989). HesScale
(Elsayed & Mahmood, 2022) starts it from the *exact* diagonal of the loss Hessian
with respect to the network output, so the last layer's values are exact; here
that diagonal comes from the exact engine run on the loss graph. The result is an
approximation: every off-diagonal coupling is dropped, at every node. At a node
used several times the contributions of its uses are added (the cross terms
between uses are dropped too).

``(J o J)^T d`` needs no per-layer code either: elementwise ops use ``f'(z)^2``
from forward mode; ops whose Jacobian entries are 0 or 1 (views, sums, gathers,
max-pooling, ...) use their VJP as it is; products (``mm``, ``bmm``,
``convolution``, ...) use their VJP with the other factor squared; ``mean`` its VJP
divided once more by the count; anything else forms its local Jacobian and
Hessian densely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.func import hessian, vjp, vmap

from hesse.curvprop._exact import (
    GENERAL_LIMIT,
    Elementwise,
    SinkTerm,
    _add,
    _add_slot,
    _floats,
    _mm_grads,
    _pick,
    _total,
    reduce_to,
)
from hesse.curvprop._graph import PRODUCTS, NodeInfo, Plan, UnsupportedGraph

# Non-elementwise linear or piecewise-linear ops with Jacobian entries in {0, 1}.
ZERO_ONE = frozenset(
    {
        "getitem", "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand",
        "squeeze", "unsqueeze", "select", "slice", "clone", "alias", "_to_copy",
        "contiguous", "cat", "stack", "index", "index_select", "gather", "constant_pad_nd",
        "diagonal", "flip", "roll", "repeat", "split", "split_with_sizes", "unbind",
        "narrow", "sum", "cumsum", "lift_fresh_copy", "expand_copy", "view_copy",
        "permute_copy", "squeeze_copy", "unsqueeze_copy", "slice_scatter",
        "select_scatter", "tril", "triu", "unfold", "col2im", "im2col", "pixel_shuffle",
        "pixel_unshuffle", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
        "replication_pad2d", "upsample_nearest2d", "scatter_add", "index_add", "trace",
        "movedim", "unflatten", "flatten", "_reshape_alias", "squeeze_dims", "amax", "amin",
        "max", "min", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "sort", "topk", "adaptive_max_pool2d", "as_strided",
        "masked_fill", "embedding",
    }
)  # fmt: skip


def propagate_diagonal(
    run: dict, seed_grad: torch.Tensor, seed_diag: torch.Tensor
) -> tuple[list[torch.Tensor | None], list[SinkTerm]]:
    """Sweep ``run``'s graph backwards carrying diagonals (NOTE [diagonal-only propagation]).

    Returns the diagonal at every placeholder (``None`` where nothing arrived) and the
    factored sums met at sink parameters (NOTE [parameter sinks]).
    """
    p: Plan = run["plan"]
    env, vjps = run["env"], run["vjps"]
    grads: dict[fx.Node, Any] = {p.output: seed_grad}
    diags: dict[fx.Node, Any] = {p.output: seed_diag}
    terms: list[SinkTerm] = []
    for ni in reversed(p.order):
        node = ni.node
        if node not in grads or not ni.active:
            continue
        g = grads.pop(node)
        d = diags.pop(node, None)
        if ni.name == "getitem":
            parent, index = node.args[0], node.args[1]
            _add_slot(grads, parent, index, g, len(env[parent]))
            if d is not None:
                _add_slot(diags, parent, index, d, len(env[parent]))
            continue
        vjp_fn, fpos, is_tuple = vjps[node]
        if ni.name in ("mm", "addmm"):
            _mm_grads(p, ni, env, g, grads, skip_targets=True)
        else:
            for leaf, gi in zip(
                [ni.leaves[i] for i in ni.active], vjp_fn(_pick(g, fpos, is_tuple, env[node]))
            ):
                _add(grads, leaf, gi)
        if isinstance(d, list):
            d = _pick(d, fpos, is_tuple, env[node])
        for pos, contribution in _node_diagonal(p, ni, env, g, d, vjp_fn, fpos, is_tuple, terms):
            leaf = ni.leaves[pos]
            if p.deps.get(leaf):
                _add(diags, leaf, contribution)
    return [diags.get(ph) for ph in p.placeholders], terms


def _node_diagonal(p, ni: NodeInfo, env, g, d, vjp_fn, fpos, is_tuple, terms):
    """``(position, contribution)`` pairs: ``(J o J)^T d`` plus ``diag R`` for one node."""
    target = ni.node.target
    pointwise = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    if pointwise:
        return _elementwise(ni, env, g, d)
    if d is None:
        if ni.family == "general":
            return _general(ni, env, g, None)
        return []
    if ni.name in ZERO_ONE or ni.name == "mean":
        cot = d if isinstance(d, tuple) else (d,)
        res = vjp_fn(cot)
        if ni.name == "mean":
            ratio = env[ni.node].numel() / env[ni.leaves[ni.active[0]]].numel()
            res = [r * ratio for r in res]
        return list(zip(ni.active, res))
    if ni.name in PRODUCTS:
        return _product(p, ni, env, d, terms)
    return _general(ni, env, g, d)


def _elementwise(ni: NodeInfo, env, g, d):
    """``f'(z)^2 d + g f''(z)`` per input, with repeated inputs merged into one."""
    ew = Elementwise(ni, env)
    slots: dict[fx.Node, list[int]] = {}
    for k, pos in enumerate(ni.active):
        slots.setdefault(ni.leaves[pos], []).append(k)
    nonlinear = ni.family == "pointwise"
    out = []
    for ks in slots.values():
        first = _total([ew.first(k) for k in ks])
        val = first * first * d if d is not None else None
        if nonlinear:
            curv = g * _total([ew.second(i, j) for i in ks for j in ks])
            val = curv if val is None else val + curv
        if val is not None:
            shape = ew.prims[ks[0]].shape
            out.append((ni.active[ks[0]], reduce_to(val[None], shape)[0]))
    return out


def _product(p: Plan, ni: NodeInfo, env, d, terms):
    """Products: the VJP with every other factor squared (and sums at sink weights)."""
    factors, additive = PRODUCTS[ni.name]
    out = []
    for pos in ni.active:
        if pos in additive:  # enters linearly with coefficient beta (default 1)
            beta = ni.node.kwargs.get("beta", 1)

            def add_only(t, pos=pos):
                return ni.call(env, {pos: t})

            _, pull = vjp(add_only, env[ni.leaves[pos]])
            out.append((pos, pull(d)[0] * beta))
            continue
        others = {q: env[ni.leaves[q]] ** 2 for q in factors if q != pos}
        alpha2 = ni.node.kwargs.get("alpha", 1) ** 2
        leaf = ni.leaves[pos]
        if ni.name in ("mm", "addmm") and leaf in p.sinks:
            (other,) = others.values()
            if pos == factors[1]:  # d_W[i, o] = sum_r x[r, i]^2 d[r, o]
                terms.append(SinkTerm(leaf, False, alpha2, "rows", (other, d)))
            else:  # d_W[r, i] = sum_o x[i, o]^2 d[r, o]
                terms.append(SinkTerm(leaf, True, alpha2, "rows", (other.T, d.T)))
            continue
        zeroed = {q: torch.zeros_like(env[ni.leaves[q]]) for q in additive if q in ni.active}

        def f(t, pos=pos, others=others, zeroed=zeroed):
            return ni.call(env, {pos: t, **others, **zeroed})

        _, pull = vjp(f, env[leaf])  # the call already applies alpha once
        out.append((pos, pull(d)[0] * (alpha2**0.5)))
    return out


def _general(ni: NodeInfo, env, g, d):
    """Any op: its local Jacobian (squared) and the diagonal of its local Hessian, densely."""
    prims = [env[ni.leaves[i]] for i in ni.active]
    sizes = [t.numel() for t in prims]
    m = sum(sizes)
    value = env[ni.node]
    floats, fpos, is_tuple = _floats(value)
    n_out = sum(o.numel() for o in floats)
    if m > GENERAL_LIMIT or n_out > GENERAL_LIMIT:
        raise UnsupportedGraph(
            f"op {ni.node.target} has no diagonal rule and {m} inputs / {n_out} outputs per "
            f"sample (more than {GENERAL_LIMIT} for dense local derivatives)"
        )
    flat = torch.cat([t.reshape(-1) for t in prims])

    def fn(v):
        xs = [c.reshape(t.shape) for c, t in zip(torch.split(v, sizes), prims)]
        fl, _, _ = _floats(ni.call(env, dict(zip(ni.active, xs))))
        return torch.cat([o.reshape(-1) for o in fl])

    total = torch.zeros_like(flat)
    if d is not None:
        dflat = torch.cat([t.reshape(-1) for t in (d if isinstance(d, tuple) else (d,))])
        _, pull = vjp(fn, flat)
        basis = torch.eye(n_out, dtype=flat.dtype, device=flat.device)
        jac = vmap(lambda e: pull(e)[0])(basis)  # (n_out, m)
        total = total + dflat @ (jac * jac)
    if ni.family != "linear" and ni.family != "piecewise":
        gs = _pick(g, fpos, is_tuple, value)
        gflat = torch.cat([t.reshape(-1) for t in gs])
        h = hessian(lambda v: (gflat * fn(v)).sum())(flat)
        total = total + torch.diagonal(h)
    return [
        (pos, piece.reshape(t.shape))
        for pos, piece, t in zip(ni.active, torch.split(total, sizes), prims)
    ]
