"""Sequential graph kernels: vertex orderings, greedy and acyclic colouring, tree traversal.

# NOTE [kernels]
Greedy colourings are sequential by nature (each vertex sees the colours chosen before
it). The kernels here are written once, in the subset of Python that numba compiles,
on CSR arrays (``indptr``, ``indices``) of a symmetric graph without self loops. When
numba is installed and the graph is large enough for compilation to pay off
(``JIT_EDGES``), or the kernel was compiled earlier in the process, the compiled version
runs (``cache=True``: compiled once per machine); otherwise the same code runs as plain
Python, which is fast enough for small graphs.
Every kernel costs ``O(|E| K)`` or less (``K`` colours), so a dense row (arrowhead)
costs its length, not its square.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Graphs with more stored edges than this use the numba-compiled kernels when available.
JIT_EDGES = 5_000

_COMPILED: dict[str, Callable] = {}
_NUMBA: Any = None


def _numba() -> Any:
    global _NUMBA
    if _NUMBA is None:
        try:
            import numba

            _NUMBA = numba
        except Exception:  # noqa: BLE001 - not installed, or broken: the Python kernels run
            _NUMBA = False
    return _NUMBA


def kernel(fn: Callable, edges: int) -> Callable:
    """``fn`` compiled by numba for graphs with more than :data:`JIT_EDGES` edges, or for any
    graph once compiled in this process (NOTE [kernels])."""
    if fn.__name__ in _COMPILED:  # compiled earlier in this process: free to reuse
        return _COMPILED[fn.__name__]
    if edges <= JIT_EDGES or not _numba():
        return fn
    if fn.__name__ not in _COMPILED:
        numba = _numba()
        for helper in _HELPERS:  # kernels call these: compiled first, found as globals
            if helper.__name__ not in _COMPILED:
                _COMPILED[helper.__name__] = numba.njit(cache=True, nogil=True)(helper)
                globals()[helper.__name__] = _COMPILED[helper.__name__]
        _COMPILED[fn.__name__] = numba.njit(cache=True, nogil=True)(fn)
    return _COMPILED[fn.__name__]


# -- orderings ---------------------------------------------------------------------------


def bucket_order(indptr, indices, mode):  # noqa: C901 - one bucket queue, three rules
    """A vertex order by a degree-based rule, with a bucket queue (``O(|E|)``).

    ``mode`` 0, *smallest last* (Matula & Beck 1983): repeatedly remove a vertex of
    smallest degree in the remaining graph; the order is the reverse of removal.
    ``mode`` 1, *dynamic largest first*: repeatedly take a vertex of largest degree in
    the graph of the vertices not yet taken. ``mode`` 2, *incidence degree*: repeatedly
    take a vertex with the most neighbours already taken. Ties: smallest index.
    """
    n = len(indptr) - 1
    key = np.zeros(n, dtype=np.int64)
    if mode != 2:
        for v in range(n):
            key[v] = indptr[v + 1] - indptr[v]
    maxkey = 0
    maxdeg = 0
    for v in range(n):
        if key[v] > maxkey:
            maxkey = key[v]
        if indptr[v + 1] - indptr[v] > maxdeg:
            maxdeg = indptr[v + 1] - indptr[v]
    head = -np.ones(maxdeg + 2, dtype=np.int64)
    nxt = -np.ones(n, dtype=np.int64)
    prv = -np.ones(n, dtype=np.int64)
    for v in range(n - 1, -1, -1):  # push in reverse: the bucket lists run by index
        k = key[v]
        nxt[v] = head[k]
        if head[k] >= 0:
            prv[head[k]] = v
        head[k] = v
    taken = np.zeros(n, dtype=np.bool_)
    order = np.empty(n, dtype=np.int64)
    cur = 0 if mode == 0 else maxkey
    for step in range(n):
        if mode == 0:
            while head[cur] < 0:
                cur += 1
        else:
            while head[cur] < 0:
                cur -= 1
        v = head[cur]
        # unlink v
        head[cur] = nxt[v]
        if nxt[v] >= 0:
            prv[nxt[v]] = -1
        taken[v] = True
        order[step] = v
        delta = 1 if mode == 2 else -1
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            if taken[w]:
                continue
            k = key[w]
            # unlink w from bucket k
            if prv[w] >= 0:
                nxt[prv[w]] = nxt[w]
            else:
                head[k] = nxt[w]
            if nxt[w] >= 0:
                prv[nxt[w]] = prv[w]
            k += delta
            key[w] = k
            # push w to the front of bucket k
            prv[w] = -1
            nxt[w] = head[k]
            if head[k] >= 0:
                prv[head[k]] = w
            head[k] = w
            if mode == 0 and k < cur:
                cur = k
            if mode == 2 and k > cur:
                cur = k
    if mode == 0:
        return order[::-1].copy()
    return order


# -- colourings ----------------------------------------------------------------------------


def greedy(indptr, indices, order):
    """Distance-1 greedy colouring in ``order``; colours ``0..K-1``."""
    n = len(indptr) - 1
    color = -np.ones(n, dtype=np.int64)
    forbidden = -np.ones(n + 1, dtype=np.int64)
    for v in order:
        for p in range(indptr[v], indptr[v + 1]):
            c = color[indices[p]]
            if c >= 0:
                forbidden[c] = v
        color[v] = _first_free(forbidden, v)
    return color


def _first_free(forbidden, v):
    """The smallest colour not forbidden for ``v`` (``forbidden[c] == v``: forbidden)."""
    c = 0
    while forbidden[c] == v:
        c += 1
    return c


def _slot(slot_col, slot_cnt, slot_hub, nslots, base, u, c):
    """Position of ``u``'s slot for colour ``c`` (opened empty when missing)."""
    for s in range(base, base + nslots[u]):
        if slot_col[s] == c:
            return s
    s = base + nslots[u]
    slot_col[s] = c
    slot_cnt[s] = 0
    slot_hub[s] = False
    nslots[u] += 1
    return s


def _root(parent, e):
    """The representative of edge ``e``'s set (path halving)."""
    while parent[e] != e:
        parent[e] = parent[parent[e]]
        e = parent[e]
    return e


def acyclic(indptr, indices, twin, order, palette):  # noqa: C901 - the algorithm in one piece
    """Greedy acyclic colouring in ``order`` (Gebremedhin, Tarafdar, Manne & Pothen 2007).

    A distance-1 colouring in which every cycle uses at least three colours, so the
    subgraph of any two colours is a forest. Two-coloured trees are kept as disjoint
    sets of edges (an edge is the CSR position ``min(p, twin[p])``; union by size, path
    halving). A vertex ``v`` may not take colour ``c`` when two of its neighbours lie in
    one tree of colours ``{c, colour(w)}``: that would close a two-coloured cycle. Each
    vertex keeps one slot per distinct colour among its coloured neighbours (the colour
    and one edge of that tree), so a dense row costs its length times the colours, not
    its square.

    ``palette == 0``: each vertex takes the smallest allowed colour (first fit).
    ``palette == K > 0``: each vertex takes, among the allowed colours below ``K``, the
    one whose two-coloured trees it would join are smallest in total (ties: the smaller
    colour), and the smallest allowed colour only when none below ``K`` is allowed. Small
    trees keep later choices open: on a 5-point stencil first fit needs 4 colours in
    every vertex order, this rule with ``K = 3`` finds 3 (NOTE [acyclic colouring]).

    Returns ``(color, tree)``: colours ``0..K-1`` and, per CSR position, the
    representative of its two-coloured tree.
    """
    n = len(indptr) - 1
    nnz = len(indices)
    color = -np.ones(n, dtype=np.int64)
    forbidden = -np.ones(n + 2, dtype=np.int64)
    scored = -np.ones(n + 2, dtype=np.int64)  # scored[c] == v: score[c] is v's
    score = np.zeros(n + 2, dtype=np.int64)
    parent = np.arange(nnz, dtype=np.int64)
    size = np.ones(nnz, dtype=np.int64)  # edges in the tree, at its representative
    first_src = -np.ones(nnz, dtype=np.int64)
    first_via = -np.ones(nnz, dtype=np.int64)
    slot_col = np.empty(nnz, dtype=np.int64)
    slot_edge = np.empty(nnz, dtype=np.int64)
    slot_cnt = np.zeros(nnz, dtype=np.int64)
    slot_hub = np.zeros(nnz, dtype=np.bool_)  # unused here; _slot keeps it
    nslots = np.zeros(n, dtype=np.int64)
    for v in order:
        for p in range(indptr[v], indptr[v + 1]):
            c = color[indices[p]]
            if c >= 0:
                forbidden[c] = v
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            if color[w] < 0:
                continue
            base = indptr[w]
            for s in range(base, base + nslots[w]):
                c = slot_col[s]
                if forbidden[c] == v:
                    continue
                e = _root(parent, slot_edge[s])
                if palette > 0:
                    if scored[c] != v:
                        scored[c] = v
                        score[c] = 0
                    score[c] += size[e]
                if first_src[e] != v:
                    first_src[e] = v
                    first_via[e] = w
                elif first_via[e] != w:
                    forbidden[c] = v
        cv = -1
        least = 0
        for c in range(palette):
            if forbidden[c] == v:
                continue
            sc = score[c] if scored[c] == v else 0
            if cv < 0 or sc < least:
                cv = c
                least = sc
        if cv < 0:
            cv = _first_free(forbidden, v)
        color[v] = cv
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            cw = color[w]
            if cw < 0:
                continue
            e = p if p < twin[p] else twin[p]
            # the edge joins w's tree of colours {cw, cv} and v's tree of {cv, cw}
            # (one tree: edges of two colours sharing a vertex); each vertex keeps one
            # slot per colour pair, opened by its first such edge
            for side in range(2):
                u = w if side == 0 else v
                other = cv if side == 0 else cw
                found = _slot(slot_col, slot_cnt, slot_hub, nslots, indptr[u], u, other)
                slot_cnt[found] += 1
                if slot_cnt[found] == 1:  # opened by this edge
                    slot_edge[found] = e
                    continue
                a = _root(parent, e)
                b = _root(parent, slot_edge[found])
                if a != b:
                    if size[a] > size[b]:
                        a, b = b, a
                    parent[a] = b
                    size[b] += size[a]
    tree = np.empty(nnz, dtype=np.int64)
    for p in range(nnz):
        tree[p] = _root(parent, p if p < twin[p] else twin[p])
    return color, tree


# -- substitution: the trees of an acyclic colouring in preorder -----------------------------


def tree_pairs(indices, tree, out):
    """``out[p] = (indices[p], tree[p])``: a position's neighbour and tree side by side, so
    a traversal reads one cache line per position instead of two (NOTE [forest order])."""
    for p in range(len(indices)):
        out[p, 0] = indices[p]
        out[p, 1] = tree[p]
    return out


def forest_preorder(indptr, pairs, colors, s_indptr, s_indices):  # noqa: C901 - one traversal
    """Every two-coloured tree, depth first: the plan of substitution (NOTE [substitution]).

    ``pairs`` (:func:`tree_pairs`) holds per CSR position of the adjacency graph its
    neighbour and its tree (overwritten: a visited position's tree becomes
    ``-1 - k``, ``k`` its edge's visit); ``s_indptr``, ``s_indices`` are the symmetrised pattern (the
    same graph with its diagonal entries). Per visit of a non-root vertex, in preorder
    over all trees (roots: each tree's smallest vertex; children in column order):
    ``src`` its flat index ``colour(parent) * n + vertex`` into ``B``, ``sign``
    ``(-1)^depth``, ``end`` one past the last visit of its subtree, ``vertex``,
    ``parent``; and per entry of the symmetrised pattern (CSR order) ``gather``: its
    index into ``cat([diagonal, edge values])`` (edge ``k``, the edge of visit ``k``, is
    ``n + k``). Visits are ``nnz / 2`` exactly when the trees are forests.

    # NOTE [forest order]
    A depth-first walk of trees spread over a large graph is bound by memory latency:
    each step lands on a new row. So the walk reads one array per row (``pairs``) and
    needs no per-position marks: within one tree the only neighbour already visited is
    the parent, and a tree is started at the first position (in CSR order) of its
    smallest vertex. The reverse position of each tree edge is the parent's, met while
    scanning the child's row, so no reverse index is read either; the edge's number is
    written over the position's tree (no per-edge array: fresh memory costs page
    faults). Cost ``O(|E| t)``, ``t`` the trees per vertex (at most the colours), each
    scan sequential in one row.
    """
    n = len(indptr) - 1
    nnz = len(pairs)
    started = np.zeros(nnz, dtype=np.bool_)  # per tree, by its representative position
    entered = -np.ones(n, dtype=np.int64)  # the last tree a vertex was entered in
    m = nnz // 2 + 1
    out_src = np.empty(m, dtype=np.int64)
    out_sign = np.empty(m, dtype=np.float64)
    out_end = np.empty(m, dtype=np.int64)
    out_v = np.empty(m, dtype=np.int64)
    out_p = np.empty(m, dtype=np.int64)
    stack_v = np.empty(n + 1, dtype=np.int64)
    stack_pos = np.empty(n + 1, dtype=np.int64)
    stack_slot = np.empty(n + 1, dtype=np.int64)
    count = 0
    for r in range(n):
        for q in range(indptr[r], indptr[r + 1]):
            t = pairs[q, 1]
            if t < 0 or started[t]:  # visited, or in a tree walked before
                continue
            started[t] = True
            entered[r] = t
            top = 0
            stack_v[0] = r
            stack_pos[0] = q
            stack_slot[0] = -1
            while top >= 0:
                v = stack_v[top]
                up = stack_v[top - 1] if top > 0 else -1
                p = stack_pos[top]
                stop = indptr[v + 1]
                while p < stop:
                    if pairs[p, 1] == t:
                        if pairs[p, 0] != up:
                            break
                        pairs[p, 1] = -1 - stack_slot[top]  # the edge to the parent
                    p += 1
                if p < stop:
                    w = pairs[p, 0]
                    # a vertex entered twice in one walk closes a cycle
                    assert entered[w] != t, "substitution: a two-coloured cycle"
                    entered[w] = t
                    stack_pos[top] = p + 1
                    pairs[p, 1] = -1 - count
                    out_src[count] = colors[v] * n + w
                    out_sign[count] = 1.0 if top % 2 == 1 else -1.0
                    out_v[count] = w
                    out_p[count] = v
                    top += 1
                    stack_v[top] = w
                    stack_pos[top] = indptr[w]
                    stack_slot[top] = count
                    count += 1
                else:
                    if stack_slot[top] >= 0:
                        out_end[stack_slot[top]] = count
                    top -= 1
    gather = np.empty(len(s_indices), dtype=np.int64)
    a = 0
    for i in range(n):
        for k in range(s_indptr[i], s_indptr[i + 1]):
            if s_indices[k] == i:
                gather[k] = i
            else:
                gather[k] = n - 1 - pairs[a, 1]
                a += 1
    assert a == nnz, "substitution: adjacency and pattern disagree"
    return (
        out_src[:count],
        out_sign[:count],
        out_end[:count],
        out_v[:count],
        out_p[:count],
        gather,
    )


def twin_positions(indptr, indices):
    """For each CSR position of a symmetric graph (sorted rows, no self loops), the
    position of the reverse entry: ``O(|E|)``, rows visited in order."""
    n = len(indptr) - 1
    ptr = indptr[:-1].copy()
    twin = np.empty(len(indices), dtype=np.int64)
    for v in range(n):
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            if w > v:
                q = ptr[w]  # the next entry of row w below its diagonal is (w, v)
                twin[p] = q
                twin[q] = p
                ptr[w] = q + 1
    return twin


def star(indptr, indices, order, side=None, seeded=None, limit=0):  # noqa: C901 - the algorithm
    """Greedy star colouring in ``order``: distance-1, and no path on four vertices uses
    only two colours (every two-coloured component is a star).

    Colouring ``v`` with ``c`` makes a two-coloured path on four vertices exactly when,
    for a coloured neighbour ``w`` of ``v`` and a neighbour ``x`` of ``w`` of colour ``c``,
    either ``v`` has another neighbour of ``w``'s colour, or ``x`` has (``x`` is the hub
    of a star with leaf ``w``) (Coleman & Moré 1984; Gebremedhin, Tarafdar, Manne &
    Pothen 2007). Each vertex keeps one slot per colour among its coloured neighbours:
    how many there are and whether they are hubs towards it, so a dense row costs its
    length times the colours, not its square.

    Bicolouring (NOTE [bicolouring]): vertices of different ``side`` draw from separate
    palettes (colour numbers may repeat across sides; adjacent vertices of different
    sides need not differ); vertices not ``seeded`` are neutral: never coloured (colour
    ``-1``, absent from ``order``) and never counted on a path, but their neighbours
    must differ. Every edge joins one side to itself (all of one side) or to the other
    (a bipartite graph), so the colours around a vertex come from one palette. One side,
    all seeded (the default): the plain star colouring.

    ``limit > 0``: stop at the first vertex that needs colour ``limit`` (the colours of
    the vertices before it in ``order`` are those of the full run: greedy never looks
    ahead), leaving the rest ``-1``.

    Returns colours ``0..K-1`` per side, ``-1`` for neutral vertices.
    """
    n = len(indptr) - 1
    nnz = len(indices)
    if side is None:
        side = np.zeros(n, dtype=np.int64)
    if seeded is None:
        seeded = np.ones(n, dtype=np.bool_)
    color = -np.ones(n, dtype=np.int64)
    forbidden = -np.ones(n + 2, dtype=np.int64)
    slot_col = np.empty(nnz, dtype=np.int64)
    slot_cnt = np.zeros(nnz, dtype=np.int64)
    slot_hub = np.zeros(nnz, dtype=np.bool_)
    nslots = np.zeros(n, dtype=np.int64)
    for v in order:
        bv = indptr[v]
        for p in range(indptr[v], indptr[v + 1]):
            u = indices[p]
            if not seeded[u]:  # a neutral neighbour: its entries are read from v's product
                for q in range(indptr[u], indptr[u + 1]):
                    c = color[indices[q]]
                    if c >= 0:
                        forbidden[c] = v
                continue
            c = color[u]
            if c >= 0:
                if side[u] == side[v]:
                    forbidden[c] = v
                s = _slot(slot_col, slot_cnt, slot_hub, nslots, bv, v, c)
                slot_cnt[s] += 1
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            cw = color[w]
            if cw < 0:
                continue
            several = slot_cnt[_slot(slot_col, slot_cnt, slot_hub, nslots, bv, v, cw)] >= 2
            for s in range(indptr[w], indptr[w] + nslots[w]):
                c = slot_col[s]
                if forbidden[c] != v and (several or slot_hub[s]):
                    forbidden[c] = v
        cv = _first_free(forbidden, v)
        color[v] = cv
        if limit > 0 and cv >= limit:
            break
        for p in range(indptr[v], indptr[v + 1]):
            w = indices[p]
            cw = color[w]
            if cw < 0 or w == v:
                continue
            sw = _slot(slot_col, slot_cnt, slot_hub, nslots, indptr[w], w, cv)
            slot_cnt[sw] += 1
            sv = _slot(slot_col, slot_cnt, slot_hub, nslots, bv, v, cw)
            if slot_cnt[sv] >= 2:  # v is a hub in colours {cv, cw}
                slot_hub[sw] = True
            if slot_cnt[sw] >= 2:  # w is a hub in colours {cw, cv}
                slot_hub[sv] = True
                if slot_cnt[sw] == 2:  # w just became one: tell its other cv-neighbour
                    for q in range(indptr[w], indptr[w + 1]):
                        u = indices[q]
                        if u != v and color[u] == cv:
                            su = _slot(slot_col, slot_cnt, slot_hub, nslots, indptr[u], u, cw)
                            slot_hub[su] = True
    return color


#: Functions that kernels call (compiled before the kernels that use them).
_HELPERS = (_slot, _first_free, _root)
