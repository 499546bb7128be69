"""Exact curvature backpropagation: the Hessian diagonal from signed factor columns.

# NOTE [second-order adjoints]
For a scalar ``L`` computed by a graph of nodes ``z_n = op_n(a_n)`` (``a_n``: the
node's inputs), the Hessian with respect to the parameters ``theta`` is

.. math::

    \\nabla^2_\\theta L = \\sum_n J_n^\\top R_n J_n,\\qquad
    R_n = \\sum_j \\bar g_{n,j}\\, \\nabla^2_{a} (z_n)_j,\\qquad
    J_n = \\partial a_n / \\partial\\theta,

with ``g_n = dL/dz_n`` the ordinary gradient (Mizutani & Dreyfus, 2008; the
"edge-pushing" identity of Gower & Mello, 2012). Factorising each local residual
``R_n = sum_c s_c u_c u_c^T`` (``s_c = +-1``) gives the exact diagonal

.. math::

    \\operatorname{diag}\\nabla^2_\\theta L = \\sum_n \\sum_c s_c (J_n^\\top u_c)^2 .

``J_n^T u_c`` is a backward pass started at node ``n``: all columns of all nodes
travel backwards together, node by node, through vectorised VJPs (``vmap`` of
``torch.func.vjp``), so fan-out (residual connections, a weight used twice, the
three uses of the input in attention) needs nothing special: a column's pieces
arriving by different paths are summed *before* it is squared. Columns keep the
identity of the node that created them ("source") so that pieces of the same
column meet and add. This generalises BackPACK's ``DiagHessian`` (Dangel,
Kunstner & Hennig, 2020) from a chain of known layers to any traced graph.

Two facts keep the column count down. A bilinear node whose two factors depend
on disjoint sets of parameters adds nothing to the *diagonal* (its residual only
couples the two sets), so its columns are skipped; and columns of every source
are dropped as soon as they reach a node that depends on no parameter their
source can still affect. Two more keep them cheap: diagonal residual columns
travel as values (NOTE [diagonal columns]), and at small nodes the sources that
have fully arrived are refactored into at most a few columns per element (NOTE
[column compression]).

# NOTE [per-sample]
The engine runs on the graph of *one sample* and is ``vmap``-ed over the batch,
so every column is a per-sample column and its square is taken before samples
are summed (the square of a batch sum would mix samples). This also gives the
per-sample diagonals (BackPACK's ``BatchDiagHessian``) at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.func import hessian, jvp, vjp, vmap

from hesse.curvprop._graph import NodeInfo, Plan, UnsupportedGraph

# Largest input (per sample) of an op that has no structured rule and is handled
# by a dense local Hessian.
GENERAL_LIMIT = 4096
# NOTE [one pull per node]: column blocks smaller than this (per sample) share one
# vectorised VJP. About what a copy moves in the ~0.2 ms a VJP call costs in Python.
CONCAT_BYTES = 512 * 1024
# NOTE [column compression]: nodes up to this many elements per sample have their
# whole sources refactored (an eigendecomposition of a numel x numel matrix).
COMPRESS_LIMIT = 2048
# ... once they carry more than this many columns per element (each compression
# costs an eigendecomposition; compressing at every excess repeats it node by node).
COMPRESS_RATIO = 8


def _floats(out: Any) -> tuple[list[torch.Tensor], list[int], bool]:
    """The floating-point parts of an op's output, their positions, and whether it was a tuple."""
    if isinstance(out, torch.Tensor):
        return [out], [0], False
    idx = [i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return [out[i] for i in idx], idx, True


def reduce_to(block: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a ``(K, *broadcast_shape)`` block down to ``(K, *shape)`` (the VJP of broadcasting)."""
    if block[0].numel() == math.prod(shape):  # only size-1 dimensions differ
        return block.reshape(block.shape[0], *shape)
    lead = block.dim() - 1 - len(shape)
    if lead > 0:
        block = block.sum(dim=tuple(range(1, 1 + lead)))
    if tuple(block.shape[1:]) != tuple(shape):
        block = block.sum_to_size((block.shape[0], *shape))
    return block


# NOTE [diagonal columns]
# The residual of an elementwise op with one input is diagonal: its columns are
# ``sqrt|r_j| e_j``, one per element. Stored densely they are an ``(n, n)`` block
# that every later node must carry, although each column has one nonzero. A
# :class:`DiagCols` block keeps the ``n`` values instead, while the columns travel
# through nodes that keep them one-hot at the same flat position (reshapes, and
# elementwise ops whose active inputs have the output's shape: ``e_j`` times the
# local derivative); anywhere else it becomes the dense block, with column ``j`` as
# row ``j``, the row order every other piece of the same source uses.
class DiagCols:
    """Columns ``values[j] e_j``, ``j`` over the flat elements (NOTE [diagonal columns])."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def dense(self) -> torch.Tensor:
        v = self.values
        return torch.diag_embed(v.reshape(-1)).reshape(v.numel(), *v.shape)


def _dense(c: Any) -> Any:
    return c.dense() if isinstance(c, DiagCols) else c


class Propagation:
    """One curvature backpropagation over one or more graphs (the loss, then the model).

    :meth:`forward` evaluates a graph and keeps every node's value and VJP;
    :meth:`backward` sweeps it from the output with the gradient ``dL/dnode`` and
    the columns ``cols[node][source]`` (``(K, *shape)``; lists of slots for
    tuple-valued nodes). Sources, their signs ``signs[source]`` (``(K,)``) and the
    parameters they can reach (``relevant[source]``) live here, so columns can pass
    from one graph to the next.
    """

    def __init__(self) -> None:
        self.signs: dict[int, torch.Tensor] = {}
        self.relevant: dict[int, frozenset[int] | None] = {}
        self._next = 0
        # NOTE [memory estimate from the sweep]: bytes of every node value and
        # column block made, counted in passing (no dispatch mode, no second run).
        self.made_bytes = 0
        self.pending: dict[int, int] = {}  # source -> buckets holding a piece of it

    def new_source(self, signs: torch.Tensor, relevant: frozenset[int] | None) -> int:
        s = self._next
        self._next += 1
        self.signs[s] = signs
        self.relevant[s] = relevant
        return s

    # -- forward ------------------------------------------------------------------
    def forward(self, p: Plan, inputs: list[Any]) -> dict:
        env: dict[fx.Node, Any] = dict(zip(p.placeholders, inputs))
        vjps: dict[fx.Node, Any] = {}
        for node in p.gm.graph.nodes:
            if node.op == "get_attr":
                env[node] = getattr(p.gm, node.target)
        for ni in p.order:
            if not ni.active or ni.name == "getitem":
                env[ni.node] = ni.call(env)
                continue
            fast = _rearrangement_vjp(ni, env)
            if fast is not None:
                env[ni.node], vjps[ni.node] = ni.call(env), (fast, [0], False)
                continue
            env[ni.node], vjps[ni.node] = _vjp(ni, env)
        # Each value, and the gradient the sweep makes for it.
        self.made_bytes += 2 * sum(_nbytes(v) for v in env.values())
        return {"env": env, "vjps": vjps, "plan": p}

    # -- backward -----------------------------------------------------------------
    def backward(
        self,
        run: dict,
        seed_grad: Any,
        seed_cols: dict[int, Any] | None,
        *,
        prune: bool,
    ) -> tuple[dict, dict, dict]:
        """Sweep the graph backwards from its output.

        Returns the gradients and the columns at the placeholders, and the sums of
        squares met at sink parameters (NOTE [parameter sinks]). ``prune``: only the diagonal at the targets is
        wanted, so bilinear nodes with disjoint parameter dependencies are skipped
        (NOTE [second-order adjoints]) and sinks are squared where reached.
        """
        p: Plan = run["plan"]
        env, vjps = run["env"], run["vjps"]
        grads: dict[fx.Node, Any] = {p.output: seed_grad}
        cols: dict[fx.Node, dict[int, Any]] = {p.output: dict(seed_cols or {})}
        for s in cols[p.output]:
            self.pending[s] = self.pending.get(s, 0) + 1
        terms: list[SinkTerm] = []
        for ni in reversed(p.order):
            node = ni.node
            if node not in grads or not ni.active:
                continue
            g = grads.pop(node)
            here = cols.pop(node, {})
            for s in here:
                self.pending[s] -= 1
            if ni.name == "getitem":
                parent, index = ni.node.args[0], ni.node.args[1]
                _add_slot(grads, parent, index, g, len(env[parent]))
                for s, c in here.items():
                    self._add_cols(p, cols, parent, s, c, slot=(index, len(env[parent])))
                continue
            if here:
                self._compress(env[node], here)
            inputs = [ni.leaves[i] for i in ni.active]
            vjp_fn, fpos, is_tuple = vjps[node]
            if ni.name in ("mm", "addmm"):
                _mm_grads(p, ni, env, g, grads, skip_targets=prune)
            else:
                cot = _pick(g, fpos, is_tuple, env[node])
                for leaf, gi in zip(inputs, vjp_fn(cot)):
                    _add(grads, leaf, gi)
            if here and prune and ni.name in ("mm", "addmm"):
                self._transport_mm(p, ni, env, here, cols, terms)
            elif here:
                self._transport(p, ni, env, vjp_fn, fpos, is_tuple, here, cols)
            self._residual(p, ni, env, g, cols, prune)
        out_g = {ph: grads.get(ph) for ph in p.placeholders}
        out_c = {ph: cols.get(ph, {}) for ph in p.placeholders}
        return out_g, out_c, terms

    def _add_cols(self, p: Plan, cols, leaf, s, c, slot=None) -> None:
        rel = self.relevant[s]
        if rel is not None and not (rel & p.deps.get(leaf, frozenset())):
            return
        if not p.deps.get(leaf):
            return
        self.made_bytes += _nbytes(c)
        bucket = cols.setdefault(leaf, {})
        if s not in bucket:
            self.pending[s] = self.pending.get(s, 0) + 1
        if slot is not None:
            index, n = slot
            c = _dense(c)
            lst = bucket.setdefault(s, [None] * n)
            lst[index] = c if lst[index] is None else lst[index] + c
        elif s not in bucket:
            bucket[s] = c
        else:
            old = bucket[s]
            if isinstance(old, DiagCols) and isinstance(c, DiagCols):
                bucket[s] = DiagCols(old.values + c.values)
            else:
                bucket[s] = _dense(old) + _dense(c)

    def _compress(self, value: Any, here: dict) -> None:
        """Refactor the whole sources at a node into at most ``numel`` columns, in place.

        NOTE [column compression]: a source is *whole* at a node when no other node
        holds a piece of it, so its columns ``U`` (signs ``S``) enter everything
        upstream only through ``U^T S U``. When the whole sources carry more columns
        than the node has elements (a transformer's residual stream meets thousands
        of columns from the layers above it, but has ``T x d`` elements), their
        summed curvature ``C = sum U^T S U`` is eigendecomposed into at most ``numel``
        signed columns ``sqrt|lambda| q``: the same contribution to every diagonal
        upstream, with fewer columns to carry. The choice depends on shapes only, so
        it is the same for every sample of a batch.
        """
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        whole = [s for s in here if self.pending[s] == 0 and not isinstance(here[s], list)]
        n = value.numel()
        width = sum(here[s].values.numel() if isinstance(here[s], DiagCols) else here[s].shape[0]
                    for s in whole)  # fmt: skip
        if width <= COMPRESS_RATIO * n or n > COMPRESS_LIMIT:
            return
        curv = None
        relevant: frozenset[int] | None = frozenset()
        for s in whole:
            c, sg = here.pop(s), self.signs[s]
            if isinstance(c, DiagCols):
                part = torch.diag_embed(sg * c.values.reshape(-1) ** 2)
            else:
                u = c.reshape(c.shape[0], n)
                part = u.T @ (sg[:, None] * u)
            curv = part if curv is None else curv + part
            rel = self.relevant[s]
            relevant = None if rel is None or relevant is None else relevant | rel
        lam, vec = _symmetric_eigh(0.5 * (curv + curv.T))
        fresh = self.new_source(torch.sign(lam), relevant)
        here[fresh] = (vec * lam.abs().sqrt()).T.reshape(n, *value.shape)

    def _transport(self, p, ni: NodeInfo, env, vjp_fn, fpos, is_tuple, here, cols) -> None:
        """Apply the transposed Jacobian of ``ni`` to all columns that reached it.

        NOTE [one pull per node]: a transformer's node is reached by tens of sources,
        and a vectorised VJP costs a fixed ~0.2 ms of Python (``vmap`` and pytree
        handling) whatever its size, so per-source VJPs made that overhead the
        sweep's cost. Rearrangements are transposed by hand, source by source (a
        reshape or permute of a ``(K, ...)`` block is a view); at every other node
        the small blocks (under :data:`CONCAT_BYTES` per sample, where the fixed cost
        dominates) are concatenated along ``K``, pulled back in one vectorised VJP
        and split again (views); large blocks are pulled alone, as copying them
        would cost more than the call it saves.
        """
        inputs = [ni.leaves[i] for i in ni.active]
        diag = {s: c for s, c in here.items() if isinstance(c, DiagCols)}
        if diag:
            slopes = _diagonal_slopes(ni, env)
            for s, c in diag.items():
                if slopes is None:
                    here[s] = c.dense()
                    continue
                del here[s]
                for leaf, slope in zip(inputs, slopes):
                    v = c.values.reshape(env[leaf].shape) if slope is None else c.values * slope
                    self._add_cols(p, cols, leaf, s, DiagCols(v))
        direct = _rearrangement_vjp(ni, env, lead=1)
        if direct is not None:
            for s, c in here.items():
                for leaf, part in zip(inputs, direct((c,))):
                    self._add_cols(p, cols, leaf, s, part)
            return
        value = env[ni.node]
        pull = vmap(lambda *cs: vjp_fn(cs))
        small = [s for s in here if _nbytes(here[s]) < CONCAT_BYTES]
        groups = [[s] for s in here if s not in small] + ([small] if small else [])
        for sources in groups:
            blocks = [_pick_batched(here[s], fpos, is_tuple, value) for s in sources]
            sizes = [block[0].shape[0] for block in blocks]
            stacked = blocks[0]
            if len(blocks) > 1:
                stacked = tuple(torch.cat(slot) for slot in zip(*blocks))
            for leaf, part in zip(inputs, pull(*stacked)):
                pieces = torch.split(part, sizes) if len(sizes) > 1 else (part,)
                for s, piece in zip(sources, pieces):
                    self._add_cols(p, cols, leaf, s, piece)

    def _transport_mm(self, p, ni: NodeInfo, env, here, cols, terms) -> None:
        """``mm``/``addmm`` by hand, summing squares at sink weights (NOTE [parameter sinks])."""
        args, kwargs = ni.node.args, ni.node.kwargs
        alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
        i1, i2 = (1, 2) if ni.name == "addmm" else (0, 1)
        m1, m2 = env[args[i1]], env[args[i2]]
        diag = {s: c.values for s, c in here.items() if isinstance(c, DiagCols)}
        if diag:
            self._transport_mm_diagonal(p, ni, env, diag, cols, terms)
            here = {s: c for s, c in here.items() if s not in diag}
            if not here:
                return
        sources = list(here)
        if ni.name == "addmm" and 0 in ni.active:
            shape = env[args[0]].shape
            for s in sources:
                u = here[s]
                self._add_cols(p, cols, args[0], s, reduce_to(u * beta if beta != 1 else u, shape))
        blocks = [here[s] for s in sources]
        signs = [self.signs[s] for s in sources]
        if i1 in ni.active:
            if args[i1] in p.sinks:  # grad = alpha u_c m2^T = alpha (m2 u_c^T)^T
                kind, parts = square_sum(m2.T, [u.transpose(1, 2) for u in blocks], signs)
                terms.append(SinkTerm(args[i1], True, alpha**2, kind, parts))
            else:
                for s, u in zip(sources, blocks):
                    self._add_cols(p, cols, args[i1], s, alpha * (u @ m2.T))
        if i2 in ni.active:
            if args[i2] in p.sinks:  # grad = alpha m1^T u_c
                kind, parts = square_sum(m1, blocks, signs)
                terms.append(SinkTerm(args[i2], False, alpha**2, kind, parts))
            else:
                for s, u in zip(sources, blocks):
                    self._add_cols(p, cols, args[i2], s, alpha * (m1.T @ u))

    def _transport_mm_diagonal(self, p, ni: NodeInfo, env, diag, cols, terms) -> None:
        """:meth:`_transport_mm` for :class:`DiagCols` blocks ``v`` ``(m, o)``.

        Column ``(r, o)`` is ``v[r, o] e_r e_o^T``: its gradient is ``v[r, o] e_r
        m2[:, o]^T`` for ``mat1`` and ``v[r, o] m1[r, :]^T e_o^T`` for ``mat2``, built
        by one ``einsum`` each (never the ``(m o, m, o)`` dense block); at a sink
        the squares sum to ``(s v^2)`` against the squared other factor.
        """
        args, kwargs = ni.node.args, ni.node.kwargs
        alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
        i1, i2 = (1, 2) if ni.name == "addmm" else (0, 1)
        m1, m2 = env[args[i1]], env[args[i2]]
        (m, i), o = m1.shape, m2.shape[1]
        for s, v in diag.items():
            if ni.name == "addmm" and 0 in ni.active:
                shape = env[args[0]].shape
                if shape == v.shape:
                    part = DiagCols(v * beta)
                elif tuple(shape) == (o,):
                    eye = torch.eye(o, dtype=v.dtype, device=v.device)
                    part = torch.einsum("ro,op->rop", v * beta, eye).reshape(m * o, o)
                else:
                    part = reduce_to(DiagCols(v * beta).dense(), shape)
                self._add_cols(p, cols, args[0], s, part)
            w = self.signs[s].reshape(v.shape) * v * v
            if i1 in ni.active:
                if args[i1] in p.sinks:
                    terms.append(SinkTerm(args[i1], True, alpha**2, "rows", (m2.T * m2.T, w.T)))
                else:
                    eye = torch.eye(m, dtype=v.dtype, device=v.device)
                    part = torch.einsum("ro,rs,io->rosi", v * alpha, eye, m2)
                    self._add_cols(p, cols, args[i1], s, part.reshape(m * o, m, i))
            if i2 in ni.active:
                if args[i2] in p.sinks:
                    terms.append(SinkTerm(args[i2], False, alpha**2, "rows", (m1 * m1, w)))
                else:
                    eye = torch.eye(o, dtype=v.dtype, device=v.device)
                    part = torch.einsum("ro,ri,op->roip", v * alpha, m1, eye)
                    self._add_cols(p, cols, args[i2], s, part.reshape(m * o, i, o))

    def _residual(self, p: Plan, ni: NodeInfo, env, g, cols, prune: bool) -> None:
        if ni.family in ("linear", "piecewise", "constant"):
            return
        relevant: frozenset[int] | None = None
        if ni.family == "bilinear":
            fa, fb = ni.factors
            overlap = p.deps[ni.leaves[fa]] & p.deps[ni.leaves[fb]]
            if prune:
                if not overlap:
                    return  # NOTE [second-order adjoints]: no diagonal contribution
                relevant = overlap
            if _elementwise_product(ni, env):
                self._product_residual(p, ni, env[ni.node], g, cols, relevant)
                return
            parts, signs = _bilinear(ni, env, g)
        elif ni.family == "pointwise":
            parts, signs = _pointwise(ni, env, g)
        else:
            parts, signs = _general(ni, env, g)
        s = self.new_source(signs, relevant)
        for pos, block in parts:
            self._add_cols(p, cols, ni.leaves[pos], s, block)

    def _product_residual(self, p: Plan, ni: NodeInfo, out, g, cols, relevant) -> None:
        """Residual of ``a * b`` (same shapes) as two sources of :class:`DiagCols`.

        Per element the Hessian of ``g a b`` is ``g [[0, 1], [1, 0]] = |g|/2 (1, t)(1, t)^T
        - |g|/2 (1, -t)(1, -t)^T`` with ``t = sign(g)`` (NOTE [diagonal columns]).
        """
        fa, fb = ni.factors
        half = (g.abs() * 0.5).sqrt()
        t = torch.sign(g)
        for sign in (1.0, -1.0):
            signs = torch.full((out.numel(),), sign, dtype=out.dtype, device=out.device)
            s = self.new_source(signs, relevant)
            self._add_cols(p, cols, ni.leaves[fa], s, DiagCols(half))
            self._add_cols(p, cols, ni.leaves[fb], s, DiagCols(half * t * sign))


# -- helpers ---------------------------------------------------------------------------
def _elementwise_product(ni: NodeInfo, env) -> bool:
    """``mul`` of two tensors with the output's shape (no broadcasting)."""
    if ni.name != "mul" or ni.node.kwargs:
        return False
    out = env[ni.node]
    return all(
        isinstance(env[ni.leaves[k]], torch.Tensor) and env[ni.leaves[k]].shape == out.shape
        for k in ni.factors
    )


def _rearrangement_vjp(ni: NodeInfo, env, *, lead: int = 0):
    """The VJP of a view-like op written out, or None.

    Views, permutations and broadcasts are most of the nodes of a traced model;
    writing their transposes by hand spares a ``torch.func.vjp`` per node. ``lead``:
    the number of leading batch dimensions of the cotangents (1 for ``(K, ...)``
    column blocks, NOTE [one pull per node]).
    """
    if ni.active != [0] or not isinstance(ni.node.args[0], fx.Node):
        return None
    x = env[ni.node.args[0]]
    shape, name, args = x.shape, ni.name, ni.node.args
    if name in ("view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "squeeze_dims"):
        return lambda cots: (cots[0].reshape(*cots[0].shape[:lead], *shape),)
    if name in ("clone", "alias", "contiguous", "lift_fresh_copy"):
        return lambda cots: (cots[0],)
    if name == "expand":
        if lead:
            return lambda cots: (reduce_to(cots[0], shape),)
        return lambda cots: (cots[0].sum_to_size(shape),)
    if name == "permute":
        dims = [d % x.dim() for d in args[1]]
        inverse = [*range(lead), *(dims.index(i) + lead for i in range(len(dims)))]
        return lambda cots: (cots[0].permute(inverse),)
    if name in ("transpose", "t"):
        if x.dim() < 2:
            return lambda cots: (cots[0],)
        d0, d1 = (args[1] % x.dim(), args[2] % x.dim()) if name == "transpose" else (0, 1)
        return lambda cots: (cots[0].transpose(d0 + lead, d1 + lead),)
    return None


# Reshapes that keep every element at its flat position (NOTE [diagonal columns]).
FLAT_ORDER = frozenset(
    {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "squeeze_dims", "clone",
     "alias", "contiguous", "lift_fresh_copy", "_to_copy"}
)  # fmt: skip


def _diagonal_slopes(ni: NodeInfo, env) -> list[torch.Tensor | None] | None:
    """Per active input, what a one-hot column at flat position ``j`` is multiplied by
    (``None``: 1, the input only reshaped); ``None`` where columns stop being one-hot."""
    out = env[ni.node]
    if not isinstance(out, torch.Tensor):
        return None
    if ni.name in FLAT_ORDER and len(ni.active) == 1:
        if ni.name == "_to_copy" and env[ni.leaves[ni.active[0]]].dtype != out.dtype:
            return None
        return [None]
    target = ni.node.target
    if not (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return None
    if any(env[ni.leaves[i]].shape != out.shape for i in ni.active):
        return None
    ew = Elementwise(ni, env)
    return [ew.first(k) for k in range(len(ni.active))]


def _mm_grads(p: Plan, ni: NodeInfo, env, g, grads, *, skip_targets: bool) -> None:
    """Gradients through ``mm``/``addmm`` by hand, skipping parameters whose gradient is unused.

    When only the diagonal at the targets is wanted, their gradients (one
    parameter-sized tensor per sample) are never needed.
    """
    args, kwargs = ni.node.args, ni.node.kwargs
    alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
    i1, i2 = (1, 2) if ni.name == "addmm" else (0, 1)
    m1, m2 = env[args[i1]], env[args[i2]]

    def wanted(pos):
        leaf = args[pos]
        if pos not in ni.active:
            return False
        return not (skip_targets and (leaf in p.sinks or leaf.op == "placeholder"))

    if ni.name == "addmm" and wanted(0):
        _add(grads, args[0], (g * beta).sum_to_size(env[args[0]].shape))
    if wanted(i1):
        _add(grads, args[i1], alpha * (g @ m2.T))
    if wanted(i2):
        _add(grads, args[i2], alpha * (m1.T @ g))


def _vjp(ni: NodeInfo, env) -> tuple[Any, tuple]:
    prims = [env[ni.leaves[i]] for i in ni.active]
    meta: dict[str, Any] = {}

    def f(*ts):
        out = ni.call(env, dict(zip(ni.active, ts)))
        floats, pos, is_tuple = _floats(out)
        meta["pos"], meta["tuple"] = pos, is_tuple
        return tuple(floats), out

    _, vjp_fn, out = vjp(f, *prims, has_aux=True)
    return out, (vjp_fn, meta["pos"], meta["tuple"])


def _nbytes(value: Any) -> int:
    """Bytes of one sample's tensor, or of a tuple or list of them (``None`` entries: 0)."""
    if isinstance(value, DiagCols):
        value = value.values
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _add(store: dict, key, val) -> None:
    if val is None:
        return
    store[key] = val if key not in store else store[key] + val


def _add_slot(store: dict, key, index: int, val, n: int) -> None:
    lst = store.setdefault(key, [None] * n)
    lst[index] = val if lst[index] is None else lst[index] + val


def _pick(g, fpos, is_tuple, value) -> tuple:
    """The cotangent tuple for the float outputs of a node, zeros where none arrived."""
    if not is_tuple:
        return (g,)
    return tuple(g[i] if g[i] is not None else torch.zeros_like(value[i]) for i in fpos)


def _pick_batched(c, fpos, is_tuple, value) -> tuple:
    if not is_tuple:
        return (_dense(c),)
    k = next(x for x in c if x is not None).shape[0]
    return tuple(
        c[i] if c[i] is not None else value[i].new_zeros((k, *value[i].shape)) for i in fpos
    )


def _output_tensor(ni: NodeInfo, env) -> torch.Tensor:
    out = env[ni.node]
    assert isinstance(out, torch.Tensor), f"{ni.name}: expected a tensor output"
    return out


class Elementwise:
    """First and second derivatives of an elementwise op, element by element.

    The active inputs are broadcast to the output shape, so every derivative is a
    tensor shaped like the output (forward mode with all-ones tangents: exact
    because the Jacobian of an elementwise op is diagonal in the broadcast space).
    """

    def __init__(self, ni: NodeInfo, env) -> None:
        out = _output_tensor(ni, env)
        self.ni, self.env, self.shape = ni, env, out.shape
        self.prims = [env[ni.leaves[i]] for i in ni.active]
        self.ts = [t.expand(self.shape).clone() for t in self.prims]
        self.ones = torch.ones_like(out)

    def _phi(self, *xs):
        return self.ni.call(self.env, dict(zip(self.ni.active, xs)))

    def _d1(self, i, *xs):
        def along(t):
            return self._phi(*xs[:i], t, *xs[i + 1 :])

        return jvp(along, (xs[i],), (self.ones,))[1]

    def first(self, i: int) -> torch.Tensor:
        return self._d1(i, *self.ts)

    def second(self, i: int, j: int) -> torch.Tensor:
        ts = self.ts

        def along(t):
            return self._d1(i, *ts[:j], t, *ts[j + 1 :])

        return jvp(along, (ts[j],), (self.ones,))[1]


def _pointwise(ni: NodeInfo, env, g) -> tuple[list, torch.Tensor]:
    """Residual of an elementwise op: an ``m x m`` Hessian per output element."""
    ew = Elementwise(ni, env)
    shape, prims, d2 = ew.shape, ew.prims, ew.second
    n = math.prod(shape)
    m = len(prims)
    if m == 1:
        r = (g * d2(0, 0)).reshape(n)
        if prims[0].shape == shape:  # NOTE [diagonal columns]
            return [(ni.active[0], DiagCols(r.abs().sqrt().reshape(shape)))], torch.sign(r)
        block = torch.diag_embed(r.abs().sqrt()).reshape(n, *shape)
        return [(ni.active[0], reduce_to(block, prims[0].shape))], torch.sign(r)
    entries = {}
    for i in range(m):
        for j in range(i, m):
            entries[i, j] = entries[j, i] = (g * d2(i, j)).reshape(n)
    hess = torch.stack(
        [torch.stack([entries[i, j] for j in range(m)], dim=-1) for i in range(m)], dim=-2
    )
    lam, vec = torch.linalg.eigh(hess)
    root = lam.abs().sqrt()
    parts = []
    for i in range(m):
        block = torch.cat([torch.diag_embed(root[:, e] * vec[:, i, e]) for e in range(m)])
        parts.append((ni.active[i], reduce_to(block.reshape(m * n, *shape), prims[i].shape)))
    signs = torch.cat([torch.sign(lam[:, e]) for e in range(m)])
    return parts, signs


def _bilinear(ni: NodeInfo, env, g) -> tuple[list, torch.Tensor]:
    """Residual of a product of two active factors, through a basis of the smaller one.

    ``<g, op(A, B)> = sum_i A_i beta_i(B)``, so its Hessian is
    ``sum_i (e_i b_i^T + b_i e_i^T)`` with ``b_i = grad beta_i``, which is
    ``1/2 (e_i + b_i)(e_i + b_i)^T - 1/2 (e_i - b_i)(e_i - b_i)^T``.
    """
    fa, fb = ni.factors
    if env[ni.leaves[fa]].numel() > env[ni.leaves[fb]].numel():
        fa, fb = fb, fa
    a, b = env[ni.leaves[fa]], env[ni.leaves[fb]]
    k = a.numel()
    basis = torch.eye(k, dtype=a.dtype, device=a.device).reshape(k, *a.shape)

    def mixed(ap):
        _, pull = vjp(lambda bp: ni.call(env, {fa: ap, fb: bp}), b)
        return pull(g)[0]

    hb = vmap(mixed)(basis)
    half = math.sqrt(0.5)
    parts = [
        (fa, torch.cat([basis, basis]) * half),
        (fb, torch.cat([hb, -hb]) * half),
    ]
    one = torch.ones(k, dtype=a.dtype, device=a.device)
    return parts, torch.cat([one, -one])


def _general(ni: NodeInfo, env, g) -> tuple[list, torch.Tensor]:
    """Residual of an op without structure: its dense local Hessian, eigendecomposed."""
    prims = [env[ni.leaves[i]] for i in ni.active]
    sizes = [t.numel() for t in prims]
    m = sum(sizes)
    if m > GENERAL_LIMIT:
        raise UnsupportedGraph(
            f"op {ni.node.target} has no curvature rule and {m} inputs per sample "
            f"(more than {GENERAL_LIMIT} for a dense local Hessian)"
        )
    flat = torch.cat([t.reshape(-1) for t in prims])
    value = env[ni.node]
    floats, fpos, is_tuple = _floats(value)
    gs = _pick(g, fpos, is_tuple, value)

    def psi(v):
        xs = [c.reshape(t.shape) for c, t in zip(torch.split(v, sizes), prims)]
        out = ni.call(env, dict(zip(ni.active, xs)))
        fl, _, _ = _floats(out)
        total = (gs[0] * fl[0]).sum()
        for gi, o in zip(gs[1:], fl[1:]):
            total = total + (gi * o).sum()
        return total

    h = hessian(psi)(flat)
    h = 0.5 * (h + h.T)
    lam, vec = _symmetric_eigh(h)
    colsm = (vec * lam.abs().sqrt()).T  # (m, m): row c is column u_c
    parts = []
    for pos, piece, t in zip(ni.active, torch.split(colsm, sizes, dim=1), prims):
        parts.append((pos, piece.reshape(m, *t.shape)))
    return parts, torch.sign(lam)


def _symmetric_eigh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a finite symmetric ``h``, retried in float64 on failure.

    LAPACK's float32 divide-and-conquer can fail to converge on exact, finite local
    Hessians with large null spaces (many repeated zero eigenvalues, e.g. a bilinear
    coupling of a few inputs with many). The float64 solve of the same matrix is
    exact to float32 precision, so the factors are cast back to ``h``'s dtype.
    """
    try:
        return torch.linalg.eigh(h)
    except torch.linalg.LinAlgError:
        if h.dtype == torch.float64:
            raise
        lam, vec = torch.linalg.eigh(h.to(torch.float64))
        return lam.to(h.dtype), vec.to(h.dtype)


@dataclass
class SinkTerm:
    """A sum of squares met at a sink, kept factored until samples are summed.

    NOTE [parameter sinks]: per sample, ``S = sum_c s_c (x^T u_c)^2`` would be one
    parameter-sized tensor per sample; the factors are far smaller, so they leave
    the vmapped sweep as they are and :func:`assemble_term` contracts them over the
    batch (BackPACK's ``einsum`` of squares for linear layers). ``kind``:
    ``"rows"``: ``S = sum_r a_r b_r^T`` from ``(a (m, i), b (m, o))``;
    ``"gram"``: ``S = sum_{r,s} x_r x_s T_rs`` from ``(x (m, i), T (o, m, m))``;
    ``"dense"``: ``S`` itself. ``left``: ``S`` is transposed (the sink was ``mat1``).
    """

    leaf: fx.Node
    left: bool
    scale: float
    kind: str
    parts: tuple[torch.Tensor, ...]


def square_sum(
    x: torch.Tensor, us: list[torch.Tensor], signs: list[torch.Tensor]
) -> tuple[str, tuple]:
    """Factors of ``sum_c s_c (x^T u_c)^2`` for ``x`` ``(m, i)`` and blocks ``u`` ``(K, m, o)``.

    One row: ``(x^2)^T (sum_c s_c u_c^2)``. Several rows: through the ``(o, m, m)``
    Gram tensor of the columns when that is cheaper than the products themselves.
    Blocks are reduced one by one (never concatenated).
    """
    k = sum(u.shape[0] for u in us)
    _, m, o = us[0].shape
    i = x.shape[1]
    if m == 1:
        w = _total([torch.einsum("k,kro->ro", sg, u * u) for u, sg in zip(us, signs)])
        return "rows", (x * x, w)
    if m * (k * o + i * o) <= k * i * o:
        grams = [
            (u * sg[:, None, None]).permute(2, 1, 0) @ u.permute(2, 0, 1)
            for u, sg in zip(us, signs)
        ]
        return "gram", (x, _total(grams))
    dense = []
    for u, sg in zip(us, signs):
        prods = torch.einsum("ri,kro->kio", x, u)
        dense.append(torch.einsum("k,kio->io", sg, prods * prods))
    return "dense", (_total(dense),)


def _total(terms: list[torch.Tensor]) -> torch.Tensor:
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def assemble_term(kind: str, parts: tuple[torch.Tensor, ...], per_sample: bool) -> torch.Tensor:
    """Contract a :class:`SinkTerm`'s batched ``(B, ...)`` factors: ``(B, i, o)`` or ``(i, o)``."""
    b = "b" if per_sample else ""
    if kind == "rows":
        return torch.einsum(f"bri,bro->{b}io", *parts)
    if kind == "gram":  # S[i, o] = sum_{r,s} x[r, i] x[s, i] G[o, r, s]
        x, gram = parts
        y = gram @ x[:, None]  # (B, o, r, i)
        return torch.einsum(f"bri,bori->{b}io", x, y)
    return parts[0] if per_sample else parts[0].sum(0)


def diagonal_from_cols(prop: Propagation, cols: dict[int, Any]) -> torch.Tensor | None:
    """``sum_c s_c u_c^2`` over all sources at one node."""
    total = None
    for s, c in cols.items():
        if isinstance(c, DiagCols):
            sq = prop.signs[s].reshape(c.values.shape) * c.values * c.values
            total = sq if total is None else total + sq
            continue
        sq = torch.einsum("k,k...->...", prop.signs[s], c * c)
        total = sq if total is None else total + sq
    return total
