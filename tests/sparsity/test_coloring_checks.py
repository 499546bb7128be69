"""Colourings against checkers written from the definitions, theory counts, exact recovery.

The checkers here share no code with :mod:`hesse.sparsity._coloring`: distance-1 (no edge
joins two vertices of one colour), star (every path on four vertices uses at least three
colours) and acyclic (no cycle uses only two colours), each by brute force on small graphs.
"""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import hesse.sparsity._coloring as C
from hesse.sparsity import _kernels
from hesse.sparsity._recovery import star_plan, substitution_plan

from .test_coloring import band as _band
from .test_coloring import grid5 as _grid5


def _neighbours(P):
    dense = np.asarray(sp.csr_matrix(P, dtype=bool).toarray())
    dense = dense | dense.T
    np.fill_diagonal(dense, False)
    return [set(np.flatnonzero(row).tolist()) for row in dense]


def distance1(P, colors):
    nb = _neighbours(P)
    return all(colors[v] != colors[w] for v in range(len(nb)) for w in nb[v])


def star(P, colors):
    """Distance-1, and no path a-b-c-d has colours x, y, x, y."""
    nb = _neighbours(P)
    if not distance1(P, colors):
        return False
    for b in range(len(nb)):
        for c in nb[b]:
            for a in nb[b] - {c}:
                for d in nb[c] - {a, b}:
                    if colors[a] == colors[c] and colors[b] == colors[d]:
                        return False
    return True


def acyclic(P, colors):
    """Distance-1, and for every two colours the edges between them close no cycle
    (union-find over the vertices: an edge inside one component closes a cycle)."""
    nb = _neighbours(P)
    if not distance1(P, colors):
        return False
    for x, y in itertools.combinations(sorted(set(colors.tolist())), 2):
        root = list(range(len(nb)))

        def find(v, root=root):
            while root[v] != v:
                v = root[v]
            return v

        for v in range(len(nb)):
            for w in nb[v]:
                if v < w and {colors[v], colors[w]} == {x, y}:
                    a, b = find(v), find(w)
                    if a == b:
                        return False
                    root[a] = b
    return True


def _random_pattern(n, density, seed):
    R = sp.random(n, n, density=density, random_state=seed, format="csr") != 0
    return (R + R.T + sp.identity(n, dtype=bool)).tocsr()


def _kernel_colourings(P):
    """Every acyclic colouring the kernels make: each order, first fit and the palette
    rule with targets 2..K (K: first fit's colours), with their trees."""
    A = C.adjacency(P)
    indptr, indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
    twin = C.twins(A)
    for name in C.ORDERS:
        order = C.vertex_order(A, name)
        first = _kernels.acyclic(indptr, indices, twin, order, 0)
        k = int(first[0].max()) + 1
        yield first
        for palette in range(2, k + 1):
            yield _kernels.acyclic(indptr, indices, twin, order, palette)


@pytest.mark.parametrize("seed", range(4))
def test_kernel_colourings_pass_the_definitions_on_random_graphs(seed):
    P = _random_pattern(24, 0.12, seed)
    for colors, _ in _kernel_colourings(P):
        assert acyclic(P, colors)
    for name in C.ORDERS:
        assert star(P, C.star_coloring(P, orders=(name,)).colors)
    assert distance1(P, C.diagonal_coloring(P).colors)
    assert acyclic(P, C.acyclic_coloring(P).colors)


def test_the_checkers_reject_what_the_definitions_reject():
    path = sp.diags([np.ones(3), np.ones(4), np.ones(3)], [-1, 0, 1]).astype(bool)
    assert not star(path, np.array([0, 1, 0, 1]))  # a two-coloured P4
    assert star(path, np.array([0, 1, 0, 2]))
    cycle = sp.csr_matrix(
        np.roll(np.eye(4, dtype=bool), 1, 1) | np.roll(np.eye(4, dtype=bool), -1, 1)
    )
    assert not acyclic(cycle, np.array([0, 1, 0, 1]))
    assert acyclic(cycle, np.array([0, 1, 0, 2]))
    assert not distance1(cycle, np.array([0, 0, 1, 2]))


def _exact_acyclic_number(P):
    n = P.shape[0]
    for k in range(1, n + 1):
        for colors in itertools.product(range(k), repeat=n):
            if acyclic(P, np.array(colors)):
                return k
    return n


@pytest.mark.parametrize("seed", range(6))
def test_acyclic_lower_bound_is_valid_against_brute_force(seed):
    P = _random_pattern(6, 0.45, seed)
    exact = _exact_acyclic_number(P)
    bound = C._acyclic_bound(C.adjacency(P))
    assert bound <= exact <= C.acyclic_coloring(P).num_colors


@pytest.mark.parametrize("m", [4, 9, 17, 60])
def test_five_point_stencil_takes_three_acyclic_colours(m):
    # theory: 3 (the forest bound |E| <= (K-1) n - K(K-1)/2 rules out 2); m = 60 runs
    # the compiled kernels when numba is installed
    G = _grid5(m)
    col = C.acyclic_coloring(G)
    assert col.num_colors == 3 == C._acyclic_bound(C.adjacency(G))
    assert C.is_acyclic_coloring(G, col.colors)
    if m <= 9:
        assert acyclic(G, col.colors)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 10])
def test_bands_take_the_theory_count_at_scale(k):
    # rho = 2k off-diagonal bands: floor(rho/2) + 1 acyclic colours, 2 floor(rho/2) + 1
    # star colours (Gebremedhin et al. 2009); SparseMatrixColorings.jl's test/theory.jl
    # checks the same counts for rho = 10 (6 and 11) and rho = 20 (11 and 21)
    P = _band(6_000, k)  # above JIT_EDGES: the compiled kernels run where numba is
    col = C.acyclic_coloring(P)
    assert col.num_colors == k + 1 == C._acyclic_bound(C.adjacency(P))
    assert C.star_coloring(P).num_colors == 2 * k + 1


def _recover(plan, H):
    n = H.shape[0]
    S = np.zeros((plan.coloring.num_colors, n))
    seeded = plan.coloring.colors < plan.coloring.num_colors
    S[plan.coloring.colors[seeded], np.flatnonzero(seeded)] = 1
    values, _ = plan.recover(torch.from_numpy(S @ H))
    got = np.zeros((n, n))
    got[plan.rows, plan.cols] = values.numpy()
    return got


@pytest.mark.parametrize(
    "name,P",
    [("random", _random_pattern(40, 0.08, 7)), ("stencil", _grid5(7)), ("band_3", _band(30, 3))],
)
def test_every_colouring_recovers_the_dense_hessian(name, P):
    rng = np.random.default_rng(0)
    n = P.shape[0]
    H = np.where(P.toarray(), rng.standard_normal((n, n)), 0.0)
    H = H + H.T
    for colors, trees in _kernel_colourings(P):
        coloring = C.Coloring(colors, int(colors.max()) + 1, "acyclic", trees=trees)
        got = _recover(substitution_plan(sp.csr_matrix(P), coloring), H)
        np.testing.assert_allclose(got, H, rtol=0, atol=1e-10)
    for order in C.ORDERS:
        got = _recover(star_plan(sp.csr_matrix(P), C.star_coloring(P, orders=(order,))), H)
        np.testing.assert_allclose(got, H, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_library_checkers_agree_with_the_definitions(seed):
    rng = np.random.default_rng(seed)
    P = _random_pattern(12, 0.25, seed)
    for _ in range(40):
        colors = rng.integers(0, 8, 12)
        assert C.is_acyclic_coloring(P, colors) == acyclic(P, colors)
        assert C.is_star_coloring(P, colors) == star(P, colors)
        assert C.is_diagonal_coloring(P, colors) == distance1(P, colors)
