"""Acyclic colouring and substitution recovery: theory counts, validity, exactness."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.func import hessian

import hesse
import hesse.sparsity._coloring as C
from hesse.sparsity import _kernels
from hesse.sparsity._recovery import star_plan, substitution_plan


def _band(n, k):
    return sp.diags(
        [np.ones(n - abs(d)) for d in range(-k, k + 1)], list(range(-k, k + 1)), format="csr"
    ).astype(bool)


def _arrow(n):
    A = sp.lil_matrix((n, n), dtype=bool)
    A[0, :] = True
    A[:, 0] = True
    A.setdiag(True)
    return A.tocsr()


def _blocks(b, d):
    return sp.block_diag([np.ones((d, d), dtype=bool)] * b, format="csr")


# name, pattern, acyclic colours (theory: a band with rho = 2k off-diagonal bands needs
# floor(rho/2) + 1 = k + 1; an arrowhead 2; blocks of size d need d)
THEORY = [
    *[(f"band_{k}", _band(300, k), k + 1) for k in range(1, 6)],
    ("arrowhead", _arrow(200), 2),
    ("blocks_4", _blocks(30, 4), 4),
    ("diagonal", sp.identity(50, dtype=bool, format="csr"), 1),
]


@pytest.mark.parametrize("name,P,k", THEORY, ids=[t[0] for t in THEORY])
def test_acyclic_counts_on_theory_cases(name, P, k):
    col = C.acyclic_coloring(P)
    assert col.num_colors == k
    assert C.is_acyclic_coloring(P, col.colors)


def test_acyclic_beats_star_on_bands():
    for k in (1, 2, 3):
        P = _band(200, k)
        assert C.acyclic_coloring(P).num_colors == k + 1
        assert C.star_coloring(P).num_colors == 2 * k + 1


def test_stencil_is_acyclic_with_few_colours():
    m = 12
    T = _band(m, 1).astype(float)
    G = (sp.kron(sp.identity(m), T) + sp.kron(T, sp.identity(m))).tocsr().astype(bool)
    col = C.acyclic_coloring(G)
    assert C.is_acyclic_coloring(G, col.colors)
    assert col.num_colors == 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", C.ORDERS)
def test_every_order_gives_an_acyclic_colouring(seed, order):
    rng = np.random.default_rng(seed)
    n = 40
    R = sp.random(n, n, density=0.08, random_state=rng, format="csr").astype(bool)
    P = (R + R.T + sp.identity(n, dtype=bool)).tocsr()
    col = C.acyclic_coloring(P, orders=(order,))
    assert C.is_acyclic_coloring(P, col.colors)
    # the orders are permutations
    assert sorted(C.vertex_order(C.adjacency(P), order)) == list(range(n))


def test_a_two_coloured_cycle_is_not_acyclic():
    cycle = sp.csr_matrix(
        np.roll(np.eye(4, dtype=bool), 1, 1) | np.roll(np.eye(4, dtype=bool), -1, 1)
    )
    assert not C.is_acyclic_coloring(cycle, np.array([0, 1, 0, 1]))
    assert C.is_acyclic_coloring(cycle, np.array([0, 1, 0, 2]))


def _random_symmetric(n, density, rng, scale=None):
    R = sp.random(n, n, density=density, random_state=rng, format="csr")
    H = (R + R.T + sp.diags(rng.standard_normal(n))).toarray()
    if scale is not None:
        H = scale[:, None] * H * scale[None, :]
    return H


@pytest.mark.parametrize("seed", range(5))
def test_substitution_recovers_random_hessians(seed):
    rng = np.random.default_rng(seed)
    n = 60
    H = _random_symmetric(n, 0.06, rng)
    P = sp.csr_matrix(H != 0)
    for plan in (
        substitution_plan(P, C.acyclic_coloring(P)),
        star_plan(P, C.star_coloring(P)),
    ):
        S = np.zeros((plan.coloring.num_colors, n))
        S[plan.coloring.colors, np.arange(n)] = 1
        B = torch.from_numpy(S @ H)  # row c: H s_c
        values, _ = plan.recover(B)
        got = np.zeros((n, n))
        got[plan.rows, plan.cols] = values.numpy()
        np.testing.assert_allclose(got, H, rtol=0, atol=1e-12 * np.abs(H).max())


def test_substitution_error_grows_on_badly_scaled_problems_and_auto_avoids_it():
    n = 40
    d = torch.logspace(0, 14, n, dtype=torch.float64)

    def f(x):  # tridiagonal, entries from 1 to 1e28 along the path
        y = x * d
        return (y[1:] * y[:-1]).sum() + (y**3).sum() / 6

    x = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    H = hessian(f)(x)
    rel = lambda A: ((A - H).abs() / H.abs().clamp_min(1e-300))[H != 0].max()  # noqa: E731
    sub = hesse.sparse_hessian(f, coloring="acyclic")(x).to_dense()
    direct = hesse.sparse_hessian(f, coloring="star")(x).to_dense()
    auto = hesse.sparse_hessian(f)(x).to_dense()
    assert rel(direct) < 1e-13
    assert rel(sub) > 1e-6  # substitution loses the small entries ...
    assert rel(auto) < 1e-13  # ... and auto sees it and recovers directly


@pytest.mark.skipif(not _kernels._numba(), reason="numba not installed")
def test_compiled_kernels_equal_the_python_ones():
    P = _band(3000, 2) + _arrow(3000)
    A = C.adjacency(P)
    indptr, indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
    jit = lambda fn: _kernels.kernel(fn, 10**9)  # noqa: E731 - forced compilation
    twin = _kernels.twin_positions(indptr, indices)
    assert np.array_equal(twin, jit(_kernels.twin_positions)(indptr, indices))
    for mode in (0, 1, 2):
        py = _kernels.bucket_order(indptr, indices, mode)
        assert np.array_equal(py, jit(_kernels.bucket_order)(indptr, indices, mode))
    order = np.arange(A.shape[0])
    for fn, args in (
        (_kernels.acyclic, (indptr, indices, twin, order, 0)),
        (_kernels.acyclic, (indptr, indices, twin, order, 3)),
        (_kernels.star, (indptr, indices, order)),
        (_kernels.star, (indptr, indices, order, None, None, 3)),
        (_kernels.greedy, (indptr, indices, order)),
    ):
        py, compiled = fn(*args), jit(fn)(*args)
        py = py[0] if isinstance(py, tuple) else py
        compiled = compiled[0] if isinstance(compiled, tuple) else compiled
        assert np.array_equal(py, compiled)


def _reference_plan(P, colors):
    """Substitution's visits and gather from the colours alone (no trees, no kernels):
    each component of each two-coloured subgraph walked depth first from its smallest
    vertex, children by index; trees in the order of (root, root's first neighbour in
    the tree), the CSR order in which the kernel meets them."""
    A, S = C.adjacency(P), C.symmetric(P)
    n = A.shape[0]
    nbrs = [A.indices[A.indptr[i] : A.indptr[i + 1]].tolist() for i in range(n)]
    starts = []
    for a in range(colors.max() + 1):
        for b in range(a + 1, colors.max() + 1):
            pair, seen = (a, b), set()
            for v in range(n):
                near = [w for w in nbrs[v] if colors[v] in pair and colors[w] in pair]
                if v in seen or not near:
                    continue
                starts.append((v, near[0], pair))
                stack = [v]
                while stack:
                    u = stack.pop()
                    if u not in seen:
                        seen.add(u)
                        stack.extend(w for w in nbrs[u] if colors[w] in pair)
    visits = []  # [vertex, parent, sign, end]

    def walk(v, parent, depth, pair):
        for w in nbrs[v]:
            if colors[w] in pair and w != parent:
                k = len(visits)
                visits.append([w, v, (-1.0) ** (depth + 1), 0])
                walk(w, v, depth + 1, pair)
                visits[k][3] = len(visits)

    for root, _, pair in sorted(starts):
        walk(root, -1, 0, pair)
    edge = {frozenset(vis[:2]): n + k for k, vis in enumerate(visits)}
    rows = np.repeat(np.arange(n), np.diff(S.indptr))
    gather = [i if i == j else edge[frozenset((i, j))] for i, j in zip(rows, S.indices)]
    v, p, sign, end = (np.array(c) for c in zip(*visits))
    return {
        "visit_vertex": v,
        "visit_parent": p,
        "visit_sign": sign,
        "visit_end": end,
        "visit_src": colors[p] * n + v,
        "gather": np.array(gather),
    }


@pytest.mark.parametrize("seed", range(3))
def test_substitution_plan_equals_a_walk_of_the_two_coloured_subgraphs(seed):
    rng = np.random.default_rng(seed)
    cases = [sp.csr_matrix(_random_symmetric(60, 0.08, rng) != 0), _band(80, 2), _arrow(40)]
    jit = lambda fn: _kernels.kernel(fn, 10**9) if _kernels._numba() else fn  # noqa: E731
    for P in cases:
        A = C.adjacency(P)
        indptr, indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
        twin = C.twins(A)
        S = C.symmetric(P)
        for name in C.ORDERS:
            for palette in (0, 3):
                order = C.vertex_order(A, name)
                colors, trees = _kernels.acyclic(indptr, indices, twin, order, palette)
                want = _reference_plan(P, colors)
                coloring = C.Coloring(colors, int(colors.max()) + 1, "acyclic", trees=trees)
                plan = substitution_plan(P, coloring)  # the Python kernels at this size
                for field, value in want.items():
                    assert np.array_equal(getattr(plan, field).numpy(), value), field
                for dtype in (np.int32, np.int64):  # compiled, narrow and wide pairs
                    pairs = _kernels.tree_pairs(indices, trees, np.empty((A.nnz, 2), dtype))
                    got = jit(_kernels.forest_preorder)(indptr, pairs, colors, S.indptr, S.indices)
                    names = ("visit_src", "visit_sign", "visit_end", "visit_vertex")
                    for field, value in zip((*names, "visit_parent", "gather"), got):
                        assert np.array_equal(value, want[field]), field


def test_substitution_rejects_trees_with_a_cycle():
    cycle = sp.csr_matrix(np.roll(np.eye(4, dtype=bool), 1, 1) | np.eye(4, dtype=bool))
    A = C.adjacency(cycle)
    colors = np.array([0, 1, 0, 1])
    trees = np.zeros(A.nnz, dtype=np.int64)  # one tree holding the whole 4-cycle
    with pytest.raises(AssertionError, match="two-coloured cycle"):
        substitution_plan(cycle, C.Coloring(colors, 2, "acyclic", trees=trees))


def test_star_colourings_are_valid_in_every_order():
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = 50
        R = sp.random(n, n, density=0.08, random_state=rng, format="csr").astype(bool)
        P = (R + R.T + sp.identity(n, dtype=bool)).tocsr()
        for order in C.ORDERS:
            col = C.star_coloring(P, orders=(order,))
            assert C.is_star_coloring(P, col.colors)


def test_coloring_option_is_validated():
    with pytest.raises(
        ValueError, match=r"hesse.sparse_hessian\(f\)\(x\): coloring should be one of"
    ):
        hesse.sparse_hessian(lambda x: (x**2).sum(), coloring="greedy")(torch.ones(3))


def test_supplied_pattern_missing_nonzeros_is_reported():
    f = lambda x: (x[1:] * x[:-1]).sum() + (x**3).sum()  # noqa: E731
    x = torch.linspace(1, 2, 6, dtype=torch.float64)
    diagonal_only = torch.eye(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="the pattern misses nonzeros of the Hessian"):
        hesse.sparse_hessian(f, pattern=diagonal_only)(x)


def test_prepared_transform_reuses_its_pattern_across_points(gen):
    f = lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()  # noqa: E731
    x = torch.randn(30, generator=gen, dtype=torch.float64)
    sh = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(x))
    for _ in range(3):
        x = torch.randn(30, generator=gen, dtype=torch.float64)
        assert torch.allclose(sh(x).to_dense(), hessian(f)(x), rtol=0, atol=1e-10)


def test_patterns_are_cached_per_function_and_rechecked(gen, monkeypatch):
    import hesse.sparsity._sparse as S

    calls = []
    detect = S._detect
    monkeypatch.setattr(S, "_detect", lambda *a: calls.append(1) or detect(*a))
    coupled = {"on": False}

    def f(x):  # a Python flag changes the structure behind the same signature
        out = (x**3).sum()
        return out + (x[1:] * x[:-1]).sum() if coupled["on"] else out

    x = torch.randn(8, generator=gen, dtype=torch.float64)
    sh = hesse.sparse_hessian(f)
    assert torch.allclose(sh(x).to_dense(), hessian(f)(x))
    assert torch.allclose(sh(x + 1).to_dense(), hessian(f)(x + 1))
    assert len(calls) == 1  # the second call reused the pattern
    coupled["on"] = True  # the cached (diagonal) pattern is now wrong: the check sees it
    assert torch.allclose(sh(x).to_dense(), hessian(f)(x))
    assert len(calls) == 2
    other = torch.randn(9, generator=gen, dtype=torch.float64)  # a new signature
    assert torch.allclose(sh(other).to_dense(), hessian(f)(other))
    assert len(calls) == 3
