"""Graph colouring for compressed Hessians and Jacobians (NumPy/SciPy, near-linear time).

# NOTE [colouring]
A colouring groups the columns of a sparse matrix so that one product with the
sum of each group's basis vectors (a *seed*) yields all entries of that group.

* Full Hessian, direct recovery: a *star colouring* of the adjacency graph of
  ``H`` (distance-1 colouring in which every path on four vertices uses at least
  three colours). Then for every nonzero ``H_ij`` either ``j`` is the only
  neighbour of ``i`` with its colour, so ``H_ij = (H s_{c(j)})_i``, or the same
  holds with ``i`` and ``j`` swapped (Coleman & Moré 1984; Gebremedhin, Manne &
  Pothen 2005).
* Diagonal alone: a distance-1 colouring of the adjacency graph: if no two
  vertices of one colour are adjacent, ``H_ii = (H s_{c(i)})_i``.
* Jacobian, direct recovery: a distance-1 colouring of the column-intersection
  graph (columns in one group share no row), Curtis, Powell & Reid (1974).

All colourings are greedy in *largest-first* order, so a hub vertex
(arrowhead) is coloured first; ties are broken by index (natural order). The
greedy rules are the sequential ones; they are executed in rounds,
Jones & Plassmann (1993) style: a vertex is coloured once every vertex before it
in the order and within the rules' reach (distance 1 for distance-1 colourings,
distance 3 for star colourings) is coloured. Vertices of one round cannot see
each other, so each round is a handful of vectorised NumPy operations and the
result equals the sequential greedy colouring in that order. The star rules
(forbid, for a vertex ``v``, the colour of ``x`` on any path ``v - w - x`` with
``w`` coloured when either ``v`` or ``x`` already has another neighbour of
``w``'s colour) forbid exactly the colours that would close a two-coloured path
on four vertices whose last-coloured vertex is ``v``.

Natural order makes a chain (a path graph would need ``n`` rounds), so for
``n > SMALL`` the index range is cut into segments coloured side by side, and a
few other tie-break keys (index modulo 2, 3, 4) are tried as well; the colouring
with the fewest colours is kept, stopping early at a cheap lower bound (3 for a star
colouring of a graph with a path on four vertices, the size of a clique around a
top-degree vertex). Afterwards the highest colour class is recoloured (star) or
Culberson's iterated greedy runs (distance-1) while that removes a colour. Cost:
``O(nnz(G^3))`` work for a star colouring (``G^3``: pairs within distance 3),
``O(nnz(G))`` for distance-1, in a few hundred vectorised rounds per order.

References:
    Curtis, A. R., Powell, M. J. D. & Reid, J. K. (1974). On the estimation of sparse
    Jacobian matrices. IMA J. Appl. Math. 13.
    Coleman, T. F. & Moré, J. J. (1984). Estimation of sparse Hessian matrices and graph
    coloring problems. Math. Programming 28.
    Jones, M. T. & Plassmann, P. E. (1993). A parallel graph coloring heuristic. SIAM J. Sci.
    Comput. 14(3).
    Gebremedhin, A. H., Manne, F. & Pothen, A. (2005). What color is your Jacobian? Graph
    coloring for computing derivatives. SIAM Review 47(4).
    Culberson, J. C. (1992). Iterated greedy graph coloring and the difficulty landscape.
    Tech. Rep. TR 92-07, University of Alberta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph  # noqa: F401 - sp.csgraph


@dataclass(frozen=True)
class Coloring:
    """Colours ``0 .. num_colors - 1`` of the columns of a sparse matrix."""

    colors: np.ndarray
    num_colors: int
    kind: str
    #: acyclic colourings: per CSR position of the adjacency graph, its two-coloured tree
    trees: np.ndarray | None = None

    def seeds(self) -> sp.csr_matrix:
        """``(num_colors, n)`` boolean matrix: row ``c`` is the seed of colour ``c``."""
        n = len(self.colors)
        return sp.csr_matrix(
            (np.ones(n, dtype=bool), (self.colors, np.arange(n))), shape=(self.num_colors, n)
        )


def adjacency(pattern: sp.spmatrix) -> sp.csr_matrix:
    """The symmetric boolean adjacency (no self loops) of a square pattern."""
    A = sp.csr_matrix(pattern, dtype=bool)
    A = (A + A.T).tocsr()
    A.setdiag(False)
    A.eliminate_zeros()
    A.sort_indices()
    return A


def _edges(A: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(A.shape[0], dtype=np.int64), np.diff(A.indptr))
    return rows, A.indices.astype(np.int64)


def _expand(A: sp.csr_matrix, verts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position ``p`` in ``verts``, the pairs ``(p, neighbour of verts[p])``."""
    starts = A.indptr[verts].astype(np.int64)
    lens = A.indptr[verts + 1].astype(np.int64) - starts
    total = int(lens.sum())
    pos = np.repeat(np.arange(len(verts), dtype=np.int64), lens)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return pos, A.indices[np.repeat(starts, lens) + offs].astype(np.int64)


# Rounds of the colouring loop: up to SMALL vertices are coloured in exact natural
# order; larger graphs are cut into segments, run in natural order side by side
# (NOTE [colouring]); up to NATURAL vertices the exact natural order is one more
# candidate. Segment lengths are multiples of lcm(1..7) = 420's divisors 60, 120, 420:
# a banded graph's greedy colouring is periodic, and a segment length that is a
# multiple of the period makes the segments meet without an extra colour.
SMALL = 64
NATURAL = 256
SEGMENTS = (60, 120, 420)


def _segment(n: int) -> int:
    if n <= SMALL:
        return n
    want = 2 * math.isqrt(n)
    return next((s for s in SEGMENTS if s >= want), SEGMENTS[-1])


def _order(A: sp.csr_matrix, period: int = 0) -> np.ndarray:
    """Rank of every vertex: largest degree first, ties broken by a vertex key.

    ``period == 0``: natural order within segments (:func:`_segment`), the segments
    coloured side by side (exactly largest-first with ties by index when
    ``n <= SMALL``); ``period > 0``: ties by ``(index mod period, index)``. Both keep
    the number of rounds near the segment length.
    """
    n = A.shape[0]
    deg = np.diff(A.indptr)
    idx = np.arange(n)
    # position of each vertex among the vertices of its degree (in index order), so
    # that segments start together where a degree class starts (a band's interior)
    by_degree = np.lexsort((idx, -deg))
    sorted_deg = deg[by_degree]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_deg[1:] != sorted_deg[:-1]
    starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    pos = np.empty(n, dtype=np.int64)
    pos[by_degree] = np.arange(n) - starts
    if period:
        order = np.lexsort((idx, pos % period, -deg))
    else:
        seg = _segment(n)
        order = np.lexsort((pos // seg, pos % seg, -deg))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


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


def _rounds(C: sp.csr_matrix, rank: np.ndarray, verts: np.ndarray | None = None):
    """Yield rounds of ``verts`` (default: all): each after its ``C``-neighbours of lower rank."""
    if verts is not None:
        sub = C[verts][:, verts].tocsr()
        for S in _rounds(sub, rank[verts]):
            yield verts[S]
        return
    n = C.shape[0]
    r, c = _edges(C)
    before = rank[r] < rank[c]
    pred = np.bincount(c[before], minlength=n).astype(np.int64)
    ready = np.flatnonzero(pred == 0)
    done = 0
    while len(ready):
        yield ready
        done += len(ready)
        pos, nb = _expand(C, ready)
        succ = nb[rank[nb] > rank[ready[pos]]]
        if len(succ):
            cand, times = _tally(succ, n)
            pred[cand] -= times
            ready = cand[pred[cand] == 0]
        else:
            ready = succ
    assert done == n, "colouring rounds did not reach every vertex"


def _first_free(k: int, forb_pos: np.ndarray, forb_col: np.ndarray, width: int) -> np.ndarray:
    """Smallest colour >= 1 not forbidden, for each of ``k`` vertices."""
    F = np.zeros((k, width + 2), dtype=bool)
    F[forb_pos, forb_col] = True
    F[:, 0] = True
    return np.argmin(F, axis=1)


class _Counts:
    """``cnt[v, c]``: how many coloured neighbours of ``v`` have colour ``c`` (dense, grown)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.a = np.zeros((n, 4), dtype=np.int32)

    def ensure(self, c: int) -> None:
        if c >= self.a.shape[1]:
            grown = np.zeros((self.n, max(c + 1, 2 * self.a.shape[1])), dtype=np.int32)
            grown[:, : self.a.shape[1]] = self.a
            self.a = grown

    def add(self, verts: np.ndarray, cols: np.ndarray, sign: int = 1) -> None:
        width = self.a.shape[1]
        keys, times = _tally(verts * width + cols, self.n * width)
        self.a.reshape(-1)[keys] += sign * times.astype(np.int32)

    def get(self, verts: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.a[verts, cols]


class _Greedy:
    """Greedy colouring state; ``colour(verts)`` colours uncoloured ``verts`` in rounds.

    ``star=False``: distance-1 rules. ``star=True``: star rules (NOTE [colouring]).
    Colours are ``1..top`` while running (``0``: uncoloured).
    """

    def __init__(self, A: sp.csr_matrix, star: bool, period: int = 0, reach=None) -> None:
        self.A = A
        self.n = n = A.shape[0]
        self.star = star
        self.colors = np.zeros(n, dtype=np.int64)
        self._top = 0
        self.rank = _order(A, period)
        if star:
            if reach is None:
                # vertices within distance 3 (self loops are harmless in _rounds)
                C1 = (A + sp.identity(n, dtype=bool, format="csr")).tocsr()
                reach = (C1 @ C1 @ C1).tocsr()
            self.reach = reach
            self.cnt = _Counts(n)
        else:
            self.reach = A

    @property
    def top(self) -> int:
        return self._top

    def _retop(self) -> None:
        self._top = int(self.colors.max()) if self.n else 0

    def colour(self, verts: np.ndarray | None = None, max_rounds: int | None = None) -> None:
        for i, S in enumerate(_rounds(self.reach, self.rank, verts)):
            if max_rounds is not None and i >= max_rounds:
                raise _TooManyRounds
            self._step(S)

    def _step(self, S: np.ndarray) -> None:
        A, colors = self.A, self.colors
        pos, w = _expand(A, S)
        cw = colors[w]
        colored = cw > 0
        fpos, fcol = [pos[colored]], [cw[colored]]
        if self.star and colored.any():
            pos2, w2, cw2 = pos[colored], w[colored], cw[colored]
            q, x = _expand(A, w2)
            p3, c3 = pos2[q], cw2[q]
            v3 = S[p3]
            cx = colors[x]
            ok = (x != v3) & (cx > 0)
            p3, c3, v3, x, cx = p3[ok], c3[ok], v3[ok], x[ok], cx[ok]
            bad = (self.cnt.get(v3, c3) >= 2) | (self.cnt.get(x, c3) >= 2)
            fpos.append(p3[bad])
            fcol.append(cx[bad])
        c = _first_free(len(S), np.concatenate(fpos), np.concatenate(fcol), self.top)
        colors[S] = c
        self._top = max(self._top, int(c.max()))
        if self.star:
            self.cnt.ensure(int(c.max()))
            self.cnt.add(w, c[pos])

    def uncolour(self, verts: np.ndarray) -> None:
        if self.star:
            pos, w = _expand(self.A, verts)
            self.cnt.add(w, self.colors[verts][pos], sign=-1)
        self.colors[verts] = 0
        self._retop()

    def iterate(self, passes: int = 3) -> None:
        """Culberson's iterated greedy (distance-1 only): recolour class by class, largest
        colour first; never uses more colours, often fewer. Each class is one round."""
        assert not self.star
        for _ in range(passes):
            top = self.top
            classes = [np.flatnonzero(self.colors == c) for c in range(top, 0, -1)]
            self.colors[:] = 0
            self._top = 0
            for T in classes:
                self._step(T)
            if self.top >= top:
                return

    def improve(self, tries: int = 4, radii: tuple[int, ...] = (0, 3, 12, 48)) -> None:
        """Remove the highest colour where a local recolouring can.

        The vertices of the top colour and those within ``radius`` of them are
        uncoloured and coloured again in natural largest-first order (the defects of
        segmented orders sit where segments meet, and natural order repairs them). A
        change is kept only if it removes a colour.
        """
        deg = np.diff(self.A.indptr)
        natural = np.empty(self.n, dtype=np.int64)
        natural[np.lexsort((np.arange(self.n), -deg))] = np.arange(self.n)
        for _ in range(tries):
            top = self.top
            if top <= 1:
                return
            for radius in radii:
                saved = (self.colors.copy(), self.cnt.a.copy() if self.star else None)
                W = self.colors == top
                for _ in range(radius):
                    W = W | ((self.A @ W.astype(np.int8)) > 0)
                W = np.flatnonzero(W)
                self.uncolour(W)
                rank, self.rank = self.rank, natural
                try:
                    self.colour(W, max_rounds=4 * SEGMENTS[-1])
                    done = self.top < top
                except _TooManyRounds:
                    done = False
                self.rank = rank
                if done:
                    break
                self.colors = saved[0]
                self._retop()
                if self.star:
                    self.cnt.a = saved[1]
            else:
                return

    def result(self, kind: str) -> Coloring:
        return Coloring(self.colors - 1, self.top, kind)


class _TooManyRounds(Exception):
    """A candidate order needs too many rounds (internal)."""


def _best(A: sp.csr_matrix, star: bool, kind: str) -> Coloring:
    """The greedy colouring with the fewest colours among a few tie-break orders.

    Graphs with at most ``SMALL`` vertices get the exact largest-first greedy; larger
    ones try the segmented natural order and a few periodic orders (each a full
    greedy colouring, NOTE [colouring]) and keep the best, stopping early at a lower
    bound or when the graph is large.
    """
    bound = _lower_bound(A, star)
    best: Coloring | None = None
    reach = None
    candidates = _STAR_CANDIDATES if star else _DISTANCE1_CANDIDATES
    if A.shape[0] <= NATURAL:
        candidates = (*candidates, 1)  # period 1: the exact natural order, n rounds
    for period in candidates if A.shape[0] > SMALL else (0,):
        g = _Greedy(A, star=star, period=period, reach=reach)
        reach = g.reach if star else None
        try:
            # a periodic order makes long chains when the rules reach past the period:
            # such a candidate is abandoned (the segmented order is always finished)
            g.colour(max_rounds=None if period in (0, 1) else _segment(A.shape[0]) + 64)
        except _TooManyRounds:
            continue
        if star:
            if g.top > bound:
                g.improve()
            reach = g.reach
        elif g.top > bound:
            g.iterate()
        if best is None or g.top < best.num_colors:
            best = g.result(kind)
        if best.num_colors <= bound or A.nnz > _CANDIDATE_NNZ:
            break
    assert best is not None
    return best


# Tie-break keys tried for large graphs, best kept (each is a full greedy colouring);
# the order matters only for time, the search stops at a lower bound.
_STAR_CANDIDATES = (0, 3, 2, 4)
_DISTANCE1_CANDIDATES = (2, 0, 3, 4)
_CANDIDATE_NNZ = 200_000


def _lower_bound(A: sp.csr_matrix, star: bool) -> int:
    """A cheap lower bound on the colours: 1, 2 with an edge, 3 for a star colouring of a
    graph with a path on four vertices, and the size of the closed neighbourhood of a
    top-degree vertex when that is a clique."""
    if A.nnz == 0:
        return 1
    deg = np.diff(A.indptr)
    bound = 2
    if star:
        r, c = _edges(A)
        if ((deg[r] >= 2) & (deg[c] >= 2)).any():
            bound = 3
    v = int(np.argmax(deg))
    nb = np.append(A.indices[A.indptr[v] : A.indptr[v + 1]], v)
    k = len(nb)
    if A[nb][:, nb].nnz == k * (k - 1):
        bound = max(bound, k)
    return bound


def diagonal_coloring(pattern: sp.spmatrix) -> Coloring:
    """Distance-1 colouring of the adjacency graph of ``pattern``: recovers the diagonal."""
    return _best(adjacency(pattern), False, "diagonal")


def column_coloring(J: sp.spmatrix) -> Coloring:
    """Columns of ``J`` in one group share no row (Curtis-Powell-Reid): recovers all of ``J``."""
    J = sp.csr_matrix(J, dtype=bool)
    return _best(adjacency((J.T @ J).tocsr()), False, "column")


def row_coloring(J: sp.spmatrix) -> Coloring:
    """Rows of ``J`` in one group share no column: recovers ``J`` from products ``s^T J``."""
    J = sp.csr_matrix(J, dtype=bool)
    return _best(adjacency((J @ J.T).tocsr()), False, "row")


def star_coloring(pattern: sp.spmatrix) -> Coloring:
    """Greedy star colouring of the adjacency graph of a symmetric ``pattern``."""
    return _best(adjacency(pattern), True, "star")


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
    P = sp.csr_matrix(pattern, dtype=bool)
    P = (P + P.T).tocsr()
    P.sort_indices()
    A = adjacency(P)
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


# -- acyclic colouring (substitution recovery) ------------------------------------------------

#: Vertex orders tried by :func:`acyclic_coloring`, in this order (NOTE [acyclic colouring]).
ORDERS = ("natural", "largest_first", "smallest_last", "incidence_degree", "dynamic_largest_first")

#: Extra orders are tried while the colouring time stays under this many seconds.
ORDER_BUDGET_S = 0.25


def twins(A: sp.csr_matrix) -> np.ndarray:
    """For each CSR position ``p`` of a symmetric ``A`` (sorted indices, no self loops),
    the position of the reverse entry."""
    from hesse.sparsity._kernels import kernel, twin_positions

    return kernel(twin_positions, A.nnz)(A.indptr.astype(np.int64), A.indices.astype(np.int64))


def vertex_order(A: sp.csr_matrix, name: str) -> np.ndarray:
    """The vertices of ``A`` in the named order (NOTE [acyclic colouring])."""
    from hesse.sparsity._kernels import bucket_order, kernel

    n = A.shape[0]
    if name == "natural":
        return np.arange(n, dtype=np.int64)
    if name == "largest_first":
        return np.argsort(-np.diff(A.indptr), kind="stable").astype(np.int64)
    mode = {"smallest_last": 0, "dynamic_largest_first": 1, "incidence_degree": 2}[name]
    indptr, indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
    return kernel(bucket_order, A.nnz)(indptr, indices, mode)


def _acyclic_bound(A: sp.csr_matrix) -> int:
    """A lower bound on acyclic colours: the distance-1 bound, 3 when ``A`` has a cycle."""
    bound = _lower_bound(A, star=False)
    if A.nnz:
        ncomp = sp.csgraph.connected_components(A, directed=False)[0]
        if A.nnz // 2 > A.shape[0] - ncomp:
            bound = max(bound, 3)
    return bound


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
    dynamic largest first); the colouring with the fewest colours is kept, stopping at
    a lower bound or once :data:`ORDER_BUDGET_S` is spent (the first order always runs).

    References:
        Gebremedhin, A. H., Tarafdar, A., Manne, F. & Pothen, A. (2007). New acyclic and
        star coloring algorithms with application to computing Hessians. SIAM J. Sci.
        Comput. 29(3).
        Coleman, T. F. & Cai, J.-Y. (1986). The cyclic coloring problem and estimation
        of sparse Hessian matrices. SIAM J. Algebraic Discrete Methods 7(2).
        Montoison, A., Dalle, G. & Gebremedhin, A. (2025). Revisiting sparse matrix
        coloring and bicoloring. arXiv:2505.07308.
    """
    import time

    from hesse.sparsity._kernels import acyclic, kernel

    A = adjacency(pattern)
    n = A.shape[0]
    if A.nnz == 0:
        return Coloring(np.zeros(n, dtype=np.int64), 1 if n else 0, "acyclic", trees=None)
    indptr, indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
    twin = twins(A)
    run = kernel(acyclic, A.nnz)
    bound = _acyclic_bound(A)
    best = None
    start = time.perf_counter()
    for name in orders:
        color, tree = run(indptr, indices, twin, vertex_order(A, name))
        k = int(color.max()) + 1
        if best is None or k < best.num_colors:
            best = Coloring(color, k, "acyclic", trees=tree)
        if k <= bound or time.perf_counter() - start > ORDER_BUDGET_S:
            break
    assert best is not None
    return best


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
