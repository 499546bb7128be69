"""Propagate Jacobian and Hessian sparsity patterns through a traced ATen graph.

# NOTE [hessian propagation]
Forward pass: every tensor that depends on ``x`` gets its Jacobian pattern
``J`` (NOTE [pattern representation]), ``J_out = sum_k map_k @ J_k``, one rule per
operator (:mod:`hesse.sparsity._rules`). Backward pass: *liveness*, the
elements whose adjoint can be nonzero (those with a first-order path to the
output), computed by running each map backwards from the output. Then every
second-order term of a live output element contributes the pairs

.. math:: H \\mathrel{|}= (M_a J_a)^\\top_{\\text{live}} (M_b J_b)_{\\text{live}},

which is the chain rule's second-order term
:math:`\\sum_t \\bar y_t \\, \\partial^2 y_t / \\partial u_a \\partial u_b` with the
adjoint :math:`\\bar y_t` replaced by its structural nonzero pattern. The second
derivatives of intermediate values are accounted for at their own nodes, so the
union over all nodes is a superset of the Hessian's nonzeros for every input.
This is the global Hessian pattern of Walther (2008) and of
SparseConnectivityTracer (Hill & Dalle, 2025), computed with sparse boolean
matrix products instead of per-scalar index sets.

References:
    Walther, A. (2008). Computing sparse Hessians with automatic differentiation. ACM TOMS 34(1).
    Hill, A. & Dalle, G. (2025). Sparser, better, faster, stronger: sparsity detection for
    efficient automatic differentiation. TMLR.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.fx import GraphModule, Node

from hesse.sparsity._dispatch import VALUE_FREE, apply_rule, is_inplace, op_name
from hesse.sparsity._maps import Local, State, check_size, identity, select_rows, union


def _meta_state(meta: Any) -> State:
    return State(shape=tuple(int(s) for s in meta.shape), dtype=meta.dtype)


def _real(meta: Any) -> torch.Tensor:
    return torch.zeros(tuple(int(s) for s in meta.shape), dtype=meta.dtype)


def _live_nodes(gm: GraphModule) -> set[Node]:
    """Nodes the output reads, directly or not (mutations of the input are dropped)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    seen: set[Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


class Propagation:
    """The patterns of one traced function of a flat ``x`` of length ``n``."""

    def __init__(self, gm: GraphModule, n: int) -> None:
        self.gm = gm
        self.n = n
        self.records: list[tuple[State, Local]] = []
        self.output: Any = None
        self._forward()

    # -- forward ---------------------------------------------------------------------
    def _forward(self) -> None:
        env: dict[Node, Any] = {}
        live = _live_nodes(self.gm)
        n = self.n

        def lookup(a: Any) -> Any:
            if isinstance(a, Node):
                return env[a]
            if isinstance(a, (list, tuple)):
                return type(a)(lookup(b) for b in a)
            if isinstance(a, dict):
                return {k: lookup(v) for k, v in a.items()}
            return a

        for node in self.gm.graph.nodes:
            if node not in live:
                continue
            if node.op == "placeholder":
                meta = node.meta["val"]
                env[node] = State(
                    shape=tuple(meta.shape), dtype=meta.dtype, J=identity(n), tainted=True
                )
            elif node.op == "get_attr":
                val = getattr(self.gm, node.target)
                env[node] = State(shape=tuple(val.shape), dtype=val.dtype, value=val)
            elif node.op == "output":
                self.output = lookup(node.args[0])
            elif node.target is operator.getitem:
                seq, i = lookup(node.args[0]), node.args[1]
                env[node] = seq[i]
            else:
                env[node] = self._call(node, lookup(node.args), lookup(node.kwargs))
                if is_inplace(node.target) and isinstance(node.args[0], Node):
                    # later readers of the mutated tensor see the new value
                    env[node.args[0]] = env[node]

    def _call(self, node: Node, args: tuple, kwargs: dict) -> Any:
        op = node.target
        meta = node.meta.get("val")
        states = [s for s in _flatten(args, kwargs) if isinstance(s, State)]
        tainted = any(s.tainted for s in states)
        name = op_name(op)
        if not tainted or name in VALUE_FREE:
            return self._constant(op, args, kwargs, meta)
        local = apply_rule(op, args, kwargs, meta)
        if isinstance(meta, (tuple, list)):
            locs = local if isinstance(local, (tuple, list)) else [local] * len(meta)
            return tuple(self._output(m, loc) for m, loc in zip(meta, locs))
        return self._output(meta, local)

    def _output(self, meta: Any, local: Local | None) -> Any:
        if not isinstance(meta, torch.Tensor):
            return _placeholder(meta)
        state = _meta_state(meta)
        state.tainted = True
        if local is not None and local.linear:
            mats = [m.apply(local.inputs[k].J) for k, m in local.linear]
            J = union(mats) if len(mats) > 1 else mats[0]
            assert J.shape == (state.numel, self.n), "propagation: pattern of the wrong size"
            state.J = J.tocsr()
            self.records.append((state, local))
        return state

    def _constant(self, op: Any, args: tuple, kwargs: dict, meta: Any) -> Any:
        """Evaluate an operator whose inputs do not depend on x (or whose value never does)."""

        def real(a: Any) -> Any:
            if isinstance(a, State):
                return a.value if a.value is not None else torch.zeros(a.shape, dtype=a.dtype)
            if isinstance(a, (list, tuple)):
                return type(a)(real(b) for b in a)
            if isinstance(a, dict):
                return {k: real(v) for k, v in a.items()}
            return a

        # a constant computed from an unknown value is unknown too (not a value of zeros):
        # masks and indices are read by value (NOTE [constants])
        unknown = any(isinstance(s, State) and s.value is None for s in _flatten(args, kwargs))
        val = None
        if not unknown or op_name(op) in VALUE_FREE:
            try:
                val = op(*real(args), **real(kwargs))
            except Exception:  # noqa: BLE001 - values are a convenience; shapes come from meta
                val = None

        def wrap(v: Any, m: Any) -> Any:
            if not isinstance(m, torch.Tensor):
                return v if v is not None else _placeholder(m)
            s = _meta_state(m)
            s.value = v if isinstance(v, torch.Tensor) else None
            return s

        if isinstance(meta, (tuple, list)):
            vals = val if isinstance(val, (tuple, list)) else [None] * len(meta)
            return tuple(wrap(v, m) for v, m in zip(vals, meta))
        return wrap(val, meta)

    # -- results ---------------------------------------------------------------------
    def output_state(self) -> State:
        out = self.output
        assert isinstance(out, State), "the traced function must return one tensor"
        return out

    def jacobian(self) -> sp.csr_matrix:
        out = self.output_state()
        if out.J is None:
            return sp.csr_matrix((out.numel, self.n), dtype=bool)
        return out.J

    def hessian(self, max_products: int | None = None) -> sp.csr_matrix:
        """The symmetric global Hessian pattern ``(n, n)`` (NOTE [hessian propagation]).

        ``max_products`` caps the pair products (the work, an upper bound on the
        entries) below the global limit: a caller that has a cheaper dense path stops
        early with :class:`PatternTooLarge`.
        """
        n = self.n
        out = self.output_state()
        live: dict[int, np.ndarray] = {}
        if out.J is not None:
            live[out.key] = np.ones(out.numel, dtype=bool)
        blocks: list[sp.spmatrix] = []
        products = 0  # an upper bound on the entries found so far
        for state, local in reversed(self.records):
            m = live.get(state.key)
            if m is None or not m.any():
                continue
            for k, mp in local.linear:
                inp = local.inputs[k]
                lm = mp.t_mask(m)
                prev = live.get(inp.key)
                live[inp.key] = lm if prev is None else (prev | lm)
            for pair in local.pairs:
                lt = m if pair.owner is None else pair.owner.mask(m)
                if not lt.any():
                    continue
                A = select_rows(pair.map_a.apply(local.inputs[pair.a].J), lt)
                B = select_rows(pair.map_b.apply(local.inputs[pair.b].J), lt)
                if A.nnz == 0 or B.nnz == 0:
                    continue
                products += int(np.dot(np.diff(A.indptr), np.diff(B.indptr)))
                check_size(products, "Hessian pattern", max_products)
                blocks.append((A.T.tocsr() @ B).tocsr())
        if not blocks:
            return sp.csr_matrix((n, n), dtype=bool)
        H = union(blocks)
        H = (H + H.T).tocsr()
        H.sum_duplicates()
        H.sort_indices()
        return H


def _placeholder(meta: Any) -> Any:
    """A Python number standing in for a value read out of a tensor (``.item()``).

    Autograd treats such a number as a constant, and patterns do not depend on the
    values of constants (NOTE [constants]); a read value that steers control flow or
    a shape fails during tracing instead (NOTE [tracing]).
    """
    if isinstance(meta, torch.SymBool):
        return True
    if isinstance(meta, torch.SymInt):
        return 1
    if isinstance(meta, torch.SymFloat):
        return 1.0
    return meta


def _flatten(args: Any, kwargs: Any) -> list[Any]:
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)
        else:
            out.append(a)

    walk(args)
    walk(kwargs)
    return out
