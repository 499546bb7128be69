"""Graph colouring for compressed Hessians and Jacobians.

# NOTE [colouring]
A colouring groups the columns of a sparse matrix so that one product with the
sum of each group's basis vectors (a *seed*) yields entries of that group.

* Full Hessian, substitution: an *acyclic colouring* (NOTE [acyclic colouring]).
* Full Hessian, direct recovery: a *star colouring* of the adjacency graph of
  ``H`` (distance-1 colouring in which every path on four vertices uses at least
  three colours). Then for every nonzero ``H_ij`` either ``j`` is the only
  neighbour of ``i`` with its colour, so ``H_ij = (H s_{c(j)})_i``, or the same
  holds with ``i`` and ``j`` swapped (Coleman & Moré 1984; Gebremedhin, Manne &
  Pothen 2005).
* Diagonal alone: a distance-1 colouring of the adjacency graph: if no two
  vertices of one colour are adjacent, ``H_ii = (H s_{c(i)})_i``.
* Jacobian, direct recovery: a distance-1 colouring of the column-intersection
  graph (columns in one group share no row), Curtis, Powell & Reid (1974); the same
  for rows (VJPs); or a star bicolouring of columns and rows together
  (NOTE [bicolouring]).

Every colouring is greedy, run by the sequential kernels of
:mod:`hesse.sparsity._kernels` (NOTE [kernels]) in several vertex orders
(:data:`ORDERS`: natural, largest first, smallest last, incidence degree, dynamic
largest first); the colouring with the fewest colours is kept, stopping at a cheap
lower bound or when the time budget is spent (NOTE [colouring budget]). Distance-1
colourings then run Culberson's iterated greedy (colour classes recoloured in reverse
order, which never adds a colour). Each kernel costs ``O(|E| K)`` for ``K`` colours.

References:
    Curtis, A. R., Powell, M. J. D. & Reid, J. K. (1974). On the estimation of sparse
    Jacobian matrices. IMA J. Appl. Math. 13.
    Coleman, T. F. & Moré, J. J. (1984). Estimation of sparse Hessian matrices and graph
    coloring problems. Math. Programming 28.
    Matula, D. W. & Beck, L. L. (1983). Smallest-last ordering and clustering and graph
    coloring algorithms. J. ACM 30(3).
    Gebremedhin, A. H., Manne, F. & Pothen, A. (2005). What color is your Jacobian? Graph
    coloring for computing derivatives. SIAM Review 47(4).
    Gebremedhin, A. H., Tarafdar, A., Manne, F. & Pothen, A. (2007). New acyclic and
    star coloring algorithms with application to computing Hessians. SIAM J. Sci.
    Comput. 29(3).
    Culberson, J. C. (1992). Iterated greedy graph coloring and the difficulty landscape.
    Tech. Rep. TR 92-07, University of Alberta.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph  # noqa: F401 - sp.csgraph

from hesse.sparsity import _kernels as K

#: Vertex orders tried by every colouring, in this order (NOTE [colouring]).
ORDERS = ("natural", "largest_first", "smallest_last", "incidence_degree", "dynamic_largest_first")

#: After the first attempt (NOTE [colouring budget]), further attempts run while the time
#: spent stays under ``ORDER_BUDGET_FLOOR_S + (1 + ORDER_BUDGET_RATIO) t_first``.
ORDER_BUDGET_RATIO = 1.0
ORDER_BUDGET_FLOOR_S = 0.005

#: Passes of Culberson's iterated greedy after a distance-1 colouring.
ITERATED_PASSES = 4


@dataclass(frozen=True)
class Coloring:
    """Colours ``0 .. num_colors - 1`` of the columns of a sparse matrix; colour
    ``num_colors`` is neutral: in no seed (NOTE [neutral colours])."""

    colors: np.ndarray
    num_colors: int
    kind: str
    #: acyclic colourings: per CSR position of the adjacency graph, its two-coloured tree
    trees: np.ndarray | None = None

    def seeds(self) -> sp.csr_matrix:
        """``(num_colors, n)`` boolean matrix: row ``c`` is the seed of colour ``c``."""
        n = len(self.colors)
        seeded = np.flatnonzero(self.colors < self.num_colors)
        return sp.csr_matrix(
            (np.ones(len(seeded), dtype=bool), (self.colors[seeded], seeded)),
            shape=(self.num_colors, n),
        )


def derived(pattern: sp.spmatrix, name: str, make: Callable[[], Any]) -> Any:
    r"""``make()``, kept on ``pattern`` (a scipy matrix) under ``name``.

    # NOTE [derived graphs]
    A one-shot sparse Hessian colours a pattern (acyclic, a star probe), plans its
    recovery and keys its caches on it; each step needs the same symmetrised pattern,
    adjacency graph, reverse positions and content hash. They are made once per pattern
    object and kept on it, stamped with the identity of its index arrays and its size:
    the pipeline never changes a pattern in place after it is built (a new pattern is a
    new object), and an object whose arrays were replaced is derived again. A pattern
    kept in a cache after its call (NOTE [pattern cache]) is :func:`release`\ d to its
    hash, so the cache holds no more memory than the patterns themselves.
    """
    stamp = _stamp(pattern)
    memo = pattern.__dict__.setdefault("_hesse_derived", {})
    if name not in memo or memo[name][0] != stamp:
        memo[name] = (stamp, make())
    return memo[name][1]


def _stamp(pattern: sp.spmatrix) -> tuple[int, int, int]:
    return (id(pattern.indptr), id(pattern.indices), pattern.nnz)


def release(pattern: sp.spmatrix, keep: tuple[str, ...] = ()) -> None:
    """Drops what :func:`derived` kept on ``pattern``, except the names in ``keep``: a
    pattern held in a cache keeps its hash, not its graphs (NOTE [derived graphs])."""
    memo = pattern.__dict__.get("_hesse_derived", {})
    for name in [name for name in memo if name not in keep]:
        del memo[name]


def symmetric(pattern: sp.spmatrix) -> sp.csr_matrix:
    """``pattern + pattern.T`` as a boolean CSR matrix, canonical (NOTE [derived graphs])."""

    def make() -> sp.csr_matrix:
        P = sp.csr_matrix(pattern, dtype=bool)
        T = P.T.tocsr()  # sorted indices
        if (
            P.has_canonical_format
            and np.array_equal(P.indptr, T.indptr)
            and np.array_equal(P.indices, T.indices)
            and P.data.all()
        ):  # a symmetric pattern (as detected Hessian patterns are): P itself, no sum
            S = sp.csr_matrix((P.data, P.indices, P.indptr), shape=P.shape)
        else:
            S = (P + T).tocsr()
            S.sum_duplicates()
            S.sort_indices()
        S.__dict__["_hesse_symmetric"] = _stamp(S)  # already symmetric: not made again
        return S

    if not sp.issparse(pattern):
        return make()
    if pattern.__dict__.get("_hesse_symmetric") == _stamp(pattern):
        return pattern
    return derived(pattern, "symmetric", make)


def adjacency(pattern: sp.spmatrix) -> sp.csr_matrix:
    """The symmetric boolean adjacency (no self loops) of a square pattern
    (NOTE [derived graphs])."""

    def make() -> sp.csr_matrix:
        A = symmetric(pattern).copy()
        A.setdiag(False)
        A.eliminate_zeros()
        A.sort_indices()
        return A

    return derived(pattern, "adjacency", make) if sp.issparse(pattern) else make()


def _edges(A: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(A.shape[0], dtype=np.int64), np.diff(A.indptr))
    return rows, A.indices.astype(np.int64)


def _tally(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``values`` (all in ``[0, size)``) and how often each occurs."""
    if len(values) * 8 > size:
        counts = np.bincount(values, minlength=size)
        uniq = np.flatnonzero(counts)
        return uniq, counts[uniq]
    s = np.sort(values)
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(first)
    return s[starts], np.diff(np.append(starts, len(s)))


def _lower_bound(A: sp.csr_matrix, star: bool) -> int:
    """A cheap lower bound on the colours: 1, 2 with an edge, 3 for a star colouring of a
    graph with a path on four vertices, and the size of the closed neighbourhood of a
    top-degree vertex when that is a clique."""
    if A.nnz == 0:
        return 1
    deg = np.diff(A.indptr)
    bound = 2
    if star and _joins_two_hubs(A, deg):
        bound = 3
    v = int(np.argmax(deg))
    nb = np.append(A.indices[A.indptr[v] : A.indptr[v + 1]], v)
    k = len(nb)
    if A[nb][:, nb].nnz == k * (k - 1):
        bound = max(bound, k)
    return bound


def _joins_two_hubs(A: sp.csr_matrix, deg: np.ndarray) -> bool:
    """Whether an edge joins two vertices of degree >= 2 (then a path on four vertices
    exists), from the degrees in ``O(n)``: with ``E_k`` the edges with ``k`` such ends,
    their degrees sum to ``E_1 + 2 E_2``, so ``E_2`` is that sum less ``E - E_0``, and
    ``E_0`` counts the edges between two leaves."""
    leaves = np.flatnonzero(deg == 1)
    e0 = int(np.count_nonzero(deg[A.indices[A.indptr[leaves]]] == 1)) // 2
    e2 = int(deg[deg >= 2].sum()) - (A.nnz // 2 - e0)
    return e2 > 0


def int64_graph(A: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``A``'s index arrays as int64, the kernels' type (once per graph)."""
    return derived(A, "int64", lambda: (A.indptr.astype(np.int64), A.indices.astype(np.int64)))


def _best_of(attempts, bound: int, always: int = 1):
    """Runs ``attempt(k)`` -> ``(colors, extra)`` for each of ``attempts`` (``k``: the fewest
    colours so far, ``None`` at first) and keeps the colouring with the fewest colours.

    # NOTE [colouring budget]
    The first ``always`` attempts run while the colours are above ``bound`` (a proven
    lower bound); a later one only if, judged by the last attempt's time, it would end
    within ``ORDER_BUDGET_FLOOR_S + (1 + ORDER_BUDGET_RATIO) t_first``: small graphs
    try every attempt, large ones at most about ``1 + ORDER_BUDGET_RATIO`` greedy passes
    (a one-shot colouring stays within a small multiple of one pass, ``O(|E| K)``).
    """
    best = None
    start = time.perf_counter()
    budget = last = 0.0
    for i, attempt in enumerate(attempts):
        if best is not None:
            spent = time.perf_counter() - start
            if best[0].max() + 1 <= bound or (i >= always and spent + last > budget):
                break
        began = time.perf_counter()
        got = attempt(None if best is None else int(best[0].max()) + 1)
        last = time.perf_counter() - began
        if best is None:
            budget = ORDER_BUDGET_FLOOR_S + (1 + ORDER_BUDGET_RATIO) * last
        if best is None or got[0].max() < best[0].max():
            best = got
    assert best is not None
    return best


def _in_orders(A: sp.csr_matrix, run, orders: tuple[str, ...]):
    """One attempt per vertex order: ``run(order)`` -> ``(colors, extra)``."""
    return [lambda k, name=name: run(vertex_order(A, name)) for name in orders]


def _distance1(A: sp.csr_matrix, kind: str, orders: tuple[str, ...] = ORDERS) -> Coloring:
    n = A.shape[0]
    if n == 0:
        return Coloring(np.zeros(0, dtype=np.int64), 0, kind)
    indptr, indices = int64_graph(A)
    greedy = K.kernel(K.greedy, A.nnz)
    colors, _ = _best_of(
        _in_orders(A, lambda order: (greedy(indptr, indices, order), None), orders),
        _lower_bound(A, False),
    )
    for _ in range(ITERATED_PASSES):  # Culberson: classes in reverse order
        order = np.argsort(-colors, kind="stable").astype(np.int64)
        again = greedy(indptr, indices, order)
        if again.max() >= colors.max():
            break
        colors = again
    return Coloring(colors, int(colors.max()) + 1, kind)


def diagonal_coloring(pattern: sp.spmatrix) -> Coloring:
    """Distance-1 colouring of the adjacency graph of ``pattern``: recovers the diagonal."""
    return _distance1(adjacency(pattern), "diagonal")


def column_coloring(J: sp.spmatrix) -> Coloring:
    """Columns of ``J`` in one group share no row (Curtis-Powell-Reid): recovers all of ``J``."""
    J = sp.csr_matrix(J, dtype=bool)
    return _distance1(adjacency((J.T @ J).tocsr()), "column")


def row_coloring(J: sp.spmatrix) -> Coloring:
    """Rows of ``J`` in one group share no column: recovers ``J`` from products ``s^T J``."""
    J = sp.csr_matrix(J, dtype=bool)
    return _distance1(adjacency((J @ J.T).tocsr()), "row")


# -- bidirectional colouring of a Jacobian ----------------------------------------------------


@dataclass(frozen=True)
class Bicoloring:
    """Which products recover a Jacobian ``J`` (``m x n``) and where each entry is read.

    ``column`` colours the columns (one JVP per colour, the seed the sum of its members),
    ``row`` the rows (one VJP per colour); each side's colour ``num_colors`` is neutral:
    in no seed. ``from_column[e]`` says whether stored entry ``e`` of ``J`` (CSR order) is
    read from the JVP of its column's colour (else from the VJP of its row's colour).
    A one-sided colouring is the case where the other side is all neutral.
    """

    column: Coloring
    row: Coloring
    from_column: np.ndarray
    kind: str

    @property
    def products(self) -> int:
        """``K_col + K_row``: JVPs plus VJPs."""
        return self.column.num_colors + self.row.num_colors


def one_sided(J: sp.csr_matrix, side: str) -> Bicoloring:
    """The column (Curtis-Powell-Reid, JVPs) or row (VJPs) colouring of ``J`` as a
    :class:`Bicoloring` whose other side is all neutral."""
    J = sp.csr_matrix(J, dtype=bool)
    m, n = J.shape
    if J.nnz == 0:  # nothing to read: no product
        none = np.zeros(J.nnz, dtype=bool)
        return Bicoloring(
            Coloring(np.zeros(n, dtype=np.int64), 0, "column"),
            Coloring(np.zeros(m, dtype=np.int64), 0, "row"),
            none,
            side,
        )
    # a full row (column) needs every column (row) in its own colour: no graph is built
    # (an arrowhead's column-intersection graph is complete)
    if side == "column":
        full = J.getnnz(axis=1).max() == n
        c = Coloring(np.arange(n), n, "column") if full else column_coloring(J)
        return Bicoloring(
            c, Coloring(np.zeros(m, dtype=np.int64), 0, "row"), np.ones(J.nnz, dtype=bool), "column"
        )
    full = J.getnnz(axis=0).max() == m
    r = Coloring(np.arange(m), m, "row") if full else row_coloring(J)
    return Bicoloring(
        Coloring(np.zeros(n, dtype=np.int64), 0, "column"), r, np.zeros(J.nnz, dtype=bool), "row"
    )


def _cover(B: sp.csr_matrix) -> np.ndarray:
    """A vertex cover of the bipartite graph ``B`` (symmetric, columns then rows): greedy,
    repeatedly the vertex of largest degree among the edges not yet covered (the vertices
    taken by the dynamic-largest-first order while they still have an uncovered edge)."""
    order = vertex_order(B, "dynamic_largest_first")
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    r, c = _edges(B)
    cover = np.zeros(B.shape[0], dtype=bool)
    cover[r[pos[c] > pos[r]]] = True
    return cover


def _bicolor_cover(
    J: sp.csr_matrix, B: sp.csr_matrix, cover: np.ndarray, order: np.ndarray
) -> Bicoloring:
    """The greedy star bicolouring of ``J`` (bipartite graph ``B``, columns then rows)
    whose seeded vertices are ``cover``, in ``order`` (NOTE [bicolouring])."""
    m, n = J.shape
    side = np.repeat(np.array([0, 1], dtype=np.int64), [n, m])
    run = K.kernel(K.star, B.nnz)
    colors = run(*int64_graph(B), order[cover[order]], side, cover)
    on_col, on_row = cover[:n], cover[n:]
    k = int(colors.max()) + 1 if len(colors) else 1
    cc = np.where(on_col, colors[:n], k)  # k: neutral in the counts below
    rc = np.where(on_row, colors[n:], k)
    coo = J.tocoo()  # CSR order: J is canonical
    i, j = coo.row.astype(np.int64), coo.col.astype(np.int64)
    # an entry is readable from its column's JVP when no other seeded column of its row
    # has that colour, from its row's VJP when no other seeded row of its column has it
    per_row = np.bincount(i * (k + 1) + cc[j], minlength=m * (k + 1))
    per_col = np.bincount(j * (k + 1) + rc[i], minlength=n * (k + 1))
    jvp_ok = on_col[j] & (per_row[i * (k + 1) + cc[j]] == 1)
    vjp_ok = on_row[i] & (per_col[j * (k + 1) + rc[i]] == 1)
    assert (jvp_ok | vjp_ok).all(), "bicolouring: an entry is readable from no product"
    used_c = np.zeros(k + 1, dtype=bool)
    used_r = np.zeros(k + 1, dtype=bool)
    used_c[cc[j[~vjp_ok]]] = True  # entries with one source force its product
    used_r[rc[i[~jvp_ok]]] = True
    while True:  # the others: take the product that serves most of those left
        left = ~((jvp_ok & used_c[cc[j]]) | (vjp_ok & used_r[rc[i]]))
        if not left.any():
            break
        by_c = np.bincount(cc[j[left & jvp_ok]], minlength=k + 1)
        by_r = np.bincount(rc[i[left & vjp_ok]], minlength=k + 1)
        if by_c.max() >= by_r.max():  # a tie: the JVP
            used_c[int(by_c.argmax())] = True
        else:
            used_r[int(by_r.argmax())] = True
    from_column = jvp_ok & used_c[cc[j]]
    column = _renumber(cc, used_c[:k], "column")
    row = _renumber(rc, used_r[:k], "row")
    return Bicoloring(column, row, from_column, "bidirectional")


def _renumber(colors: np.ndarray, used: np.ndarray, kind: str) -> Coloring:
    """Used colours to ``0..K-1``, the rest (and neutral ones) to ``K`` (NOTE [neutral colours])."""
    K = int(used.sum())
    new = np.full(len(used) + 1, K, dtype=np.int64)
    new[: len(used)][used] = np.arange(K)
    return Coloring(new[colors], K, kind)


def bicoloring(J: sp.spmatrix, orders: tuple[str, ...] = ORDERS) -> Bicoloring:
    """A star bicolouring of ``J``: ``K_col`` JVPs and ``K_row`` VJPs recover every entry,
    each read from one product.

    # NOTE [bicolouring]
    With column colours (JVP seeds) and row colours (VJP seeds), each possibly *neutral*
    (in no seed), entry ``J_ij`` is read from the JVP of ``j``'s colour at row ``i`` when
    no other seeded column of row ``i`` shares that colour, or from the VJP of ``i``'s
    colour at column ``j`` when no other seeded row of column ``j`` shares it. Such a
    colouring is a star colouring of the augmented symmetric matrix
    ``[[0, J^T], [J, 0]]`` in which neutral vertices impose only that their neighbours
    differ (Coleman & Verma 1998; Gebremedhin, Manne & Pothen 2005, star bicolouring;
    Montoison, Dalle & Gebremedhin 2025, neutral colour): on a two-coloured path
    ``k - i - j - l`` (columns ``k, j``, rows ``i, l``) neither read of ``J_ij`` works.
    The seeded vertices form a vertex cover of the bipartite graph of ``J`` (an entry
    between two neutral vertices is read from nothing). Here: the greedy cover by
    largest remaining degree (dense rows and columns are seeded: their entries come
    from one product each), with two tie-breaking sides (columns first, rows first);
    the graph of the seeded vertices plus a clique on the neighbours of each neutral
    one is star coloured (best of ``orders``); then each entry picks one source, the
    forced ones first and the rest greedily by the product serving most of them; a
    colour class read from by no entry becomes neutral. The cover and order with the
    fewest products is kept. An arrowhead (dense first row and column and a diagonal)
    takes 3 products where either one-sided colouring takes ``n``.

    References:
        Coleman, T. F. & Verma, A. (1998). The efficient computation of sparse Jacobian
        matrices using automatic differentiation. SIAM J. Sci. Comput. 19(4).
        Gebremedhin, A. H., Manne, F. & Pothen, A. (2005). What color is your Jacobian?
        Graph coloring for computing derivatives. SIAM Review 47(4).
        Montoison, A., Dalle, G. & Gebremedhin, A. (2025). Revisiting sparse matrix
        coloring and bicoloring. arXiv:2505.07308.
    """
    J = sp.csr_matrix(J, dtype=bool)
    J.sum_duplicates()
    J.sort_indices()
    m, n = J.shape
    if J.nnz == 0:
        return one_sided(J, "column")
    B = sp.bmat([[None, J.T], [J, None]], format="csr")
    B.sort_indices()
    perm = np.concatenate([np.arange(n, n + m), np.arange(n)])  # rows first
    back = np.argsort(perm)
    covers = (_cover(B), _cover(B[perm][:, perm].tocsr())[back])

    def attempt(order: np.ndarray) -> tuple[np.ndarray, Bicoloring]:
        found = [_bicolor_cover(J, B, cover, order) for cover in covers]
        best = min(found, key=lambda b: b.products)  # a tie: columns first
        # _best_of keeps the fewest colours: scored here by products (K_col + K_row)
        return np.array([best.products - 1]), best

    return _best_of(_in_orders(B, attempt, orders), 1)[1]


def star_coloring(pattern: sp.spmatrix, orders: tuple[str, ...] = ORDERS) -> Coloring:
    """Greedy star colouring of the adjacency graph of a symmetric ``pattern``
    (:func:`hesse.sparsity._kernels.star`, best of ``orders``)."""
    A = adjacency(pattern)
    if A.shape[0] == 0:
        return Coloring(np.zeros(0, dtype=np.int64), 0, "star")
    indptr, indices = int64_graph(A)
    run = K.kernel(K.star, A.nnz)
    colors, _ = _best_of(
        _in_orders(A, lambda order: (run(indptr, indices, order), None), orders),
        _lower_bound(A, True),
    )
    return Coloring(colors, int(colors.max()) + 1, "star")


def star_probe(pattern: sp.spmatrix, limit: int) -> int:
    """The colours of the greedy star colouring in natural order (the first of
    :data:`ORDERS`), or ``limit + 1`` when it needs more than ``limit``: found at the
    first vertex that does (a vertex's colour depends only on those before it), which
    on bands and stencils against an acyclic count is within the first few vertices."""
    A = adjacency(pattern)
    if A.shape[0] == 0:
        return 0
    indptr, indices = int64_graph(A)
    order = np.arange(A.shape[0], dtype=np.int64)
    colors = K.kernel(K.star, A.nnz)(indptr, indices, order, None, None, limit)
    return min(int(colors.max()) + 1, limit + 1)


# -- recovery -----------------------------------------------------------------------------


def _colour_counter(A: sp.csr_matrix, colors: np.ndarray, k: int):
    """``count(v, c)``: how many neighbours of ``v`` have colour ``c`` (vectorised)."""
    n = A.shape[0]
    r, w = _edges(A)
    keys = r * k + colors[w]
    if n * k <= 50_000_000:
        dense = np.bincount(keys, minlength=n * k)
        return lambda v, c: dense[v * k + c]
    uniq, counts = _tally(keys, n * k)

    def count(v: np.ndarray, c: np.ndarray) -> np.ndarray:
        key = v * k + c
        at = np.minimum(np.searchsorted(uniq, key), max(len(uniq) - 1, 0))
        if not len(uniq):
            return np.zeros(len(key), dtype=np.int64)
        return np.where(uniq[at] == key, counts[at], 0)

    return count


def star_recovery(pattern: sp.spmatrix, coloring: Coloring) -> tuple[np.ndarray, ...]:
    """Where each nonzero of ``H`` lies in the compressed products ``B = S H``.

    Returns ``(rows, cols, src_color, src_row)``: the coordinates of every stored entry
    of the symmetrised pattern (diagonal included, CSR order) and its position
    ``B[src_color, src_row]``.

    Raises:
        AssertionError: if the colouring does not allow direct recovery.
    """
    P = symmetric(pattern)
    A = adjacency(pattern)
    colors, k = coloring.colors, max(coloring.num_colors, 1)
    count = _colour_counter(A, colors, k)
    rows, cols = _edges(P)
    diag = rows == cols
    own = count(rows[diag], colors[rows[diag]])
    assert not (own > 0).any(), "colouring is not distance-1: diagonal not recoverable"
    direct = diag | (count(rows, colors[cols]) == 1)
    swapped = count(cols, colors[rows]) == 1
    assert (direct | swapped).all(), (
        "colouring does not allow direct recovery (not a star colouring)"
    )
    src_color = np.where(direct, colors[cols], colors[rows])
    src_row = np.where(direct, rows, cols)
    return rows, cols, src_color, src_row


def is_star_coloring(pattern: sp.spmatrix, colors: np.ndarray) -> bool:
    """Whether ``colors`` is a distance-1 colouring allowing direct Hessian recovery."""
    k = int(colors.max()) + 1 if len(colors) else 1
    try:
        star_recovery(pattern, Coloring(np.asarray(colors), k, "star"))
    except AssertionError:
        return False
    return True


def is_diagonal_coloring(pattern: sp.spmatrix, colors: np.ndarray) -> bool:
    """Whether no two adjacent vertices share a colour."""
    r, c = _edges(adjacency(pattern))
    return bool((colors[r] != colors[c]).all())


def is_column_coloring(J: sp.spmatrix, colors: np.ndarray) -> bool:
    """Whether no two columns of one colour share a row of ``J``."""
    J = sp.csr_matrix(J, dtype=bool).tocoo()
    key = J.row.astype(np.int64) * (int(colors.max()) + 1 if len(colors) else 1) + colors[J.col]
    return len(np.unique(key)) == len(key)


# -- orders and the acyclic colouring (substitution recovery) ---------------------------------


def twins(A: sp.csr_matrix) -> np.ndarray:
    """For each CSR position ``p`` of a symmetric ``A`` (sorted indices, no self loops),
    the position of the reverse entry."""
    return derived(A, "twins", lambda: K.kernel(K.twin_positions, A.nnz)(*int64_graph(A)))


def vertex_order(A: sp.csr_matrix, name: str) -> np.ndarray:
    """The vertices of ``A`` in the named order (NOTE [colouring])."""
    n = A.shape[0]
    if name == "natural":
        return np.arange(n, dtype=np.int64)
    if name == "largest_first":
        return np.argsort(-np.diff(A.indptr), kind="stable").astype(np.int64)
    mode = {"smallest_last": 0, "dynamic_largest_first": 1, "incidence_degree": 2}[name]
    return K.kernel(K.bucket_order, A.nnz)(*int64_graph(A), mode)


def _acyclic_bound(A: sp.csr_matrix) -> int:
    """A lower bound on acyclic colours: the distance-1 bound, and the forest bound.

    The two colour classes ``i, j`` of an acyclic colouring with ``K`` nonempty classes
    induce a forest, with at most ``n_i + n_j - 1`` edges; summed over the pairs,
    ``|E| <= (K - 1) n - K (K - 1) / 2``. The smallest such ``K`` is optimal on bands
    (``rho`` off-diagonal bands: ``floor(rho/2) + 1``) and gives 3 on a 5-point stencil.
    A graph with a cycle needs 3."""
    bound = _lower_bound(A, star=False)
    n, edges = A.shape[0], A.nnz // 2
    # a forest has fewer edges than vertices: components are counted only below that
    if edges >= n or edges > n - sp.csgraph.connected_components(A, directed=False)[0]:
        bound = max(bound, 3)  # a cycle
    k = bound
    while (k - 1) * n - k * (k - 1) // 2 < edges:
        k += 1
    return k


def acyclic_coloring(pattern: sp.spmatrix, orders: tuple[str, ...] = ORDERS) -> Coloring:
    """Greedy acyclic colouring of the adjacency graph of a symmetric ``pattern``.

    # NOTE [acyclic colouring]
    An acyclic colouring is a distance-1 colouring in which every cycle has at least
    three colours, so the subgraph induced by any two colours is a forest. It needs
    fewer colours than a star colouring (a band with ``rho`` off-diagonal bands:
    ``floor(rho/2) + 1`` against ``2 floor(rho/2) + 1``; a 5-point stencil 3 against 5)
    at the price of recovery by substitution (NOTE [substitution]). The greedy
    algorithm of Gebremedhin, Tarafdar, Manne & Pothen (2007) runs in several vertex
    orders (:data:`ORDERS`: natural, largest first, smallest last, incidence degree,
    dynamic largest first), each by first fit and by the least-merging rule of
    :func:`hesse.sparsity._kernels.acyclic` aiming at one colour fewer than the best so
    far, or at the lower bound of :func:`_acyclic_bound` when it runs first (on graphs of
    small degree, as bands and stencils: the rule reaches 3 colours on a 5-point stencil
    in one pass, where first fit needs 4 in every order); the colouring with the fewest
    colours is kept, stopping at the lower bound or when the time budget is spent
    (NOTE [colouring budget]).

    References:
        Gebremedhin, A. H., Tarafdar, A., Manne, F. & Pothen, A. (2007). New acyclic and
        star coloring algorithms with application to computing Hessians. SIAM J. Sci.
        Comput. 29(3).
        Coleman, T. F. & Cai, J.-Y. (1986). The cyclic coloring problem and estimation
        of sparse Hessian matrices. SIAM J. Algebraic Discrete Methods 7(2).
        Montoison, A., Dalle, G. & Gebremedhin, A. (2025). Revisiting sparse matrix
        coloring and bicoloring. arXiv:2505.07308.
    """
    A = adjacency(pattern)
    n = A.shape[0]
    if A.nnz == 0:
        return Coloring(np.zeros(n, dtype=np.int64), 1 if n else 0, "acyclic", trees=None)
    indptr, indices = int64_graph(A)
    twin = twins(A)
    run = K.kernel(K.acyclic, A.nnz)
    made: dict[str, np.ndarray] = {}
    bound = _acyclic_bound(A)

    def attempt(name: str, palette: bool):
        def go(k: int | None):
            if name not in made:
                made[name] = vertex_order(A, name)
            target = (k - 1 if k else bound) if palette else 0
            return run(indptr, indices, twin, made[name], target)

        return go

    # degrees at most 2 (bound - 1), as on bands and stencils, where the bound is usually
    # the optimum: the rule aimed at the bound first, often the only pass; around a
    # denser vertex it spreads the colours so that the vertex needs one more, and first
    # fit goes first; so it does on forests (bound 2), where the rule's scores only cost
    # time (a path: 30 % more than first fit, the same 2 colours)
    rule_first = 3 <= bound and int(np.diff(A.indptr).max()) <= 2 * (bound - 1)
    kinds = (True, False) if rule_first else (False, True)
    attempts = [attempt(name, palette) for name in orders for palette in kinds]
    colors, trees = _best_of(attempts, bound, always=2)
    return Coloring(colors, int(colors.max()) + 1, "acyclic", trees=trees)


def is_acyclic_coloring(pattern: sp.spmatrix, colors: np.ndarray) -> bool:
    """Whether ``colors`` is distance-1 and every two-coloured subgraph is a forest."""
    A = adjacency(pattern)
    r, c = _edges(A)
    if not (colors[r] != colors[c]).all():
        return False
    k = int(colors.max()) + 1 if len(colors) else 1
    keep = r < c
    r, c = r[keep], c[keep]
    lo, hi = np.minimum(colors[r], colors[c]), np.maximum(colors[r], colors[c])
    pair = lo * k + hi
    # nodes (vertex, colour pair): a forest has edges = nodes - components
    nodes_r = pair * len(colors) + r
    nodes_c = pair * len(colors) + c
    uniq, inv = np.unique(np.concatenate([nodes_r, nodes_c]), return_inverse=True)
    m = len(r)
    G = sp.csr_matrix((np.ones(m), (inv[:m], inv[m:])), shape=(len(uniq), len(uniq)))
    ncomp = sp.csgraph.connected_components(G, directed=False)[0]
    return m == len(uniq) - ncomp
