"""Colourings: counts on known structures, validity checked by brute force."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse.sparsity._coloring as C


def band(n, k):
    return sp.diags(
        [np.ones(n - abs(d)) for d in range(-k, k + 1)], list(range(-k, k + 1)), format="csr"
    ).astype(bool)


def grid5(m):
    T = band(m, 1)
    eye = sp.identity(m)
    return (sp.kron(eye, T) + sp.kron(T, eye)).astype(bool).tocsr()


def arrow(n, hub):
    P = sp.lil_matrix((n, n), dtype=bool)
    P.setdiag(True)
    P[hub, :] = True
    P[:, hub] = True
    return P.tocsr()


def blocks(b, d):
    return sp.block_diag([np.ones((d, d), dtype=bool)] * b, format="csr").astype(bool)


def bicoloured_p4(P, colors):
    """Brute force: a path a-b-c-d with colours x,y,x,y (or a distance-1 clash)."""
    A = C.adjacency(P)
    nb = [set(A.indices[A.indptr[v] : A.indptr[v + 1]]) for v in range(A.shape[0])]
    for b in range(A.shape[0]):
        for c in nb[b]:
            if colors[b] == colors[c]:
                return True
            for a in nb[b] - {c}:
                for d in nb[c] - {b, a}:
                    if colors[a] == colors[c] and colors[b] == colors[d]:
                        return True
    return False


KNOWN = [
    # name, pattern, star colours, diagonal colours
    ("diagonal", sp.identity(9, dtype=bool, format="csr"), 1, 1),
    ("tridiagonal", band(30, 1), 3, 2),
    ("banded_2", band(40, 2), 5, 3),
    ("banded_3", band(40, 3), 7, 4),
    ("arrowhead_hub_first", arrow(25, 0), 2, 2),
    ("arrowhead_hub_last", arrow(25, 24), 2, 2),
    ("grid_5_point", grid5(12), 5, 2),
    ("block_diagonal", blocks(12, 4), 4, 4),
]


@pytest.mark.parametrize("name,P,star,diag", KNOWN, ids=[k[0] for k in KNOWN])
def test_colour_counts_on_known_structures(name, P, star, diag):
    s = C.star_coloring(P)
    d = C.diagonal_coloring(P)
    assert (s.num_colors, d.num_colors) == (star, diag)
    assert not bicoloured_p4(P, s.colors)
    assert C.is_diagonal_coloring(P, d.colors)
    assert s.colors.min() >= 0 and s.colors.max() == s.num_colors - 1


@pytest.mark.parametrize("n", [5000])
def test_large_graphs_keep_optimal_counts(n):
    # beyond one segment the colouring runs segments side by side (NOTE [colouring])
    P = band(n, 1)
    s, d = C.star_coloring(P), C.diagonal_coloring(P)
    assert (s.num_colors, d.num_colors) == (3, 2)
    assert C.is_star_coloring(P, s.colors) and C.is_diagonal_coloring(P, d.colors)
    G = grid5(60)
    s = C.star_coloring(G)
    assert s.num_colors <= 6 and C.is_star_coloring(G, s.colors)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), density=st.floats(0.0, 0.4), seed=st.integers(0, 10_000))
def test_random_graphs_give_valid_colourings(n, density, seed):
    P = sp.random(n, n, density=density, random_state=seed, format="csr") != 0
    P = (P + P.T).tocsr()
    s, d = C.star_coloring(P), C.diagonal_coloring(P)
    assert not bicoloured_p4(P, s.colors)
    assert C.is_star_coloring(P, s.colors)
    A = C.adjacency(P).tocoo()
    assert (d.colors[A.row] != d.colors[A.col]).all()
    assert d.num_colors <= s.num_colors


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    density=st.floats(0.0, 0.5),
    seed=st.integers(0, 10_000),
)
def test_jacobian_colourings_separate_shared_rows(m, n, density, seed):
    J = sp.random(m, n, density=density, random_state=seed, format="csr") != 0
    cc, rc = C.column_coloring(J), C.row_coloring(J)
    dense = J.toarray()
    for i in range(m):
        cols = np.flatnonzero(dense[i])
        assert len(set(cc.colors[cols])) == len(cols)
    for j in range(n):
        rows = np.flatnonzero(dense[:, j])
        assert len(set(rc.colors[rows])) == len(rows)
    assert C.is_column_coloring(J, cc.colors)


def test_recovery_rejects_a_colouring_that_is_not_star():
    P = band(6, 1)
    bad = C.Coloring(np.array([0, 1, 0, 1, 0, 1]), 2, "star")  # 2 colours on a path: bicoloured
    with pytest.raises(AssertionError, match="not a star colouring"):
        C.star_recovery(P, bad)
    same = C.Coloring(np.zeros(6, dtype=np.int64), 1, "star")
    with pytest.raises(AssertionError, match="not distance-1"):
        C.star_recovery(P, same)


def test_recovery_reads_every_entry_from_the_compressed_products():
    rng = np.random.default_rng(0)
    P = band(12, 2)
    H = np.where(P.toarray(), rng.standard_normal((12, 12)), 0.0)
    H = H + H.T
    s = C.star_coloring(P)
    B = s.seeds().toarray().astype(float) @ H  # row c: (H s_c)^T
    rows, cols, src_c, src_r = C.star_recovery(P, s)
    assert np.array_equal(B[src_c, src_r], H[rows, cols])


def test_empty_graph():
    P = sp.csr_matrix((0, 0), dtype=bool)
    assert C.star_coloring(P).num_colors == 0
    assert C.diagonal_coloring(P).num_colors == 0


def test_star_bound_sees_an_edge_between_two_vertices_of_degree_two():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 10))
        M = rng.random((n, n)) < rng.random() * 0.5
        M = M | M.T
        np.fill_diagonal(M, False)
        A = sp.csr_matrix(M)
        deg = M.sum(1)
        want = any(deg[i] >= 2 and deg[j] >= 2 for i, j in zip(*np.nonzero(M)))
        assert C._joins_two_hubs(A, np.diff(A.indptr)) == want


@pytest.mark.parametrize("case", ["symmetric", "one-sided", "duplicates", "explicit zero"])
def test_symmetric_pattern_is_the_boolean_sum_with_the_transpose(case):
    rng = np.random.default_rng(1)
    M = rng.random((30, 30)) < 0.1
    if case != "one-sided":
        M = M | M.T
    P = sp.csr_matrix(M.astype(float))
    if case == "duplicates":  # a repeated entry, stored twice
        r, c = np.nonzero(M)
        r, c = np.append(r, r[0]), np.append(c, c[0])
        order = np.argsort(r, kind="stable")
        indptr = np.searchsorted(r[order], np.arange(31))
        P = sp.csr_matrix((np.ones(len(r)), c[order], indptr), shape=(30, 30))
        assert not P.has_canonical_format
    if case == "explicit zero":  # a stored zero is no entry
        P.data[0] = 0.0
    S = C.symmetric(P)
    dense = P.toarray() != 0
    want = dense | dense.T
    assert np.array_equal(S.toarray(), want)
    assert S.has_canonical_format and S.nnz == want.sum() and S.dtype == bool


@pytest.mark.parametrize("seed", range(3))
def test_star_probe_stops_once_the_natural_star_colouring_exceeds_its_limit(seed):
    rng = np.random.default_rng(seed)
    M = rng.random((80, 80)) < 0.06
    P = sp.csr_matrix(M | M.T)
    full = C.star_coloring(P, orders=C.ORDERS[:1]).num_colors
    for limit in range(1, full + 2):
        assert C.star_probe(P, limit) == (full if full <= limit else limit + 1)
